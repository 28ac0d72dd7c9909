"""The engine's output side, as vLLM v1's output processor: each row's sampled token becomes what its request's owner
sees: the text so far (incremental detokenization), stop strings, logprobs, and the events ``TextPiece``,
``Finished`` and ``Failed``."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from video_llava.engine.blocks import BlockTable
from video_llava.engine.detokenize import Detokenizer
from video_llava.engine.events import Event, Failed, Finished, TextPiece
from video_llava.engine.grammar import Grammars
from video_llava.engine.logprobs import TokenBytes, spelled
from video_llava.engine.params import SamplingParams
from video_llava.engine.sampler import Raw
from video_llava.engine.model_api import QAModel
from video_llava.model.answers import PreparedQuestion
from video_llava.model.stops import StreamedText, stopped_at

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    """A submitted request: its ``n`` answers are generated as the rows of one prefill."""

    id: int
    prepared: PreparedQuestion
    params: SamplingParams
    emit: Callable[[Event], None]
    submitted: float
    streamed: bool  # its owner wants TextPiece events
    priority: int = 0  # lower first (as vLLM's)
    cancelled: bool = False
    unfinished: int = 0  # answers still being generated, once prefilled
    failed: bool = False
    bypassed: int = 0  # times a later request was admitted past it
    ahead: Any = None  # what was made ahead for it while it waited (``ahead.Ahead``)
    grammar: str | None = None  # its response format compiled (structured output)

    @property
    def rows(self) -> int:
        return self.params.n

    @property
    def prompt_positions(self) -> int:
        """KV positions its prompt takes (text and media), which its prefill needs from the pool."""
        return self.prepared.prompt_tokens + self.prepared.visual_tokens

    @property
    def longest(self) -> int:
        """KV positions each of its rows may come to hold: prompt, media and every new token."""
        return self.prompt_positions + self.prepared.max_new_tokens


@dataclass(eq=False)
class Row:
    """One answer being generated: a row of the running batch."""

    request: Request
    index: int
    started: float
    cached: bool
    vision_s: float
    stream: int = 0  # its random stream (sampled rows): the request's seed + its index, else drawn at random
    tokens: list[int] = field(default_factory=list)
    logprobs: list[Raw] = field(default_factory=list)  # asked for: per token
    text: StreamedText | None = None
    detokenizer: Detokenizer | None = None  # streamed or with stop strings: its text so far
    matcher: Any = None  # structured output: its grammar's state, which every token it samples advances
    kv: BlockTable = field(default_factory=BlockTable)  # its KV's blocks in the pool

    @property
    def order(self) -> tuple[int, int, int]:
        """Its place in the engine's order (earlier first; the last is preempted first): priority, arrival, answer."""
        return self.request.priority, self.request.id, self.index


class StepWork(NamedTuple):
    """What one step of the engine computed, and when it began."""

    rows: int  # decode rows (each running sequence's next token)
    prompt_tokens: int  # prompt positions prefilled
    frames: int  # frames through the vision tower
    started: float  # time.perf_counter() at its start: the gaps between steps are the running streams' token gaps


@dataclass
class EngineStats:
    steps: int = 0  # decode steps run
    prefills: int = 0
    max_running: int = 0  # most sequences decoded in one step
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    prefix_hits: int = 0  # prefills that reused a cached prefix
    kv_positions: int = 0  # most KV positions the pool's blocks in use held after a step (prefixes cached included)
    preempted: int = 0  # rows and prefills preempted (their KV freed, recomputed later) when the pool ran out
    running_per_step: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))  # rows
    work_per_step: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))  # StepWork


