"""HTTP routes (FastAPI) of the ingress deployment: parse, call ``serving.QAService``, return. Every failure, of
ours or of the framework (404, 405, a malformed body), leaves as the same ``{"error": {...}}`` JSON, mapped here."""

import asyncio
import hmac
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException

from video_llava.serve.config import ServeArgs
from video_llava.serve.front_door import FORM_OVERHEAD
from video_llava.serve.protocol import (
    ChatCompletionRequest,
    GenerationOptions,
    QARequest,
    QAResponse,
    ServiceError,
)

api = FastAPI(
    title="video_llava",
    description="Video and image question answering with the LLaVA family on Ray Serve. Errors are `{\"error\": {...}}` JSON.",
    version="0.1.0",
)

UPLOAD_CHUNK = 1 << 20
MULTIPART_OVERHEAD = FORM_OVERHEAD  # form fields and boundaries next to the video (the proxy's limit counts them)
DOC_PATHS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


# What this process's middleware and error handlers read, set by the ingress replica (``configure``). Not
# ``api.state``: Serve serves a pickled copy of ``api``, and the ingress class travels by value with its own copy,
# so module-level functions (pickled by reference) and this dict are the one state all of them share.
_STATE: dict[str, Any] = {"api_keys": [], "enable_docs": False, "metrics": None}


def configure(args: ServeArgs, metrics: Any) -> None:
    _STATE.update(api_keys=list(args.limits.api_keys), enable_docs=args.limits.enable_docs, metrics=metrics)


