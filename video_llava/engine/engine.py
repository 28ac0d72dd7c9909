"""Continuous batching over a loaded ``VideoQAModel``: requests join the running decode batch between steps and
leave when done.

Written by hand, over the model's own ``forward`` and transformers' cache classes (``kv.py``, ``slot_cache.py``;
prompts in ``prefill.py``): transformers' continuous batching (``ContinuousBatchingManager``, paged attention)
takes ``input_ids`` only, and our requests arrive as embeddings with their vision features spliced in
(transformers#43386 and #46376 are open). No attention kernel is written here.

One thread runs the loop: admit waiting requests that fit (one vision pass for all their media not cached, then
each prefilled alone, unpadded, so its first token comes at once), then one decode step for every running sequence
(each row's KV in a slot of one buffer per layer, written in place at one index for all rows, the mask marking real
positions, as ``generate`` with a padded batch; a row joining or leaving copies that row only).
Greedy rows give the tokens of one-at-a-time ``generate`` (float32 on CPU: token-identical, tested). A request that
fails in its prefill fails alone; one that is cancelled leaves the batch before the next step; a decode step that
raises is run again in halves until the rows that fail alone are found (only those requests fail; an out-of-memory
step fails nobody). A request of ``n`` answers is prefilled once and forked into ``n`` rows; a prompt whose prefix
(up to its last visual token) was seen before prefills only the rest (``prefix.py``). With ``preprocess_ahead``
a second thread makes the waiting requests' media ready (``ahead.py``: processor and vision tower, one pass for
those it takes together) while the loop decodes: the loop's own work per request is its prefill and its share of
the steps.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from video_llava.engine.ahead import Ahead, MediaAhead
from video_llava.engine.compiled import DECODE_MODES, DecodeMode, compiled_steps
from video_llava.engine.detokenize import Detokenizer
from video_llava.engine.events import Event, Failed, Finished, TextPiece
from video_llava.engine.kv import BatchKV
from video_llava.engine.logprobs import TokenBytes, spelled
from video_llava.engine.params import SamplingParams
from video_llava.engine.prefill import Forward, Plan, Prefiller
from video_llava.engine.prefix import PrefixCache
from video_llava.engine.sampler import Raw, RowDraw, new_stream, sample
from video_llava.model.media_embeds import MediaFeatures
from video_llava.model.qa_model import Answer, PreparedQuestion, VideoQAModel
from video_llava.model.stops import StreamedText, first_stop

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """More requests are waiting than the engine keeps; retry later."""


class EngineClosedError(RuntimeError):
    """The engine was closed before the request finished."""


@dataclass(eq=False)
class _Request:
    """A submitted request: its ``n`` answers are generated as sequences of one prefill."""

    id: int
    prepared: PreparedQuestion
    params: SamplingParams
    emit: Callable[[Event], None]
    submitted: float
    streamed: bool  # its owner wants TextPiece events
    cancelled: bool = False
    unfinished: int = 0  # answers still being generated, once prefilled
    failed: bool = False
    ahead: Ahead = field(default_factory=Ahead)  # its plan and media features, made while it waits

    @property
    def longest(self) -> int:
        """KV positions each of its sequences may come to hold: prompt, media and every new token."""
        p = self.prepared
        return p.prompt_tokens + p.visual_tokens + p.max_new_tokens


@dataclass(eq=False)
class _Sequence:
    """One answer being generated: a row of the running batch."""

    request: _Request
    index: int
    started: float
    cached: bool
    vision_s: float
    stream: int = 0  # its random stream (sampled rows): the request's seed + its index, else drawn at random
    tokens: list[int] = field(default_factory=list)
    logprobs: list[Raw] = field(default_factory=list)  # asked for: per token
    text: StreamedText | None = None
    detokenizer: Detokenizer | None = None  # streamed or with stop strings: its text so far


@dataclass
class EngineStats:
    steps: int = 0  # decode steps run
    prefills: int = 0
    max_running: int = 0  # most sequences decoded in one step
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    prefix_hits: int = 0  # prefills that reused a cached prefix
    split_steps: int = 0  # decode steps that raised and were run again in halves
    kv_positions: int = 0  # most KV positions (row slots x positions) the running batch's buffers held
    running_per_step: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))


class Engine:
    """Continuous batching for one model. Thread-safe; ``events``/``answer`` for asyncio callers, ``generate`` and
    ``stream`` for plain ones.

    ``max_running``: sequences decoded together; ``max_tokens``: KV positions their buffers may hold (row slots x
    positions, each row given room for the longest row's prompt + visual + ``max_new_tokens`` and ``kv.RESERVE``;
    ``BatchKV.positions_after``; one request larger than that still runs, alone); ``max_waiting``: requests
    queued behind them before ``submit`` raises ``QueueFullError``; ``prefix_cache_mb``: KV of prompt prefixes kept
    for repeat questions (``prefix.PrefixCache``; 0: none); ``preprocess_ahead``: waiting requests whose media are
    made ready ahead, in a thread of its own, while the loop computes (0: in the loop, at admission): the processor
    resizes and normalises them and the vision tower runs once for all of them taken together (the features each
    gets alone, tested). On a CPU that work runs beside the decode steps instead of between them. ``decode_mode``:
    ``dynamic``, ``static`` or ``compiled`` decode steps (``compiled.py``; the same tokens).
    """

    def __init__(self, qa: VideoQAModel, max_running: int = 8, max_tokens: int = 1 << 20, max_waiting: int = 256,
                 prefix_cache_mb: int = 0, preprocess_ahead: int = 0, decode_mode: DecodeMode = "dynamic"):
        if min(max_running, max_tokens, max_waiting) < 1:
            raise ValueError(f"max_running, max_tokens and max_waiting must be >= 1 (got {max_running}, {max_tokens}, "
                             f"{max_waiting})")
        self.qa, self.model, self.tokenizer = qa, qa.model, qa.tokenizer
        self.max_running, self.max_tokens, self.max_waiting = max_running, max_tokens, max_waiting
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}, got {decode_mode!r}")
        self.decode_mode = decode_mode
        self.eos = qa.eos_token_ids
        self._token_bytes = TokenBytes(self.tokenizer)
        self.prefix_cache = PrefixCache(prefix_cache_mb * 2**20)
        self.stats = EngineStats()
        self._forward = Forward(self.model)
        self._prefiller = Prefiller(qa, self._forward, self.prefix_cache)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Sequence] = []
        self._live: dict[int, _Request] = {}  # submitted and not yet finished, failed or dropped
        self._kv = self._new_kv()
        self._step_logits = self._forward.step_logits if decode_mode != "compiled" else compiled_steps(self._forward)
        # flash-attention takes a padding mask (rows x positions); sdpa and eager the 4-D mask built per step
        self._four_d_mask = getattr(self.model.config, "_attn_implementation", "sdpa") != "flash_attention_2"
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._ahead = MediaAhead(self._prefiller, preprocess_ahead, self._cond, self._waiting, lambda: self._closed)

    # ---- submitting --------------------------------------------------------------------------------------------
    def submit(self, prepared: PreparedQuestion, params: SamplingParams, emit: Callable[[Event], None],
               stream: bool = True) -> int:
        """Queue a request; ``emit`` receives its events on the engine's thread (it must not block); with
        ``stream=False`` only ``Finished`` or ``Failed``. Returns the request's id."""
        request = _Request(next(self._ids), prepared, params, emit, time.perf_counter(), stream)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting for the model")
            self._waiting.append(request)
            self._live[request.id] = request
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
                self._thread.start()
            self._ahead.start()
            self._cond.notify_all()
        return request.id

    def cancel(self, request_id: int) -> None:
        """Stop a request: it leaves the batch before the next decode step and emits nothing more."""
        with self._cond:
            request = self._live.get(request_id)
            if request is not None:
                request.cancelled = True
            self._cond.notify_all()

    async def events(self, prepared: PreparedQuestion, params: SamplingParams, stream: bool = True
                     ) -> AsyncIterator[Event]:
        """The request's events as an async iterator; leaving the iteration early (or being cancelled) cancels it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        request_id = self.submit(prepared, params, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event),
                                 stream)
        done, left = False, params.n
        try:
            while not done:
                event = await queue.get()
                left -= isinstance(event, Finished)
                done = isinstance(event, Failed) or left == 0
                yield event
        finally:
            if not done:
                self.cancel(request_id)

    def stream(self, prepared: PreparedQuestion, params: SamplingParams) -> Iterator[str | Answer]:
        """Text pieces, then the ``Answer`` (an error of the request is raised); one answer (``n=1``)."""
        import queue as queue_

        _one_answer(params)
        events: queue_.SimpleQueue[Event] = queue_.SimpleQueue()
        request_id = self.submit(prepared, params, events.put)
        try:
            while True:
                event = events.get()
                if isinstance(event, TextPiece):
                    yield event.text
                elif isinstance(event, Finished):
                    yield event.answer
                    return
                else:
                    raise event.error
        finally:
            self.cancel(request_id)

    def run(self, prepared: Sequence[PreparedQuestion], params: SamplingParams | Sequence[SamplingParams]
            ) -> list[tuple[Answer, ...] | BaseException]:
        """Each request's ``n`` answers (in order) or the error it failed with; submitted together, batched as they
        fit."""
        import queue as queue_

        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prepared)
        done: queue_.SimpleQueue[tuple[int, Event]] = queue_.SimpleQueue()
        with self._cond:  # all queued before the loop looks: admitted together as far as they fit
            for i, (p, sp) in enumerate(zip(prepared, params)):
                self.submit(p, sp, lambda event, i=i: done.put((i, event)), stream=False)
        answers: list[dict[int, Answer]] = [{} for _ in prepared]
        results: list[tuple[Answer, ...] | BaseException | None] = [None] * len(prepared)
        while any(r is None for r in results):
            i, event = done.get()
            if results[i] is not None:
                continue  # already failed
            if isinstance(event, Failed):
                results[i] = event.error
                continue
            answers[i][event.index] = event.answer
            if len(answers[i]) == params[i].n:
                results[i] = tuple(answers[i][k] for k in range(params[i].n))
        return results

    def generate(self, prepared: Sequence[PreparedQuestion], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[Answer]:
        """The first answer of each request (``run``); the first error is raised."""
        results = self.run(prepared, params)
        error = next((r for r in results if isinstance(r, BaseException)), None)
        if error is not None:
            raise error
        return [r[0] for r in results]

    def close(self) -> None:
        """Stop the loop; requests not finished get ``Failed(EngineClosedError)``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._ahead.join(timeout=60)

    @property
    def running(self) -> int:
        """Sequences in the running batch now."""
        return len(self._running)

    @property
    def kv_positions(self) -> int:
        """KV positions (row slots x positions) the running batch's buffers hold now."""
        return self._kv.positions

    def describe(self) -> dict:
        s = self.stats
        return {"max_running": self.max_running, "max_tokens": self.max_tokens, "max_waiting": self.max_waiting,
                "running": len(self._running), "waiting": len(self._waiting), "steps": s.steps,
                "prefills": s.prefills, "most_running_in_a_step": s.max_running, "finished": s.finished,
                "cancelled": s.cancelled, "failed": s.failed, "prefix_hits": s.prefix_hits,
                "vision_ahead": self._ahead.made, "split_steps": s.split_steps, "kv_positions": s.kv_positions,
                "prefix_cache": self.prefix_cache.stats()}

    def recent_running(self) -> list[int]:
        """Sequences in each of the last (up to 1000) decode steps."""
        with self._cond:
            return list(self.stats.running_per_step)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._running or (self._waiting and self._ahead.ready(self._waiting[0]))):
                    self._cond.wait()
                if self._closed:
                    break
                admitted = self._admissible()
            try:
                self._drop_cancelled()
                self._prefill_all(admitted)
                if self._running:
                    self._step()
            except Exception as exc:  # not one request's fault (those fail alone): the running ones fail, it goes on
                log.exception("the engine loop failed with %d sequences running", len(self._running))
                for seq in self._running:
                    self._fail(seq.request, exc)
                self._running, self._kv = [], self._new_kv()
        error = EngineClosedError("the engine was closed")
        for request in list(self._waiting) + [seq.request for seq in self._running]:
            self._fail(request, error)

    def _admissible(self) -> list[_Request]:
        """Waiting requests (in arrival order) that fit beside the running ones; called holding the lock."""
        admitted: list[_Request] = []
        longest = max((s.request.longest for s in self._running), default=0)
        rows = len(self._running)
        while self._waiting:
            request = self._waiting[0]
            if request.cancelled:
                self._waiting.popleft()
                self._live.pop(request.id, None)
                self.stats.cancelled += 1
                continue
            if not self._ahead.ready(request):
                break  # its media are being made ready: it joins at a later step (the batch decodes meanwhile)
            n, longer = request.params.n, max(longest, request.longest)
            if rows and (rows + n > self.max_running or self._kv.positions_after(rows + n, longer) > self.max_tokens):
                break  # first come, first served: it waits for room rather than being overtaken
            admitted.append(self._waiting.popleft())
            longest, rows = longer, rows + n
        if admitted and self._ahead.limit:
            self._cond.notify_all()  # room ahead: the preprocessing thread may go on
        return admitted

    def _drop_cancelled(self) -> None:
        gone = [i for i, s in enumerate(self._running) if s.request.cancelled]
        if gone:
            for i in gone:
                if self._live.pop(self._running[i].request.id, None) is not None:
                    self.stats.cancelled += 1
            self._leave(gone)

    def _leave(self, rows: list[int]) -> None:
        """Rows ``rows`` leave the batch (the KV moves the last rows into their slots; the sequences follow)."""
        order = self._kv.remove(rows)
        self._running = [self._running[i] for i in order]
        if not self._kv.rows and (self.decode_mode == "dynamic" or self._kv.positions > self.max_tokens):
            # the buffers go, to be sized for the next rows; static steps keep theirs (CUDA graphs keep reading the
            # same addresses) unless a request larger than the budget made them
            self._kv = self._new_kv()

    def _prefill_all(self, admitted: list[_Request]) -> None:
        """Prefill the admitted requests one by one, after one vision pass for all of their media not cached (nor
        made ahead)."""
        plans: list[Plan | None] = []
        for request in admitted:
            try:
                made = request.ahead.plan
                plans.append(self._prefiller.fetch(made) if made is not None
                             else self._prefiller.plan(request.prepared))
            except Exception as exc:  # its prompt cannot be tokenized or expanded: it fails alone
                log.warning("prefill failed: %s: %s", type(exc).__name__, exc)
                self._fail(request, exc)
                plans.append(None)
        need = [r for r, plan in zip(admitted, plans)
                if plan is not None and plan.prefix is None and r.ahead.features is None]
        shared = self._prefiller.shared_features([r.prepared for r in need])
        features = dict(zip((r.id for r in need), shared)) if shared is not None else {}
        for request, plan in zip(admitted, plans):
            if plan is not None:
                made = request.ahead.features
                self._prefill(request, plan, made if made is not None else features.get(request.id))
            request.ahead.plan = request.ahead.features = None  # used: their memory goes

    def _prefill(self, request: _Request, plan: Plan, features: MediaFeatures | None) -> None:
        """Prefill one request alone; the first token of each of its ``n`` answers, which join the batch (one
        copy of the prefill's KV each) unless already done."""
        started = time.perf_counter()
        p = request.params
        try:
            done = self._prefiller.run(request.prepared, plan, features)
            logits = done.logits
            self.stats.prefix_hits += done.prefix_hit
            wants_text = request.streamed or bool(p.stop)
            forks = [_Sequence(request, i, started, done.cached, done.vision_s,
                               new_stream(None if p.seed is None else p.seed + i), text=StreamedText(p.stop),
                               detokenizer=Detokenizer(self.tokenizer, self.eos) if wants_text else None)
                     for i in range(p.n)]
            first = sample(logits.expand(p.n, -1), [RowDraw(p, seq.stream, 0) for seq in forks])
            error = next((c for c in first.tokens if isinstance(c, Exception)), None)
            if error is not None:
                raise error
        except Exception as exc:  # this request alone: out of memory for its size, a bad input that got through
            log.warning("prefill failed: %s: %s", type(exc).__name__, exc)
            self._fail(request, exc)
            return
        self.stats.prefills += 1
        request.unfinished = p.n
        try:
            going = [seq for seq, token, raw in zip(forks, first.tokens, first.logprobs)
                     if not self._append(seq, token, raw)]
            if going:
                self._kv.add(done.cache, len(plan.ids), copies=len(going))
                self._running.extend(going)
        except Exception as exc:  # its rows already in the batch leave at the next step (``failed``)
            log.exception("first token failed")
            self._fail(request, exc)

    def _step(self) -> None:
        """One decode step: every running sequence gets its next token; finished ones leave the batch."""
        import torch

        rows = self._running
        self.stats.steps += 1
        self.stats.max_running = max(self.stats.max_running, len(rows))
        with self._cond:  # read by other threads (recent_running): a deque must not change while they copy it
            self.stats.running_per_step.append(len(rows))
        parts = self._isolated_decode(self._kv, rows)
        if len(parts) != 1 or parts[0][1] is not rows:  # the step was split: the rows that survived, rejoined
            self._kv, rows = self._new_kv(), []
            for kv, part, _ in parts:
                self._kv.extend(kv)
                rows += part
            self._running = rows
        if not rows:
            return
        self.stats.kv_positions = max(self.stats.kv_positions, self._kv.positions)
        logits = parts[0][2] if len(parts) == 1 else torch.cat([p[2] for p in parts])
        step = sample(logits, [RowDraw(s.request.params, s.stream, len(s.tokens)) for s in rows])
        done = [i for i, (seq, token, raw) in enumerate(zip(rows, step.tokens, step.logprobs))
                if self._failed_alone(seq, token) or self._appended_alone(seq, token, raw)]
        if done:
            self._leave(done)

    def _new_kv(self) -> BatchKV:
        return BatchKV(static=self.decode_mode != "dynamic", max_slots=self.max_running)

    def _decode(self, kv: BatchKV, rows: list[_Sequence]) -> Any:
        """Logits of one decode step over ``rows`` (their KV ``kv``, advanced; as it was if the step raises)."""
        import torch

        mask, positions = kv.step_inputs(self.model.dtype, self._four_d_mask)
        tokens = [s.tokens[-1] for s in rows]
        tokens += tokens[-1:] * (mask.shape[0] - len(tokens))  # static: the bucket's empty slots compute a copy
        ids = torch.tensor(tokens, device=self.model.device).unsqueeze(1)
        try:
            with torch.inference_mode():
                logits = self._step_logits(ids, mask, kv.cache, positions)
        except BaseException:
            kv.crop()  # what the failed step wrote is not real (and is overwritten by the next)
            raise
        kv.advance()
        return logits[:len(rows)]

    def _isolated_decode(self, kv: BatchKV, rows: list[_Sequence]) -> list[tuple[BatchKV, list[_Sequence], Any]]:
        """``_decode``, and if it fails, the same step in halves until the rows that fail alone are found: those
        requests fail, the others go on (an out-of-memory step succeeds in smaller parts: nobody fails). The parts
        that ran: (KV, rows, logits)."""
        try:
            return [(kv, rows, self._decode(kv, rows))]
        except Exception as exc:
            if len(rows) == 1:
                log.warning("decode step failed for request %d: %s: %s", rows[0].request.id, type(exc).__name__, exc)
                self._fail(rows[0].request, exc)
                return []
            log.warning("decode step of %d sequences failed (%s: %s): retrying in halves", len(rows),
                        type(exc).__name__, exc)
            self.stats.split_steps += 1
        half = len(rows) // 2
        second = kv.take(range(half, len(rows)))
        kv.keep(range(half))
        return self._isolated_decode(kv, rows[:half]) + self._isolated_decode(second, rows[half:])

    def _failed_alone(self, seq: _Sequence, token: int | Exception) -> bool:
        """Whether the row's sampling failed (non-finite probabilities): its request fails alone."""
        if isinstance(token, Exception):
            log.warning("sampling failed for request %d: %s", seq.request.id, token)
            self._fail(seq.request, token)
            return True
        return False

    def _appended_alone(self, seq: _Sequence, token: int, raw: Raw | None) -> bool:
        """``_append``; an error there (a stop string, a tokenizer, an owner's callback) fails that request alone."""
        try:
            return self._append(seq, token, raw)
        except Exception as exc:
            log.exception("finishing a token failed for request %d", seq.request.id)
            self._fail(seq.request, exc)
            return True

    def _append(self, seq: _Sequence, token: int, raw: Raw | None) -> bool:
        """Add a generated token (``raw``: its logprobs, when asked for), stream the new text, finish the sequence
        if it ended; whether it ended."""
        request, p = seq.request, seq.request.params
        seq.tokens.append(token)
        if request.cancelled or request.failed:  # cancelled during this step: it leaves now
            if request.cancelled and self._live.pop(request.id, None) is not None:
                self.stats.cancelled += 1
            return True
        if p.logprobs and raw is not None:
            seq.logprobs.append(raw)
        eos = token in self.eos and not p.ignore_eos
        piece, stopped = "", False
        if seq.detokenizer is not None:  # the text so far: what to stream, whether a stop string appeared
            text = seq.detokenizer.add(token)
            piece = seq.text.update(text) if request.streamed else ""
            stopped = first_stop(text, p.stop) is not None
        if not (eos or stopped or len(seq.tokens) >= p.max_new_tokens):
            if piece:
                request.emit(TextPiece(piece, seq.index))
            return False
        answer = self.qa.answer_from_tokens(request.prepared, seq.tokens, time.perf_counter() - seq.started,
                                            seq.cached, seq.vision_s, p.stop)
        if p.ignore_eos:
            answer = dataclasses.replace(answer, completion_tokens=len(seq.tokens))
        if p.logprobs:
            answer = dataclasses.replace(answer, logprobs=spelled(self._token_bytes, seq.tokens, seq.logprobs))
        piece += seq.text.finish(answer.text) if request.streamed else ""
        if piece:
            request.emit(TextPiece(piece, seq.index))
        self.stats.finished += 1
        request.unfinished -= 1
        if request.unfinished == 0:
            self._live.pop(request.id, None)
        request.emit(Finished(answer, seq.started - request.submitted, seq.index))
        return True

    def _fail(self, request: _Request, exc: BaseException) -> None:
        if request.failed:
            return
        request.failed = True
        self.stats.failed += 1
        self._live.pop(request.id, None)
        try:
            request.emit(Failed(exc))
        except Exception:  # its owner is gone (its event loop closed): nothing is left to tell
            log.warning("request %d failed and its owner could not be told", request.id)


def _one_answer(params: SamplingParams) -> None:
    if params.n != 1:
        raise ValueError(f"stream gives one answer per request (n=1), got n={params.n}: use events or run")