class Outputs:
    """Tokens to events for one engine: ``live`` holds the requests not yet finished, failed or dropped."""

    def __init__(self, qa: QAModel, stats: EngineStats, live: dict[int, Request], grammars: Grammars):
        self.qa, self.tokenizer, self.stats, self.live, self.grammars = qa, qa.tokenizer, stats, live, grammars
        self.eos = qa.eos_token_ids
        self.token_bytes = TokenBytes(self.tokenizer)

    def sequence(self, request: Request, index: int, started: float, cached: bool, vision_s: float,
                 stream: int) -> Row:
        """A new row of ``request`` (its answer ``index``), with its own grammar state under structured output."""
        p = request.params
        wants_text = request.streamed or bool(p.stop)
        return Row(request, index, started, cached, vision_s, stream, text=StreamedText(p.stop),
                   detokenizer=Detokenizer(self.tokenizer, self.eos) if wants_text else None,
                   matcher=self.grammars.matcher(request.grammar) if request.grammar else None)

    def sampled(self, seq: Row, token: int | Exception, raw: Raw | None) -> bool:
        """A row's sampled token (or its sampling's error: its request fails alone): whether the row leaves."""
        if isinstance(token, Exception):
            log.warning("sampling failed for request %d: %s", seq.request.id, token)
            self.fail(seq.request, token)
            return True
        try:
            return self.append(seq, token, raw)
        except Exception as exc:  # a stop string, a tokenizer, an owner's callback: that request alone
            log.exception("finishing a token failed for request %d", seq.request.id)
            self.fail(seq.request, exc)
            return True

    def append(self, seq: Row, token: int, raw: Raw | None) -> bool:
        """Add a generated token (``raw``: its logprobs, when asked for), stream the new text, finish the sequence
        if it ended; whether it ended."""
        request, p = seq.request, seq.request.params
        seq.tokens.append(token)
        if request.cancelled or request.failed:  # cancelled during this step: it leaves now
            if request.cancelled:
                self.cancelled(request)
            return True
        if p.logprobs and raw is not None:
            seq.logprobs.append(raw)
        complete = False
        if seq.matcher is not None:  # the token was allowed: the grammar takes it (else the mask was wrong)
            if not seq.matcher.consume_token(token):
                raise RuntimeError(f"the response format's grammar refused token {token}: "
                                   f"{seq.matcher.get_error()}")
            complete = seq.matcher.is_stopped()  # nothing may follow: the answer is done
        eos = token in self.eos and not p.ignore_eos
        piece, stopped = "", False
        if seq.detokenizer is not None:  # the text so far: what to stream, whether a stop string appeared
            text = seq.detokenizer.add(token)
            piece = seq.text.update(text) if request.streamed else ""
            stopped = stopped_at(text, p.stop) is not None
        if not (eos or stopped or complete or len(seq.tokens) >= p.max_new_tokens):
            if piece:
                request.emit(TextPiece(piece, seq.index))
            return False
        answer = self.qa.answer_from_tokens(request.prepared, seq.tokens, time.perf_counter() - seq.started,
                                            seq.cached, seq.vision_s, p.stop)
        if complete:
            answer = dataclasses.replace(answer, finish_reason="stop")
        if p.ignore_eos:
            answer = dataclasses.replace(answer, completion_tokens=len(seq.tokens))
        if p.logprobs:
            answer = dataclasses.replace(answer, logprobs=spelled(self.token_bytes, seq.tokens, seq.logprobs))
        piece += seq.text.finish(answer.text) if request.streamed else ""
        if piece:
            request.emit(TextPiece(piece, seq.index))
        self.stats.finished += 1
        request.unfinished -= 1
        if request.unfinished == 0:
            self.live.pop(request.id, None)
        request.emit(Finished(answer, seq.started - request.submitted, seq.index))
        return True

    def fail(self, request: Request, exc: BaseException) -> None:
        """The request fails (once): its owner gets ``Failed``."""
        if request.failed:
            return
        request.failed = True
        self.stats.failed += 1
        self.live.pop(request.id, None)
        try:
            request.emit(Failed(exc))
        except Exception:  # its owner is gone (its event loop closed): nothing is left to tell
            log.warning("request %d failed and its owner could not be told", request.id)

    def cancelled(self, request: Request) -> None:
        """A request cancelled before it produced anything more: dropped, counted once."""
        if self.live.pop(request.id, None) is not None:
            self.stats.cancelled += 1