class _Gate:
    """ASGI middleware in front of every route: API keys on ``/v1``, API docs only when enabled."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
            refusal = None
            if path in DOC_PATHS and not _STATE["enable_docs"]:
                refusal = ServiceError(404, "Not Found (API docs are off: set limits.enable_docs)", code="not_found")
            elif path.startswith("/v1") and _STATE["api_keys"]:
                refusal = _check_key(dict(scope["headers"]).get(b"authorization", b""), _STATE["api_keys"])
            if refusal is not None:
                await _error_response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _check_key(header: bytes, keys: list[str]) -> ServiceError | None:
    scheme, _, token = header.decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip().encode(), k.encode()) for k in keys):
        return None
    message = "Incorrect API key provided." if token else "You didn't provide an API key: send 'Authorization: Bearer KEY'."
    return ServiceError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


api.add_middleware(_Gate)


def limited_body(request: Request, limit: int, timeout_s: float) -> Request:
    """``request`` whose body may not exceed ``limit`` bytes nor take longer than ``timeout_s`` to arrive: the
    reader stops at the first byte over (413) or at the deadline (408), chunked or not, before anything is spooled
    past the limit (``request.form()`` wrote a whole 1 GB upload to /tmp before its size was checked)."""
    received = 0
    deadline = time.monotonic() + timeout_s

    async def receive():
        nonlocal received
        try:
            message = await asyncio.wait_for(request.receive(), max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ServiceError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout")
        except asyncio.CancelledError:  # Serve's proxy saw the client leave first and cancelled the request
            _count_rejected("client_disconnected")
            raise
        except TaskCancelledError:  # the same, seen from inside Serve's receive (a RayError, not asyncio's)
            raise _client_left()
        if message["type"] == "http.disconnect":  # the client left mid-body: counted, not logged as our error
            raise _client_left()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise ServiceError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
        return message

    return Request(request.scope, receive)


def _client_left() -> ServiceError:
    return ServiceError(499, "the client closed the connection before its request arrived", code="client_disconnected")


def _error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _count_rejected(code: str) -> None:
    metrics = _STATE["metrics"]
    if metrics is not None:
        metrics.rejected.inc(tags={"code": code})


@api.exception_handler(ServiceError)
async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    _count_rejected(exc.code or exc.type)
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
    # The deepest error names the field (a union's other branches fail at its top: "content: not a string");
    # pydantic's branch labels ("list[...]", "image_url" as a tag) are not part of the field's path.
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and "[" not in str(p))
    return ServiceError(400, f"invalid request: {where or 'body'}: {first.get('msg', 'invalid')}", param=where or None)


@serve.deployment(name="QAIngress")
@serve.ingress(api)
class QAIngress:
    """Validates requests, fetches and decodes videos on this (CPU) replica, and asks the model deployment."""

    def __init__(self, model_handle: Any, args: ServeArgs):
        from video_llava.serve.serving import QAService

        self.args = args
        self.service = QAService(model_handle, args)
        configure(args, self.service.metrics)  # keys resolved by build_app

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.args.model.model}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "video_llava"}
                                           for name in self.args.model_names]}

    @api.post("/v1/video/qa", response_model=QAResponse)
    async def video_qa(self, request: Request) -> QAResponse:
        """Answer a question about a video or an image.

        multipart/form-data: file field `video` (or `image`), text field `question`, optional `num_frames`,
        `sampling`, `sample_fps`, `max_new_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop`. Or JSON: `{"video_url": ..., "question":
        ...}` (or `image_url` in place of `video_url`).
        """
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            return await self._upload_qa(request)
        if content_type.startswith("application/json"):
            try:
                body = QARequest.model_validate_json(await self._json_body(request))
            except ValidationError as exc:
                raise _from_validation(exc.errors())
            kind = "image" if body.image_url is not None else "video"
            self.service.check_media([kind])
            fetched = await self.service.fetch(body.image_url or body.video_url, kind=kind)
            return await self.service.answer(fetched.data, body.question, body, fetch_s=fetched.seconds, kind=kind)
        raise ServiceError(415, "send multipart/form-data (field 'video' or 'image') or application/json (field "
                           "'video_url' or 'image_url')", code="unsupported_media_type")

    async def _json_body(self, request: Request) -> bytes:
        """The JSON body, read under the limit: base64 ``data:`` URLs of the request's media at most, and time; any
        other content type than JSON is 415 before a byte is read."""
        if not request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
            raise ServiceError(415, f"send the body as application/json (got "
                               f"{request.headers.get('content-type') or 'no content type'!r})",
                               code="unsupported_media_type")
        limits = self.args.limits
        limit = limits.max_request_bytes * 4 // 3 + MULTIPART_OVERHEAD
        declared = int(request.headers.get("content-length") or 0)
        if declared > limit:
            raise ServiceError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                               code="request_too_large")
        return await limited_body(request, limit, limits.body_timeout_s).body()

    async def _upload_qa(self, request: Request) -> QAResponse:
        limit = self.args.limits.max_upload_bytes
        declared = int(request.headers.get("content-length") or 0)
        if declared > limit + MULTIPART_OVERHEAD:  # refuse before reading the body
            raise ServiceError(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes", code="video_too_large", param="video")
        try:
            form = await limited_body(request, limit + MULTIPART_OVERHEAD, self.args.limits.body_timeout_s).form()
        except ServiceError as exc:
            if exc.code == "request_too_large":  # the upload's own limit, named as for a declared size
                raise ServiceError(413, f"upload exceeds the limit of {limit} bytes", code="video_too_large", param="video")
            raise
        files = [name for name in ("video", "image") if form.get(name) is not None and not isinstance(form.get(name), str)]
        if len(files) != 1:
            raise ServiceError(400, "one multipart file field is required: 'video' or 'image'", param="video")
        kind = files[0]
        upload = form.get(kind)
        chunks, size = [], 0
        while chunk := await upload.read(UPLOAD_CHUNK):
            size += len(chunk)
            if size > limit:
                raise ServiceError(413, f"upload exceeds the limit of {limit} bytes", code=f"{kind}_too_large", param=kind)
            chunks.append(chunk)
        if size == 0:
            raise ServiceError(422, f"the uploaded {kind} is empty (0 bytes)", code=f"invalid_{kind}", param=kind)
        fields = {k: v for k, v in form.items() if isinstance(v, str) and k != "question" and v != ""}
        try:
            opts = GenerationOptions.model_validate(fields)
        except ValidationError as exc:
            raise _from_validation(exc.errors())
        question = form.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ServiceError(400, "multipart field 'question' is required", param="question")
        return await self.service.answer(b"".join(chunks), question, opts, kind=kind)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """OpenAI-compatible chat completions: the whole conversation (system, earlier turns) with content parts
        `{"type": "video_url", "video_url": {"url": ...}}` and `{"type": "image_url", "image_url": {"url": ...}}`."""
        try:
            body = ChatCompletionRequest.model_validate_json(await self._json_body(request))
        except ValidationError as exc:
            raise _from_validation(exc.errors())
        self.service.check_model(body.model)
        unsupported = body.unsupported_parameters()
        if unsupported:
            raise ServiceError(400, f"{', '.join(repr(n) for n in unsupported)} {'is' if len(unsupported) == 1 else 'are'}"
                               " not supported by this service; leave it out (supported: seed, stop, temperature, "
                               "top_p, top_k, max_tokens, max_completion_tokens, n, logprobs, top_logprobs, stream)",
                               code="unsupported_parameter", param=unsupported[0])
        if body.stream:
            return StreamingResponse(await self.service.open_stream(body), media_type="text/event-stream")
        return await self.service.chat(body)
