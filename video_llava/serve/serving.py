"""Serving logic behind the routes: validate, fetch, decode on CPU workers, ask the model deployment, shape replies."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from video_llava.cache import LRUCache, content_key
from video_llava.model.prompts import Turn
from video_llava.serve.config import ServeArgs
from video_llava.serve.fetch import ByteBudget, fetch_media
from video_llava.serve.metrics import IngressMetrics
from video_llava.serve.protocol import (
    RETRY_AFTER_S,
    CacheUse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    GenerationOptions,
    ModelChoice,
    ModelError,
    ModelPiece,
    ModelReply,
    ModelRequest,
    QAResponse,
    ServiceError,
    Timings,
    Usage,
    chat_chunk,
    completion_id,
    usage_chunk,
)
from video_llava.video.decode import DecodeOptions, SampledVideo, VideoDecodeError
from video_llava.video.image import DecodedImage, ImageOptions
from video_llava.video.isolated import DecodersBusyError, IsolatedDecoder

if TYPE_CHECKING:
    from video_llava.model.loading import CheckpointInputs

MAX_MEDIA_PER_REQUEST = 8  # images and videos of one conversation together
# Where the ingress cannot read the checkpoint, videos are decoded for the largest tower of the registered families
# (OneVision's SigLIP at 384 px, times the decode margin), so no family gets frames smaller than its own.
UNKNOWN_FRAME_SHORT_SIDE = 768


@dataclass
class PlannedTurn:
    """A chat message as parsed, before its media are fetched: role, text and (kind, url) per medium."""

    role: str
    text: str
    media: list[tuple[str, str]] = field(default_factory=list)
    name: str | None = None


@dataclass
class FetchedMedia:
    """The decoded media of a conversation, in order, with what it cost to get them."""

    items: list[SampledVideo | DecodedImage]
    fetch_s: float = 0.0
    decode_s: float = 0.0
    decode_cached: bool = False

    @property
    def videos(self) -> list[SampledVideo]:
        return [m for m in self.items if isinstance(m, SampledVideo)]

    @property
    def images(self) -> list[DecodedImage]:
        return [m for m in self.items if isinstance(m, DecodedImage)]


def pixels(item: SampledVideo | DecodedImage):
    return item.frames if isinstance(item, SampledVideo) else item.pixels


class QAService:
    """Everything a request needs between HTTP and the model deployment."""

    def __init__(self, model_handle: Any, args: ServeArgs):
        self.model = model_handle
        self.args = args
        self.limits = args.limits
        self.decoder = IsolatedDecoder(workers=args.deployment.decode_workers, timeout_s=args.limits.decode_timeout_s,
                                       memory_mb=args.deployment.decode_worker_memory_mb)
        self.metrics = IngressMetrics()
        # Same bytes + same sampling = same frames: a repeat question skips decoding entirely.
        self.frames_cache = LRUCache(args.deployment.decode_cache_mb * 2**20, lambda v: pixels(v).nbytes)
        self.model_name = args.model_names[0]
        self._inputs = _model_inputs(args)
        self.frame_short_side = self._inputs.frame_short_side if self._inputs else UNKNOWN_FRAME_SHORT_SIDE

    def close(self) -> None:
        self.decoder.close()

    # ---- validation ------------------------------------------------------------------------------------------
    def _frames_wanted(self, opts: GenerationOptions, num_videos: int = 1) -> int:
        """Frames per video: as asked, else the default shared so that all videos fit ``max_frames``.

        A count over ``max_frames`` is refused here, before any fetch or decode work; the token budget as a whole
        is the model deployment's to check (it knows the prompt's tokens)."""
        settings = self.args.model
        frames = opts.num_frames or max(1, min(settings.num_frames, settings.max_frames // num_videos))
        if frames > settings.max_frames:
            raise ServiceError(
                400, f"num_frames={frames} exceeds max_frames={settings.max_frames}; use at most {settings.max_frames}",
                code="too_many_frames", param="num_frames",
            )
        if frames * num_videos > settings.max_frames:
            raise ServiceError(
                400, f"num_frames={frames} for each of {num_videos} videos is {frames * num_videos} frames; the "
                f"context holds max_frames={settings.max_frames}: use at most {settings.max_frames // num_videos} "
                "per video, or leave num_frames out to share the budget", code="too_many_frames", param="num_frames",
            )
        return frames

    def _check_question(self, question: str) -> str:
        question = question.strip()
        if not question:
            raise ServiceError(400, "question is empty", param="question")
        if len(question) > self.limits.max_question_chars:
            raise ServiceError(
                400, f"question has {len(question)} characters; the limit is {self.limits.max_question_chars}",
                code="context_length_exceeded", param="question",
            )
        return question

    # ---- decode ----------------------------------------------------------------------------------------------
    async def decode(self, data: bytes, opts: GenerationOptions, num_videos: int = 1) -> tuple[SampledVideo, float, bool]:
        settings = self.args.model
        options = DecodeOptions(
            num_frames=self._frames_wanted(opts, num_videos),
            mode=opts.sampling or settings.sampling,
            sample_fps=opts.sample_fps or settings.sample_fps,
            short_side=self.frame_short_side,
            # checked from the container's header in the decoder, before a frame is decoded
            max_pixels=self.limits.max_video_pixels,
            max_aspect_ratio=self.limits.max_aspect_ratio,
            max_duration_s=self.limits.max_duration_s,
        )
        video, elapsed, hit = await self._decode_cached(data, options, "video", self.decoder.decode)
        if not hit:
            self.metrics.frames_decoded.inc(video.num_frames)
            self.metrics.decode_latency.observe(elapsed)
        return video, elapsed, hit

    async def decode_image(self, data: bytes) -> tuple[DecodedImage, float, bool]:
        """The image's pixels (Pillow in the same isolated, time-limited workers as videos), cached by content."""
        options = ImageOptions(max_pixels=self.limits.max_video_pixels, max_aspect_ratio=self.limits.max_aspect_ratio)
        return await self._decode_cached(data, options, "image", self.decoder.decode_image)

    async def _decode_cached(self, data: bytes, options, kind: str, decode) -> tuple[Any, float, bool]:
        """``decode(data, options)`` in a decoder worker, or the cached result of the same bytes and options."""
        start = time.perf_counter()
        key = content_key(kind.encode(), data, repr(options)) if self.frames_cache.max_bytes else None
        cached = self.frames_cache.get(key) if key else None
        if cached is not None:
            return cached, time.perf_counter() - start, True
        cancel = threading.Event()
        try:
            result = await asyncio.to_thread(decode, data, options, cancel, self.args.deployment.decode_wait_s)
        except asyncio.CancelledError:  # the client left, or a sibling medium failed: stop the decoder too
            cancel.set()
            self.metrics.decodes_cancelled.inc()
            raise
        except DecodersBusyError as exc:
            raise ServiceError(503, f"the service is at capacity ({exc}); retry shortly", type="overloaded",
                               code="decoders_busy", headers={"Retry-After": RETRY_AFTER_S})
        except VideoDecodeError as exc:
            reason = exc.reason if exc.code != f"invalid_{kind}" else f"could not read the {kind}: {exc.reason}"
            raise ServiceError(422, reason, code=exc.code, param=kind)
        if key:
            self.frames_cache.put(key, result)
        return result, time.perf_counter() - start, False

    async def fetch(self, url: str, budget: ByteBudget | None = None, kind: str = "video"):
        return await fetch_media(url, self.limits, budget, kind)

    def check_media(self, kinds: list[str]) -> None:
        """Refuse media the model does not take before fetching them (the model deployment refuses them too)."""
        if self._inputs is None:  # the config could not be read here: the model deployment refuses them
            return
        missing = sorted(set(kinds) - self._inputs.media)
        if missing:
            takes = " and ".join(f"{m}s" for m in sorted(self._inputs.media))
            raise ServiceError(400, f"the loaded model ({self.model_name}) takes {takes}, not {missing[0]}s",
                               code="unsupported_media", param="messages")

    # ---- model ----------------------------------------------------------------------------------------------
    @staticmethod
    def _request(turns: list[Turn], opts: GenerationOptions, new_tokens: int | None) -> ModelRequest:
        chat = isinstance(opts, ChatCompletionRequest)  # n and logprobs are chat parameters
        try:
            output = opts.output_format()
        except ValueError as exc:
            raise ServiceError(400, str(exc), param="json_schema") from None
        return ModelRequest(tuple(turns), new_tokens or opts.max_new_tokens, opts.temperature, opts.top_p, opts.seed,
                            opts.stop_strings(), n=opts.n if chat else 1, logprobs=bool(chat and opts.logprobs),
                            top_logprobs=(opts.top_logprobs or 0) if chat else 0, top_k=opts.top_k,
                            response_format=output, pruning=opts.video_pruning())

    async def _ask_model(self, request: ModelRequest) -> ModelReply:
        from ray.serve.exceptions import BackPressureError

        try:
            reply = await self.model.answer.remote(request)
        except BackPressureError:
            raise ServiceError(
                503, "the service is at capacity; retry shortly", type="overloaded", code="queue_full",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        if isinstance(reply, ModelError):
            raise reply.exception()
        return reply

    # ---- /v1/video/qa ----------------------------------------------------------------------------------------
    async def answer(self, data: bytes, question: str, opts: GenerationOptions, fetch_s: float = 0.0,
                     kind: str = "video") -> QAResponse:
        """One question about one video (or image, ``kind="image"``)."""
        start = time.perf_counter() - fetch_s
        question = self._check_question(question)
        self.check_media([kind])
        if kind == "image":
            item, decode_s, decode_cached = await self.decode_image(data)
        else:
            item, decode_s, decode_cached = await self.decode(data, opts)
        media = FetchedMedia([item], fetch_s, decode_s, decode_cached)
        reply = await self._ask_model(self._request([Turn("user", question, (pixels(item),))], opts, None))
        return self._qa_response(media, reply, start)

    def _qa_response(self, media: FetchedMedia, reply: ModelReply, start: float) -> QAResponse:
        answer = reply.answer
        video = media.videos[0].describe() if media.videos else None
        return QAResponse(
            answer=answer.text,
            model=self.model_name,
            num_frames=answer.num_frames,
            sampled_indices=video.pop("sampled_indices") if video else [],
            timestamps=video.pop("timestamps") if video else [],
            finish_reason=answer.finish_reason,
            usage=Usage.of(answer),
            timings=Timings(
                fetch_s=round(media.fetch_s, 4),
                decode_s=round(media.decode_s, 4),
                queue_s=round(reply.queue_s, 4),
                vision_s=round(answer.vision_s, 4),
                generate_s=round(answer.generate_s, 4),
                total_s=round(time.perf_counter() - start, 4),
            ),
            cached=CacheUse(decode=media.decode_cached, vision=answer.vision_cached),
            video=video,
            image=media.images[0].describe() if media.images and not media.videos else None,
        )

    # ---- /v1/chat/completions --------------------------------------------------------------------------------
    def _conversation(self, request: ChatCompletionRequest) -> list[PlannedTurn]:
        """The messages as turns (``developer`` read as ``system``), each user turn's media named by URL, checked
        for shape: media only in user messages, text in every message, the last one from the user."""
        turns: list[PlannedTurn] = []
        for i, message in enumerate(request.messages):
            role = "system" if message.role == "developer" else message.role
            parts = message.content if isinstance(message.content, list) else []
            texts = [message.content] if isinstance(message.content, str) else [p.text for p in parts if p.type == "text"]
            media = [("video", p.video_url.url) if p.type == "video_url" else ("image", p.image_url.url)
                     for p in parts if p.type != "text"]
            if media and role != "user":
                raise ServiceError(400, f"messages[{i}] is a {message.role} message with media: only user messages "
                                   "may carry images or videos", param=f"messages.{i}.content")
            text = " ".join(t.strip() for t in texts if t.strip())
            if not text and role != "user":
                raise ServiceError(400, f"messages[{i}] ({message.role}) has no text", param=f"messages.{i}.content")
            turns.append(PlannedTurn(role, text, media, message.name))
        if turns[-1].role != "user":
            raise ServiceError(400, "the last message must be the user's question", param="messages")
        if not turns[-1].text:
            raise ServiceError(400, "no question: add a text content part to the last user message", param="messages")
        chars = sum(len(t.text) for t in turns)
        if chars > self.limits.max_question_chars:
            raise ServiceError(400, f"the conversation has {chars} characters; the limit is "
                               f"{self.limits.max_question_chars}", code="context_length_exceeded", param="messages")
        media = [m for t in turns for m in t.media]
        if len(media) > MAX_MEDIA_PER_REQUEST:
            raise ServiceError(400, f"{len(media)} images and videos in one request; at most {MAX_MEDIA_PER_REQUEST}",
                               param="messages")
        return turns

    async def _chat_media(self, request: ChatCompletionRequest) -> tuple[list[Turn], FetchedMedia]:
        """Fetch and decode every medium of the conversation concurrently; the turns with their pixels."""
        planned = self._conversation(request)
        media = [m for t in planned for m in t.media]
        self.check_media([kind for kind, _ in media])
        num_videos = sum(kind == "video" for kind, _ in media)
        if num_videos:
            self._frames_wanted(request, num_videos)  # the whole conversation's frames, before fetching any of it
        budget = ByteBudget(self.limits.max_request_bytes)  # all media of the request together
        fetched = await _all_or_none(self.fetch(url, budget, kind) for kind, url in media)
        # one message decodes on at most all but one worker at a time, so a small request is never stuck behind it
        share = asyncio.Semaphore(max(1, self.args.deployment.decode_workers - 1))

        async def decoded_one(kind: str, data: bytes):
            async with share:
                return await (self.decode_image(data) if kind == "image" else self.decode(data, request, num_videos))

        decoded = await _all_or_none(decoded_one(kind, f.data) for (kind, _), f in zip(media, fetched))
        items = iter(item for item, _, _ in decoded)
        turns = [Turn(t.role, t.text, tuple(pixels(next(items)) for _ in t.media), t.name) for t in planned]
        found = FetchedMedia([item for item, _, _ in decoded], max((f.seconds for f in fetched), default=0.0),
                             max((seconds for _, seconds, _ in decoded), default=0.0),
                             bool(decoded) and all(hit for _, _, hit in decoded))
        return turns, found

    def check_model(self, name: str | None) -> None:
        """A request naming a model this service does not serve is refused (a ``model`` left out means this one)."""
        if name is not None and name not in self.args.model_names:
            raise ServiceError(404, f"the model '{name}' does not exist here; this service serves "
                               f"{', '.join(repr(n) for n in self.args.model_names)} (GET /v1/models)",
                               type="invalid_request_error", code="model_not_found", param="model")

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        start = time.perf_counter()
        turns, media = await self._chat_media(request)
        reply = await self._ask_model(self._request(turns, request, request.new_tokens()))
        qa = self._qa_response(media, reply, start)
        extra = {
            "num_frames": qa.num_frames,
            "videos": [{"sampled_indices": [int(i) for i in v.indices], "duration": v.metadata.duration}
                       for v in media.videos],
            "images": [image.describe() for image in media.images],
            "timings": qa.timings.model_dump(),
            "cached": qa.cached.model_dump(),
        }
        return ChatCompletionResponse.of(completion_id(), self.model_name, reply.choices, extra)

    async def open_stream(self, request: ChatCompletionRequest) -> AsyncIterator[str]:
        """Fetch, decode and start generating; a refusal (fetch, decode or the token budget) is raised here, while
        it can still be a plain HTTP error. Returns the server-sent events of the answer."""
        turns, _ = await self._chat_media(request)
        events = self.model.options(stream=True).stream.remote(self._request(turns, request, request.new_tokens()))
        first = await events.__anext__()
        if isinstance(first, ModelError):
            raise first.exception()
        return self._sse_events(first, events, request.n, request.include_usage)

    async def _sse_events(self, first, events, choices: int = 1, usage: bool = False) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``: each choice's role, its text
        as generated, then its finish reason (with its logprobs, when asked for, in that last chunk); with
        ``usage``, a last chunk of no choices carries the usage."""
        cid = completion_id()
        finished: dict[int, Any] = {}
        for index in range(choices):
            yield _sse(chat_chunk(cid, self.model_name, {"role": "assistant", "content": ""}, index=index,
                                  with_usage=usage))

        async def all_events():
            yield first
            async for event in events:
                yield event

        async for event in all_events():
            if isinstance(event, ModelPiece):
                yield _sse(chat_chunk(cid, self.model_name, {"content": event.text}, index=event.index,
                                      with_usage=usage))
            elif isinstance(event, ModelChoice):
                finished[event.index] = event.answer
                yield _sse(chat_chunk(cid, self.model_name, {}, event.answer.finish_reason, event.index,
                                      ChoiceLogprobs.of(event.answer), with_usage=usage))
            elif isinstance(event, ModelError):  # failed after its first piece: the stream ends with the error
                yield _sse(event.exception().body())
                break
        else:
            if usage and finished:
                yield _sse(usage_chunk(cid, self.model_name, [finished[i] for i in sorted(finished)]))
        yield "data: [DONE]\n\n"


def _model_inputs(args: ServeArgs) -> CheckpointInputs | None:
    """The media the served checkpoint's family takes and the size its videos are decoded at, read from its config
    and processor once at start (not asked of the model deployment per request: its queue may be full); None when
    they cannot be read here."""
    from video_llava.model.loading import ModelLoadError, checkpoint_inputs

    try:
        return checkpoint_inputs(args.model)
    except (ModelLoadError, OSError, ValueError) as exc:
        logging.getLogger("ray.serve").warning("inputs of %s unknown to the ingress (videos decoded at a %d-pixel "
                                               "short side): %s", args.model.model, UNKNOWN_FRAME_SHORT_SIDE, exc)
        return None


async def _all_or_none(coroutines) -> list:
    """Run concurrently; the first failure cancels the others (a bad video stops its siblings' fetches)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coroutines]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None  # the first failure, as a plain error the routes map to a status
    return [t.result() for t in tasks]


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
