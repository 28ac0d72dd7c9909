"""The model deployment: one replica of ``VideoQAModel`` (any registered family); requests that arrive together share one ``generate``.

A request's token budget is checked here, once, as it arrives (``VideoQAModel.prepare``); the batch then runs
the prepared questions. A batch closes at ``max_batch_size`` requests or ``max_batch_visual_tokens`` visual
tokens, whichever comes first, so a few long videos cannot take a replica out of memory.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

from ray import serve

from video_llava.model.budget import ContextBudgetError
from video_llava.model.families import UnsupportedMediaError
from video_llava.model.prompts import InvalidQuestionError
from video_llava.model.qa_model import PreparedQuestion
from video_llava.serve.config import BatchSettings, ServeArgs
from video_llava.serve.protocol import ModelError, ModelReply, ModelRequest

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class BatchLimit:
    """When a batch closes: at ``max_requests`` requests or ``max_visual_tokens`` visual tokens, whichever first.

    Serve's ``batch_size_fn`` sums one number per request against one capacity, so each request costs its visual
    tokens but at least one request's share of the token limit: short videos fill a batch by count, long ones by
    tokens.
    """

    max_requests: int
    max_visual_tokens: int

    @classmethod
    def of(cls, batching: BatchSettings) -> "BatchLimit":
        return cls(batching.max_batch_size, batching.max_batch_visual_tokens)

    @property
    def share(self) -> int:
        return math.ceil(self.max_visual_tokens / self.max_requests)

    @property
    def capacity(self) -> int:
        return self.share * self.max_requests

    def cost(self, visual_tokens: int) -> int:
        return max(visual_tokens, self.share)

    def fits(self, visual_tokens: list[int]) -> bool:
        """Whether requests of these visual-token counts may share one ``generate``."""
        return sum(self.cost(n) for n in visual_tokens) <= self.capacity


@dataclass(frozen=True)
class QueuedRequest:
    """A checked request waiting for its batch."""

    request: ModelRequest
    prepared: PreparedQuestion
    cost: int  # BatchLimit.cost of its visual tokens
    enqueued_at: float


def _batch_cost(items: list[QueuedRequest]) -> int:
    return sum(item.cost for item in items)


def budget_error(exc: ContextBudgetError) -> ModelError:
    return ModelError(400, str(exc), "context_length_exceeded", "question")


@serve.deployment(name="ModelServer")
class ModelServer:
    """One model replica (the model loads here, in ``__init__``)."""

    def __init__(self, args: ServeArgs):
        from video_llava.model.qa_model import VideoQAModel
        from video_llava.serve.metrics import ModelMetrics

        self.args = args
        self.model = VideoQAModel(args.model)
        self.limit = BatchLimit.of(args.batching)
        longest = args.model.max_frames * self.model.per_frame
        if self.limit.max_visual_tokens < longest:  # ServeArgs checked this with the recipe's 144; now the real count
            raise ValueError(f"batching.max_batch_visual_tokens={self.limit.max_visual_tokens} cannot hold one video of "
                             f"max_frames={args.model.max_frames} ({longest} tokens at {self.model.per_frame} per frame)")
        self._answer_batch.set_max_batch_size(self.limit.capacity)
        self._answer_batch.set_batch_wait_timeout_s(args.batching.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []  # observed, for tests and metrics
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

    def _prepare(self, request: ModelRequest) -> PreparedQuestion | ModelError:
        """The one token-budget check of a request (the whole conversation), its media against the family, and
        its prompt."""
        try:
            return self.model.prepare_conversation(request.turns, request.max_new_tokens)
        except ContextBudgetError as exc:
            return budget_error(exc)
        except InvalidQuestionError as exc:
            return ModelError(400, str(exc), "invalid_question", "question")
        except UnsupportedMediaError as exc:
            return ModelError(400, str(exc), "unsupported_media", "messages")

    async def answer(self, request: ModelRequest) -> ModelReply | ModelError:
        """The request's answer once its batch has run, or why it was refused."""
        prepared = self._prepare(request)
        if isinstance(prepared, ModelError):
            return prepared
        queued = QueuedRequest(request, prepared, self.limit.cost(prepared.visual_tokens), time.perf_counter())
        return await self._answer_batch(queued)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, batch_size_fn=_batch_cost)
    async def _answer_batch(self, items: list[QueuedRequest]) -> list[ModelReply]:
        self.batch_sizes.append(len(items))
        self.metrics.batch_size.observe(len(items))
        started = time.perf_counter()
        # One generate per sampling configuration (videos of any frame count share it); a seeded sampled request
        # runs alone, so that its answer depends on its seed only, not on what it was batched with.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            r = item.request
            alone = i if r.seed is not None and r.temperature > 0 else None
            groups[(item.prepared.max_new_tokens, r.temperature, r.top_p, r.stop, r.seed, alone)].append(i)
        replies: list[ModelReply | None] = [None] * len(items)
        for (_, temperature, top_p, stop, seed, _), members in groups.items():
            answers = await asyncio.to_thread(self.model.generate, [items[i].prepared for i in members],
                                              temperature, top_p, seed, stop)
            for i, answer in zip(members, answers):
                replies[i] = ModelReply(answer, queue_s=started - items[i].enqueued_at)
                self.metrics.visual_tokens.inc(answer.visual_tokens)
                self.metrics.generate_latency.observe(answer.generate_s)
        return replies

    def stream(self, request: ModelRequest) -> Iterator[str | ModelReply | ModelError]:
        """Text pieces as generated, then the ``ModelReply``; or only a ``ModelError``."""
        prepared = self._prepare(request)
        if isinstance(prepared, ModelError):
            yield prepared
            return
        for piece in self.model.stream(prepared, request.temperature, request.top_p, request.seed, request.stop):
            yield piece if isinstance(piece, str) else ModelReply(piece)
