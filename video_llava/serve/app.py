"""Ray Serve application: the model deployment (batched ``generate``) and the typed application builder.

    serve run serve_configs/local.yaml          # or: serve run video_llava.serve.app:build_app
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import defaultdict
from typing import Any, Iterator

from ray import serve
from ray.serve import Application

from video_llava.budget import ContextBudgetError
from video_llava.serve.config import ServeArgs

log = logging.getLogger("ray.serve")


def _error(status: int, message: str, code: str, param: str | None = None) -> dict:
    return {"error": {"status": status, "message": message, "code": code, "param": param}}


def _answer_dict(answer, queued_s: float) -> dict:
    return {
        "text": answer.text,
        "num_frames": answer.num_frames,
        "visual_tokens": answer.visual_tokens,
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "finish_reason": answer.finish_reason,
        "generate_s": answer.generate_s,
        "queue_s": queued_s,
        "vision_cached": answer.vision_cached,
        "vision_s": answer.vision_s,
    }


def _total_frames(item: dict) -> int:
    return sum(clip.shape[0] for clip in item["videos"])


def _token_units(args: ServeArgs) -> int:
    return math.ceil(args.batching.max_batch_visual_tokens / args.batching.max_batch_size)


def _batch_cost(items: list[dict]) -> int:
    """Cost of a batch in visual-token units: the larger of its request count (scaled) and its visual tokens.

    The batch limit is set to ``units x max_batch_size``, so it trips on whichever bound is hit first.
    """
    units = items[0]["token_unit"]
    return max(len(items) * units, sum(item["visual_tokens"] for item in items))


@serve.deployment(name="VideoQAModel")
class VideoQAServer:
    """One model replica. Requests arriving together share one ``generate`` (``@serve.batch``).

    A batch closes at ``max_batch_size`` requests or ``max_batch_visual_tokens`` visual tokens, whichever
    comes first, so a few long videos cannot take a replica out of memory.
    """

    def __init__(self, args: ServeArgs):
        from video_llava.model import VideoQAModel

        self.args = args
        self.model = VideoQAModel(args.model)
        self._answer_batch.set_max_batch_size(_token_units(args) * args.batching.max_batch_size)
        self._answer_batch.set_batch_wait_timeout_s(args.batching.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []  # observed, for tests and metrics
        from video_llava.serve.metrics import ModelMetrics

        self.metrics = ModelMetrics()
        log.info("model ready: %s", self.model.describe())

    def describe(self) -> dict:
        return {
            **self.model.describe(),
            "batching": self.args.batching.model_dump(),
            "pid": os.getpid(),
            "feature_cache": self.model.feature_cache.stats(),
            "vision_calls": self.model.vision_calls,
        }

    def recent_batch_sizes(self) -> list[int]:
        return list(self.batch_sizes[-1000:])

    def check(self, num_frames: int, question: str, max_new_tokens: int | None, num_videos: int = 1) -> dict | None:
        """``None`` when the request fits the context, else the error (used before a stream starts)."""
        try:
            self.model.check_request(num_frames, question, max_new_tokens, num_videos)
        except ContextBudgetError as exc:
            return _error(400, str(exc), "context_length_exceeded", "question")
        return None

    async def answer(self, item: dict) -> dict:
        """Answer one request (``frames``, ``question``, generation options); errors come back as ``{"error": ...}``."""
        try:
            self.model.check_request(_total_frames(item), item["question"], item.get("max_new_tokens"), len(item["videos"]))
        except ContextBudgetError as exc:
            return _error(400, str(exc), "context_length_exceeded", "question")
        item = {
            **item,
            "enqueued_at": time.perf_counter(),
            "token_unit": _token_units(self.args),
            "visual_tokens": _total_frames(item) * self.model.per_frame,
        }
        return await self._answer_batch(item)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, batch_size_fn=_batch_cost)
    async def _answer_batch(self, items: list[dict]) -> list[dict]:
        self.batch_sizes.append(len(items))
        self.metrics.batch_size.observe(len(items))
        started = time.perf_counter()
        # One generate per sampling configuration; VideoQAModel.answer splits further by frame count.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[(item.get("max_new_tokens"), item.get("temperature", 0.0), item.get("top_p", 1.0))].append(i)
        results: list[dict] = [{}] * len(items)
        for (new_tokens, temperature, top_p), members in groups.items():
            try:
                answers = await asyncio.to_thread(
                    self.model.answer,
                    [items[i]["videos"] for i in members],
                    [items[i]["question"] for i in members],
                    max_new_tokens=new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                )
            except ContextBudgetError as exc:  # checked per request already; kept for safety
                answers = [None] * len(members)
                failure = _error(400, str(exc), "context_length_exceeded", "question")
            for i, answer in zip(members, answers):
                if answer is None:
                    results[i] = failure
                    continue
                results[i] = _answer_dict(answer, started - items[i]["enqueued_at"])
                self.metrics.visual_tokens.inc(answer.visual_tokens)
                self.metrics.generate_latency.observe(answer.generate_s)
        return results

    def stream(self, item: dict) -> Iterator[dict]:
        """Token text as generated (``{"delta": str}``), then ``{"done": answer}``; or one ``{"error": ...}``."""
        try:
            for piece in self.model.stream_answer(
                item["videos"], item["question"], item.get("max_new_tokens"), item.get("temperature", 0.0), item.get("top_p", 1.0)
            ):
                if isinstance(piece, str):
                    yield {"delta": piece}
                else:
                    yield {"done": _answer_dict(piece, 0.0)}
        except ContextBudgetError as exc:
            yield _error(400, str(exc), "context_length_exceeded", "question")


def build_app(args: ServeArgs | dict) -> Application:
    """Application builder: ``args`` is the ``args:`` block of a serve config, validated here as ``ServeArgs``."""
    from video_llava.serve.routes import QAIngress

    # Validate explicitly: Serve hands a plain dict to builders whose annotation it cannot resolve.
    args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)

    d = args.deployment
    options: dict[str, Any] = dict(
        ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": d.num_gpus, "resources": dict(d.model_resources)},
        max_ongoing_requests=max(d.max_ongoing_requests, args.batching.max_batch_size),
        max_queued_requests=d.max_queued_requests,
    )
    if d.min_replicas == d.max_replicas:
        options["num_replicas"] = d.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": d.min_replicas,
            "max_replicas": d.max_replicas,
            "target_ongoing_requests": d.target_ongoing_requests,
        }
    model = VideoQAServer.options(**options).bind(args)
    ingress = {"num_cpus": d.ingress_num_cpus, "resources": dict(d.ingress_resources)}
    return QAIngress.options(num_replicas=d.ingress_replicas, ray_actor_options=ingress).bind(model, args)
