"""Serving logic behind the routes: validate, fetch, decode on CPU workers, ask the model deployment, shape replies."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from video_llava.cache import LRUCache, content_key
from video_llava.model.settings import DECODE_SHORT_SIDE
from video_llava.serve.config import ServeArgs
from video_llava.serve.fetch import ByteBudget, fetch_video
from video_llava.serve.metrics import IngressMetrics
from video_llava.serve.protocol import (
    CacheUse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    GenerationOptions,
    ModelError,
    ModelReply,
    ModelRequest,
    QAResponse,
    ServiceError,
    Timings,
    Usage,
    chat_chunk,
    completion_id,
)
from video_llava.video.decode import DecodeOptions, SampledVideo, VideoDecodeError
from video_llava.video.isolated import IsolatedDecoder

RETRY_AFTER_S = "2"
MAX_VIDEOS_PER_REQUEST = 8


class QAService:
    """Everything a request needs between HTTP and the model deployment."""

    def __init__(self, model_handle: Any, args: ServeArgs):
        self.model = model_handle
        self.args = args
        self.limits = args.limits
        self.decoder = IsolatedDecoder(workers=args.deployment.decode_workers, timeout_s=args.limits.decode_timeout_s)
        self.metrics = IngressMetrics()
        # Same bytes + same sampling = same frames: a repeat question skips decoding entirely.
        self.frames_cache = LRUCache(args.deployment.decode_cache_mb * 2**20, lambda v: v.frames.nbytes)
        self.model_name = args.model.model

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
            short_side=DECODE_SHORT_SIDE,
            # checked from the container's header in the decoder, before a frame is decoded
            max_pixels=self.limits.max_video_pixels,
            max_aspect_ratio=self.limits.max_aspect_ratio,
            max_duration_s=self.limits.max_duration_s,
        )
        start = time.perf_counter()
        key = content_key(data, repr(options)) if self.frames_cache.max_bytes else None
        cached = self.frames_cache.get(key) if key else None
        if cached is not None:
            return cached, time.perf_counter() - start, True
        try:
            video = await asyncio.to_thread(self.decoder.decode, data, options)
        except VideoDecodeError as exc:
            reason = exc.reason if exc.code != "invalid_video" else f"could not read the video: {exc.reason}"
            raise ServiceError(422, reason, code=exc.code, param="video")
        elapsed = time.perf_counter() - start
        self.metrics.frames_decoded.inc(video.num_frames)
        self.metrics.decode_latency.observe(elapsed)
        if key:
            self.frames_cache.put(key, video)
        return video, elapsed, False

    async def fetch(self, url: str, budget: ByteBudget | None = None):
        return await fetch_video(url, self.limits, budget)

    # ---- model ----------------------------------------------------------------------------------------------
    @staticmethod
    def _request(videos: list[SampledVideo], question: str, opts: GenerationOptions, new_tokens: int | None) -> ModelRequest:
        return ModelRequest(tuple(video.frames for video in videos), question, new_tokens or opts.max_new_tokens,
                            opts.temperature, opts.top_p)

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
    async def answer(self, data: bytes, question: str, opts: GenerationOptions, fetch_s: float = 0.0) -> QAResponse:
        start = time.perf_counter() - fetch_s
        question = self._check_question(question)
        video, decode_s, decode_cached = await self.decode(data, opts)
        reply = await self._ask_model(self._request([video], question, opts, None))
        return self._qa_response(video, reply, fetch_s, decode_s, start, decode_cached)

    def _qa_response(
        self, video: SampledVideo, reply: ModelReply, fetch_s: float, decode_s: float, start: float, decode_cached: bool
    ) -> QAResponse:
        answer = reply.answer
        described = video.describe()
        return QAResponse(
            answer=answer.text,
            model=self.model_name,
            num_frames=answer.num_frames,
            sampled_indices=described.pop("sampled_indices"),
            timestamps=described.pop("timestamps"),
            finish_reason=answer.finish_reason,
            usage=Usage.of(answer),
            timings=Timings(
                fetch_s=round(fetch_s, 4),
                decode_s=round(decode_s, 4),
                queue_s=round(reply.queue_s, 4),
                vision_s=round(answer.vision_s, 4),
                generate_s=round(answer.generate_s, 4),
                total_s=round(time.perf_counter() - start, 4),
            ),
            cached=CacheUse(decode=decode_cached, vision=answer.vision_cached),
            video=described,
        )

    # ---- /v1/chat/completions --------------------------------------------------------------------------------
    @staticmethod
    def _chat_inputs(request: ChatCompletionRequest) -> tuple[str, list[str]]:
        """The question (text of the last user message) and the video URLs of the conversation, in order."""
        urls: list[str] = []
        question = ""
        for message in request.messages:
            if message.role != "user":
                continue
            if isinstance(message.content, str):
                question = message.content
                continue
            texts = []
            for part in message.content or []:
                if part.type == "video_url":
                    urls.append(part.video_url.url)
                else:
                    texts.append(part.text)
            question = " ".join(t for t in texts if t.strip()) or question
        if not urls:
            raise ServiceError(400, "no video: add a content part {'type': 'video_url', 'video_url': {'url': ...}}", param="messages")
        if len(urls) > MAX_VIDEOS_PER_REQUEST:
            raise ServiceError(
                400, f"{len(urls)} videos in one request; at most {MAX_VIDEOS_PER_REQUEST}", param="messages"
            )
        if not question.strip():
            raise ServiceError(400, "no question: add a text content part to the user message", param="messages")
        return question, urls

    async def _chat_videos(self, request: ChatCompletionRequest) -> tuple[str, list[SampledVideo], float, float, bool]:
        """Fetch and decode every video of the conversation concurrently (videos are placed in order)."""
        question, urls = self._chat_inputs(request)
        question = self._check_question(question)
        self._frames_wanted(request, len(urls))  # the whole message's frame count, before fetching any of it
        budget = ByteBudget(self.limits.max_request_bytes)  # all media of the message together
        fetched = await _all_or_none(self.fetch(url, budget) for url in urls)
        decoded = await _all_or_none(self.decode(f.data, request, len(urls)) for f in fetched)
        videos = [video for video, _, _ in decoded]
        fetch_s = max(f.seconds for f in fetched)
        decode_s = max(seconds for _, seconds, _ in decoded)
        return question, videos, fetch_s, decode_s, all(hit for _, _, hit in decoded)

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        start = time.perf_counter()
        question, videos, fetch_s, decode_s, decode_cached = await self._chat_videos(request)
        reply = await self._ask_model(self._request(videos, question, request, request.new_tokens()))
        qa = self._qa_response(videos[0], reply, fetch_s, decode_s, start, decode_cached)
        extra = {
            "num_frames": qa.num_frames,
            "videos": [{"sampled_indices": [int(i) for i in v.indices], "duration": v.metadata.duration} for v in videos],
            "timings": qa.timings.model_dump(),
            "cached": qa.cached.model_dump(),
        }
        return ChatCompletionResponse.of(completion_id(), self.model_name, qa.answer, qa.finish_reason, qa.usage, extra)

    async def open_stream(self, request: ChatCompletionRequest) -> AsyncIterator[str]:
        """Fetch, decode and start generating; a refusal (fetch, decode or the token budget) is raised here, while
        it can still be a plain HTTP error. Returns the server-sent events of the answer."""
        question, videos, _, _, _ = await self._chat_videos(request)
        events = self.model.options(stream=True).stream.remote(self._request(videos, question, request, request.new_tokens()))
        first = await events.__anext__()
        if isinstance(first, ModelError):
            raise first.exception()
        return self._sse_events(first, events)

    async def _sse_events(self, first: str | ModelReply, events) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
        cid = completion_id()
        yield _sse(chat_chunk(cid, self.model_name, {"role": "assistant", "content": ""}))
        finish = "stop"

        async def all_events():
            yield first
            async for event in events:
                yield event

        async for event in all_events():
            if isinstance(event, str):
                yield _sse(chat_chunk(cid, self.model_name, {"content": event}))
            elif isinstance(event, ModelReply):
                finish = event.answer.finish_reason
        yield _sse(chat_chunk(cid, self.model_name, {}, finish_reason=finish))
        yield "data: [DONE]\n\n"


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
