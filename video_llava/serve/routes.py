"""HTTP routes (FastAPI) of the ingress deployment: parse, call ``serving.QAService``, return. Every failure, of
ours or of the framework (404, 405, a malformed body), leaves as the same ``{"error": {...}}`` JSON, mapped here."""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from video_llava.serve.config import ServeArgs
from video_llava.serve.protocol import (
    ChatCompletionRequest,
    GenerationOptions,
    QARequest,
    QAResponse,
    ServiceError,
)

api = FastAPI(
    title="video_llava",
    description="Video question answering with LLaVA-NeXT-Video on Ray Serve. Errors are `{\"error\": {...}}` JSON.",
    version="0.1.0",
)

UPLOAD_CHUNK = 1 << 20


def _error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(ServiceError)
async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.rejected.inc(tags={"code": exc.code or exc.type})
    return _error_response(exc)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(_from_validation(exc.errors()))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The framework's own errors (a malformed multipart body, no such route, a wrong method) in our shape."""
    codes = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}
    error = ServiceError(exc.status_code, str(exc.detail), code=codes.get(exc.status_code),
                         headers=dict(exc.headers or {}))
    return _error_response(error)


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug or an infrastructure failure, not bad input: still JSON, and logged with its traceback by Serve.
    logging.getLogger("ray.serve").exception("unhandled error on %s", request.url.path)
    body = ServiceError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error").body()
    return JSONResponse(body, status_code=500)


def _from_validation(errors: list[dict]) -> ServiceError:
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return ServiceError(400, f"invalid request: {where or 'body'}: {first.get('msg', 'invalid')}", param=where or None)


@serve.deployment(name="QAIngress")
@serve.ingress(api)
class QAIngress:
    """Validates requests, fetches and decodes videos on this (CPU) replica, and asks the model deployment."""

    def __init__(self, model_handle: Any, args: ServeArgs):
        from video_llava.serve.serving import QAService

        self.args = args
        self.service = QAService(model_handle, args)
        api.state.metrics = self.service.metrics

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.args.model.model}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.args.model.model, "object": "model", "owned_by": "video_llava"}]}

    @api.post("/v1/video/qa", response_model=QAResponse)
    async def video_qa(self, request: Request) -> QAResponse:
        """Answer a question about a video.

        multipart/form-data: file field `video`, text field `question`, optional `num_frames`, `sampling`,
        `sample_fps`, `max_new_tokens`, `temperature`, `top_p`. Or JSON: `{"video_url": ..., "question": ...}`.
        """
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            return await self._upload_qa(request)
        if content_type.startswith("application/json"):
            try:
                body = QARequest.model_validate_json(await request.body())
            except ValidationError as exc:
                raise _from_validation(exc.errors())
            fetched = await self.service.fetch(body.video_url)
            return await self.service.answer(fetched.data, body.question, body, fetch_s=fetched.seconds)
        raise ServiceError(415, "send multipart/form-data (field 'video') or application/json (field 'video_url')",
                           code="unsupported_media_type")

    async def _upload_qa(self, request: Request) -> QAResponse:
        limit = self.args.limits.max_upload_bytes
        declared = int(request.headers.get("content-length") or 0)
        if declared > limit + 64 * 1024:  # multipart overhead aside, refuse before reading the body
            raise ServiceError(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes", code="video_too_large", param="video")
        form = await request.form()
        upload = form.get("video")
        if upload is None or isinstance(upload, str):
            raise ServiceError(400, "multipart field 'video' (a file) is required", param="video")
        chunks, size = [], 0
        while chunk := await upload.read(UPLOAD_CHUNK):
            size += len(chunk)
            if size > limit:
                raise ServiceError(413, f"upload exceeds the limit of {limit} bytes", code="video_too_large", param="video")
            chunks.append(chunk)
        if size == 0:
            raise ServiceError(422, "the uploaded video is empty (0 bytes)", code="invalid_video", param="video")
        fields = {k: v for k, v in form.items() if isinstance(v, str) and k != "question" and v != ""}
        try:
            opts = GenerationOptions.model_validate(fields)
        except ValidationError as exc:
            raise _from_validation(exc.errors())
        question = form.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ServiceError(400, "multipart field 'question' is required", param="question")
        return await self.service.answer(b"".join(chunks), question, opts)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """OpenAI-compatible chat completions; content parts `{"type": "video_url", "video_url": {"url": ...}}`."""
        try:
            body = ChatCompletionRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise _from_validation(exc.errors())
        if body.stream:
            return StreamingResponse(await self.service.open_stream(body), media_type="text/event-stream")
        return await self.service.chat(body)
