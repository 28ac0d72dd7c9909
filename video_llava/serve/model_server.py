"""The model deployment: one replica of ``VideoQAModel`` (any registered family) with its continuous-batching engine.

A request's token budget is checked here, once, as it arrives (``VideoQAModel.prepare_conversation``); the engine
then runs it beside the others: it joins the running decode batch at once when there is room (``max_batch_size``
sequences, ``max_batch_tokens`` KV positions), else waits in a bounded queue (``max_waiting``; then 503). Streaming
and whole answers share the batch; a request whose caller went away leaves it before the next decode step.
"""

from __future__ import annotations

import logging
import os
from typing import AsyncIterator

from ray import serve

from video_llava.engine import Failed, Finished, GrammarError, KVBudgetError, QueueFullError, SamplingParams, TextPiece
from video_llava.model.budget import ContextBudgetError
from video_llava.model.pruning import VideoTokenBudgetError
from video_llava.model.families import UnsupportedMediaError
from video_llava.model.prompts import InvalidQuestionError
from video_llava.model.qa_model import PreparedQuestion
from video_llava.serve.config import ServeArgs
from video_llava.serve.protocol import ModelChoice, ModelError, ModelPiece, ModelReply, ModelRequest

log = logging.getLogger("ray.serve")


def budget_error(exc: ContextBudgetError) -> ModelError:
    return ModelError(400, str(exc), "context_length_exceeded", "question")


def failure(exc: BaseException) -> ModelError:
    """A request that failed in the engine (alone: its batch-mates go on)."""
    if isinstance(exc, QueueFullError):
        return ModelError(503, f"the model is at capacity ({exc}); retry shortly", "queue_full")
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return ModelError(503, "the model ran out of memory for this request; retry with fewer frames or tokens",
                          "model_out_of_memory")
    return ModelError(500, f"generation failed: {type(exc).__name__}: {exc}", "generation_failed")


@serve.deployment(name="ModelServer")
class ModelServer:
    """One model replica (the model loads here, in ``__init__``)."""

    def __init__(self, args: ServeArgs):
        from video_llava.engine import Engine
        from video_llava.model.qa_model import VideoQAModel
        from video_llava.serve.metrics import ModelMetrics

        self.args = args
        self.model = VideoQAModel(args.model)
        b = args.batching
        tokens = b.max_batch_tokens
        if tokens == "auto":
            from video_llava.engine.budget import auto_max_tokens, step_bytes

            step = step_bytes(self.model, b.max_num_batched_tokens, b.max_num_vision_frames)  # a step's activations
            tokens = auto_max_tokens(self.model.model, b.kv_memory_share, b.prefix_cache_mb * 2**20 + step)
            log.info("batching.max_batch_tokens: auto gives %d KV positions (%.2f GiB kept for a step's activations)",
                     tokens, step / 2**30)
        self.engine = Engine(self.model, b.max_batch_size, tokens, b.max_waiting, b.prefix_cache_mb,
                             b.preprocess_ahead, b.decode_mode, max_num_batched_tokens=b.max_num_batched_tokens,
                             max_num_vision_frames=b.max_num_vision_frames, attention=b.attention)
        self.metrics = ModelMetrics()
        self.metrics.kv_budget.set(tokens)
        log.info("model ready: %s", self.model.describe())

    def check_health(self) -> None:
        """Serve's health check: a replica whose device failed (a CUDA fault poisons the process) is replaced."""
        self.engine.check_health()

    def describe(self) -> dict:
        return {
            **self.model.describe(),
            "batching": self.args.batching.model_dump(),
            "engine": self.engine.describe(),
            "pid": os.getpid(),
            "feature_cache": self.model.feature_cache.stats(),
            "vision_calls": self.model.vision_calls,
        }

    def recent_batch_sizes(self) -> list[int]:
        """Sequences decoded together in each of the last decode steps."""
        return self.engine.recent_running()

    def _prepare(self, request: ModelRequest) -> PreparedQuestion | ModelError:
        """The one token-budget check of a request (the whole conversation), its media against the family, and
        its prompt."""
        try:
            return self.model.prepare_conversation(request.turns, request.max_new_tokens, request.pruning)
        except ContextBudgetError as exc:
            return budget_error(exc)
        except VideoTokenBudgetError as exc:
            return ModelError(400, str(exc), "video_token_budget_too_small", "video_token_budget")
        except InvalidQuestionError as exc:
            return ModelError(400, str(exc), "invalid_question", "question")
        except UnsupportedMediaError as exc:
            return ModelError(400, str(exc), "unsupported_media", "messages")

    async def _events(self, request: ModelRequest, stream: bool
                      ) -> AsyncIterator[ModelPiece | ModelChoice | ModelReply | ModelError]:
        prepared = self._prepare(request)
        if isinstance(prepared, ModelError):
            yield prepared
            return
        params = SamplingParams(prepared.max_new_tokens, request.temperature, request.top_p, request.seed, request.stop,
                                n=request.n, logprobs=request.logprobs, top_logprobs=request.top_logprobs,
                                top_k=request.top_k, response_format=request.response_format,
                                ignore_eos=self.args.batching.ignore_eos)
        answers: dict[int, Finished] = {}
        try:
            async for event in self.engine.events(prepared, params, stream, request.priority):
                if isinstance(event, TextPiece):
                    yield ModelPiece(event.text, event.index)
                elif isinstance(event, Finished):
                    self.metrics.batch_size.observe(self.engine.running)
                    self.metrics.kv_positions.set(self.engine.kv_positions)
                    self.metrics.generate_latency.observe(event.answer.generate_s)
                    answers[event.index] = event
                    if stream:
                        yield ModelChoice(event.answer, event.index)
                    if len(answers) == params.n:
                        if event.answer.visual_tokens:  # a text-only conversation has none (a counter takes > 0)
                            self.metrics.visual_tokens.inc(event.answer.visual_tokens)
                        ordered = tuple(answers[i].answer for i in range(params.n))
                        yield ModelReply(ordered[0], queue_s=answers[0].queue_s, answers=ordered)
                elif isinstance(event, Failed):
                    yield failure(event.error)
        except QueueFullError as exc:
            yield failure(exc)
        except KVBudgetError as exc:  # larger than the replica's whole KV pool: no retry helps
            yield ModelError(400, str(exc), "context_length_exceeded", "max_tokens")
        except GrammarError as exc:  # compiled where the tokenizer is, once, as the request arrives
            yield ModelError(400, str(exc), "invalid_response_format", "response_format")

    async def answer(self, request: ModelRequest) -> ModelReply | ModelError:
        """The request's answer, or why it was refused. Cancelled (the caller left): it leaves the batch."""
        async for event in self._events(request, stream=False):
            return event
        raise RuntimeError("the engine ended a request without an answer")

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelPiece | ModelChoice | ModelReply | ModelError]:
        """Each choice's text pieces as generated and its ``ModelChoice`` when done, then the ``ModelReply``; or a
        ``ModelError`` (first, or in place of the rest)."""
        async for event in self._events(request, stream=True):
            yield event
