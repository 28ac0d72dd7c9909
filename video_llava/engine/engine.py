"""Continuous batching over a loaded ``QAModel``: requests join the running decode batch between steps and
leave when done.

Written by hand, over the model's own ``forward`` and transformers' cache classes: vLLM's engine can neither run nor
be tested on these machines, and transformers' continuous batching (``ContinuousBatchingManager``, paged attention)
takes ``input_ids`` only, where our requests arrive as embeddings with their vision features spliced in
(transformers#43386 and #46376 are open). No attention kernel is written here.

Split by role as vLLM v1's engine is: ``scheduler.py`` decides what each step runs (admission by priority with a
bounded bypass, a token budget shared by the decode rows and the prefill chunks, a frame budget for the vision
pass); ``runner.py`` runs the decode forward over the running rows, their KV in blocks of ``kv.py``'s paged pool
(``blocks.py``: which blocks are free, who holds each); ``prefills.py`` takes admitted requests through their vision
pass (``vision.py``) and their prompt in chunks (``prefill.py``); ``sampler.py`` draws every row's token in one set of
tensor operations (``grammar.py``: the masks of structured output); ``output.py`` turns tokens into text, stops,
logprobs and events. This module runs the loop: admission, a step (the decode forward, then the prefill stage),
rows joining and leaving, and what happens when the KV pool runs out.

One thread runs the loop. A prompt is prefilled alone, unpadded, a chunk at a time into blocks of the pool, so a
running stream never waits longer than one step's budget; once done, its ``n`` answers join the batch sharing the
prompt's blocks (each copies the last one before writing to it). Blocks are taken as rows grow; when the pool runs
out, a cached prefix is evicted, else the latest admitted row or prefill is preempted, as vLLM v1's scheduler does:
its blocks go back and its KV is recomputed later (its prompt and its tokens so far, as a prefill), its answer going
on where it stopped. Greedy rows give the tokens of one-at-a-time ``generate`` (float32 on CPU: token-identical,
tested, whatever the chunk size and the preemptions). A request that fails in its vision pass or prefill fails
alone; one that is cancelled leaves before the next step; a decode step that raises is run again in halves until
the rows that fail alone are found (an out-of-memory step fails nobody); an error of the loop itself fails every
admitted request, which is told. A prompt whose prefix (up to its last visual token) was seen before shares its
blocks and prefills only the rest (``prefix.py``). With ``preprocess_ahead`` a second thread makes the waiting
requests' media ready (``ahead.py``) while the loop decodes.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import threading
import time
import weakref
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from video_llava.engine.ahead import Ahead, MediaAhead
from video_llava.engine.blocks import NoFreeBlocks
from video_llava.engine.compiled import DECODE_MODES, DecodeMode
from video_llava.engine.events import Event, Failed, Finished, TextPiece
from video_llava.engine.grammar import Grammars
from video_llava.engine.kv import BLOCK_SIZE, KVShape, PagedKV
from video_llava.engine.output import EngineStats, Outputs, Request, Row, StepWork
from video_llava.engine.params import SamplingParams
from video_llava.engine.prefill import Forward, Prefiller
from video_llava.engine.prefills import Prefilling, Prefills
from video_llava.engine.prefix import PrefixCache
from video_llava.engine.runner import ModelRunner
from video_llava.engine.sampler import RowDraw, new_stream, sample
from video_llava.engine.scheduler import Budgets, Scheduler
from video_llava.engine.model_api import QAModel
from video_llava.model.answers import Answer, PreparedQuestion

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """More requests are waiting than the engine keeps; retry later."""


class EngineClosedError(RuntimeError):
    """The engine was closed before the request finished."""


class KVBudgetError(ValueError):
    """A request needs more KV positions than the engine's pool holds, even alone."""


# Errors after which the device cannot be trusted again in this process (a CUDA context is lost for good after an
# illegal memory access or a device-side assert): the replica must be replaced, not retried.
DEVICE_FAULTS = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS", "cuDNN error",
                 "NCCL error", "unspecified launch failure")


def device_fault(exc: BaseException) -> bool:
    """Whether ``exc`` says the device itself failed (not one request's input, not memory that may free up)."""
    return type(exc).__name__ in ("AcceleratorError", "ShardFault") or any(sign in str(exc) for sign in DEVICE_FAULTS)


class Engine:
    """Continuous batching for one model. Thread-safe; ``events``/``answer`` for asyncio callers, ``generate`` and
    ``stream`` for plain ones.

    ``max_running``: sequences decoded together; ``max_tokens``: KV positions the pool holds for them (by default half
    the GPU memory free, or on a CPU up to a million positions as needed; in blocks of ``block_size``; a request whose prompt and ``max_new_tokens`` need more is refused, ``KVBudgetError``; the
    prefix cache's blocks come on top); ``max_waiting``: requests
    queued behind them before ``submit`` raises ``QueueFullError``; ``max_num_batched_tokens``: tokens a step
    computes, every running row's decode token first and prompt chunks with the rest; ``max_num_vision_frames``:
    frames through the vision tower in a step; ``attention``: ``gather`` (each row's positions gathered from its blocks
    for torch's sdpa) or ``flex`` (FlexAttention over the pool itself, ``paged_attention.py``; dynamic steps); ``max_bypass``: times a waiting request that does not fit may be
    passed by later ones; ``prefix_cache_mb``: KV of prompt prefixes kept for repeat questions
    (``prefix.PrefixCache``; 0: none); ``preprocess_ahead``: waiting requests whose media are made ready ahead, in
    a thread of its own, while the loop computes (0: in the loop, under the frame budget); ``decode_mode``:
    ``dynamic``, ``static`` or ``compiled`` decode steps (``compiled.py``; the same tokens).
    """

    def __init__(self, qa: QAModel, max_running: int = 8, max_tokens: int | None = None, max_waiting: int = 256,
                 prefix_cache_mb: int = 0, preprocess_ahead: int = 0, decode_mode: DecodeMode = "dynamic",
                 max_num_batched_tokens: int = 1024, max_num_vision_frames: int = 8, max_bypass: int = 8,
                 block_size: int = BLOCK_SIZE, attention: str = "gather"):
        if max_tokens is None:  # a GPU's pool is allocated whole: half the memory free now; a CPU's grows as needed
            from video_llava.engine.budget import auto_max_tokens

            max_tokens = auto_max_tokens(qa.model, 0.5) if qa.model.device.type == "cuda" else 1 << 20
        if min(max_running, max_tokens, max_waiting) < 1:
            raise ValueError(f"max_running, max_tokens and max_waiting must be >= 1 (got {max_running}, {max_tokens}, "
                             f"{max_waiting})")
        self.qa, self.model, self.tokenizer = qa, qa.model, qa.tokenizer
        self.max_running, self.max_tokens, self.max_waiting = max_running, max_tokens, max_waiting
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}, got {decode_mode!r}")
        self.decode_mode = decode_mode
        self.stats = EngineStats()
        shape = KVShape.of(self.model)
        prefix_bytes = prefix_cache_mb * 2**20
        pool = (shape, max_tokens + prefix_bytes // shape.position_bytes, block_size)
        self._shards = qa.shards  # the other ranks of a model over several devices (engine/shards.py), or None
        if self._shards is None:
            self.kv = PagedKV(*pool, static=decode_mode != "dynamic", attention=attention)
            self._forward = Forward(self.model)
        elif decode_mode == "compiled":
            raise ValueError("decode_mode compiled is not offered with tensor_parallel_size > 1 (the forward calls the "
                             "other ranks): use dynamic or static")
        else:
            self.kv = self._shards.kv(*pool, static=decode_mode != "dynamic", attention=attention)
            self._forward = self._shards.forward(self.model, self.kv)
        self._text_attention = self.model.config.get_text_config()._attn_implementation
        if attention == "flex":  # the text model's attention reads the pool through FlexAttention (sdpa elsewhere)
            from video_llava.engine import paged_attention

            paged_attention.register()
            self.model.set_attn_implementation({"text_config": paged_attention.FLEX})
        self.prefix_cache = PrefixCache(prefix_bytes, self.kv)
        self._prefiller = Prefiller(qa, self._forward, self.prefix_cache, self.kv)
        self._scheduler = Scheduler(Budgets(max_running, max_num_batched_tokens, max_num_vision_frames,
                                            max_bypass), self._kv_room, self._positions_needed)
        self._waiting = self._scheduler.waiting  # in the order they are taken; read by the preprocessing thread
        # admitted (or preempted), their vision pass or prompt still running
        self._prefilling = Prefills(qa, self._prefiller, self._scheduler, self.kv, self._failed, self._room_for)
        self._running: list[Row] = []
        self._live: dict[int, Request] = {}  # submitted and not yet finished, failed or dropped
        self._grammars = Grammars(self.tokenizer, self.model.get_output_embeddings().out_features,
                                  qa.eos_token_ids)
        self._outputs = Outputs(qa, self.stats, self._live, self._grammars)
        self._runner = ModelRunner(self._forward, self.kv, decode_mode, device_fault)
        self._runner.warm_up(max_running)  # compiled steps: compiled now, not in the middle of traffic
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.fault: BaseException | None = None  # a device fault the loop met: nothing it runs can be trusted
        self._ahead = MediaAhead(self._prefiller, preprocess_ahead, self._cond, self._waiting, lambda: self._closed)

    # ---- submitting --------------------------------------------------------------------------------------------
    def submit(self, prepared: PreparedQuestion, params: SamplingParams, emit: Callable[[Event], None],
               stream: bool = True, priority: int = 0) -> int:
        """Queue a request; ``emit`` receives its events on the engine's thread (it must not block); with
        ``stream=False`` only ``Finished`` or ``Failed``; ``priority``: lower is admitted first. Returns its id."""
        request = Request(next(self._ids), prepared, params, emit, time.perf_counter(), stream, priority,
                          ahead=Ahead())
        if request.longest > self.max_tokens:
            raise KVBudgetError(f"this request needs {request.longest} KV positions (its prompt and media "
                                f"{request.prompt_positions}, max_new_tokens {prepared.max_new_tokens}); the engine "
                                f"holds {self.max_tokens} (batching.max_batch_tokens)")
        if params.response_format is not None:  # compiled once, here: a format that cannot be is refused now
            request.grammar = params.response_format.grammar()
            self._grammars.matcher(request.grammar)
        with self._cond:
            if self._closed or self.fault is not None:
                raise EngineClosedError("the engine is closed" if self._closed else f"the device failed: {self.fault}")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting for the model")
            self._scheduler.add(request)
            self._live[request.id] = request
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
                self._thread.start()
                atexit.register(_close_at_exit, weakref.ref(self))
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

    async def events(self, prepared: PreparedQuestion, params: SamplingParams, stream: bool = True,
                     priority: int = 0) -> AsyncIterator[Event]:
        """The request's events as an async iterator; leaving the iteration early (or being cancelled) cancels it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        request_id = self.submit(prepared, params, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event),
                                 stream, priority)
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
        """Stop the loop; requests not finished get ``Failed(EngineClosedError)``; the KV pool's memory goes (a GPU's
        whole pool, allocated at start, is free for the next engine)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._ahead.join(timeout=60)
        if self._thread is None or not self._thread.is_alive():
            self.prefix_cache.clear()
            self.kv.drop()
            if self.kv.attention == "flex":  # the model's own attention again
                self.model.set_attn_implementation({"text_config": self._text_attention})

    def check_health(self) -> None:
        """Raise if this engine cannot serve again: its loop met a device fault, its thread died, or another rank of
        its model does not answer."""
        if self._shards is not None:
            self._shards.check_health()
        if self.fault is not None:
            raise RuntimeError(f"the device failed and cannot be trusted: {type(self.fault).__name__}: {self.fault}")
        if self._thread is not None and not self._thread.is_alive() and not self._closed:
            raise RuntimeError("the engine's loop is not running")

    @property
    def running(self) -> int:
        """Sequences in the running batch now."""
        return len(self._running)

    @property
    def kv_positions(self) -> int:
        """KV positions the pool's blocks in use hold now (the rows' and the cached prefixes')."""
        return self.kv.held_positions

    def describe(self) -> dict:
        s = self.stats
        b = self._scheduler.budgets
        return {"max_running": self.max_running, "max_tokens": self.max_tokens, "max_waiting": self.max_waiting,
                "max_num_batched_tokens": b.max_num_batched_tokens, "max_num_vision_frames": b.max_num_vision_frames,
                "running": len(self._running), "waiting": len(self._waiting), "prefilling": len(self._prefilling),
                "steps": s.steps, "prefills": s.prefills, "prefill_chunks": self._prefilling.chunks_run,
                "most_running_in_a_step": s.max_running, "finished": s.finished, "cancelled": s.cancelled,
                "failed": s.failed, "prefix_hits": s.prefix_hits, "vision_ahead": self._ahead.made,
                "split_steps": self._runner.split_steps, "kv_positions": s.kv_positions, "preempted": s.preempted,
                "block_size": self.kv.block_size, "kv_blocks_used": self.kv.manager.used_blocks,
                "prefix_cache": self.prefix_cache.stats()}

    def recent_steps(self) -> list[StepWork]:
        """What each of the last (up to 1000) steps computed, and when it began."""
        with self._cond:
            return list(self.stats.work_per_step)

    def recent_running(self) -> list[int]:
        """Sequences in each of the last (up to 1000) decode steps."""
        with self._cond:
            return list(self.stats.running_per_step)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._running or self._prefilling
                           or (self._waiting and self._ahead.ready(self._waiting[0]))):
                    self._cond.wait()
                if self._closed:
                    break
                for work in self._admit():
                    self._prefilling.add(work)
            try:
                started = time.perf_counter()
                self._drop_cancelled()
                rows = len(self._running)
                if rows:
                    self._step()
                tokens, frames, done = self._prefilling.step(rows)
                for work, logits in done:
                    self._join(work, logits)
                with self._cond:
                    self.stats.work_per_step.append(StepWork(rows, tokens, frames, started))
                if self.fault is not None:  # met by one request: the others' work is not to be trusted either
                    raise self.fault
            except Exception as exc:  # not one request's fault (those fail alone): every admitted one fails, is told
                log.exception("the engine loop failed with %d sequences running and %d prefilling", len(self._running),
                              len(self._prefilling))
                for request in [r.request for r in self._running] + [w.request for w in self._prefilling.clear()]:
                    self._failed(request, exc)
                self._running = []
                self.prefix_cache.clear()  # its blocks go back to the pool that is dropped next
                self.kv.reset()
        error = EngineClosedError("the engine was closed")
        for request in list(self._waiting) + [w.request for w in self._prefilling] + [r.request for r in self._running]:
            self._failed(request, error)

    def _failed(self, request: Request, exc: BaseException) -> None:
        """A request fails; a device fault also marks the engine as faulted (``check_health``)."""
        if device_fault(exc) and self.fault is None:
            log.error("device fault: %s: %s; this replica cannot be trusted again", type(exc).__name__, exc)
            self.fault = exc
        self._outputs.fail(request, exc)

    def _admit(self) -> list[Prefilling]:
        """Waiting requests the scheduler admits beside the running and prefilling ones; called holding the lock."""
        rows = len(self._running) + self._prefilling.rows
        admitted, cancelled = self._scheduler.admit(rows, self._ahead.ready)
        for request in cancelled:
            self._outputs.cancelled(request)
        if admitted and self._ahead.limit:
            self._cond.notify_all()  # room ahead: the preprocessing thread may go on
        return [Prefilling(request) for request in admitted]

    def _kv_room(self) -> int:
        """KV positions the pool can still give that no admitted request is promised (its prompt not prefilled yet),
        less a block per running row (each may need a new one at the next step)."""
        promised = self._prefilling.pending
        return self.kv.free_positions - promised - len(self._running) * self.kv.block_size

    def _positions_needed(self, request: Request) -> int:
        """KV positions ``request``'s prefill takes from the pool: its prompt's, less the whole blocks of a cached
        prefix it will share, as vLLM counts only what a cache hit does not give. Its plan (prompt ids, prefix key) is
        made here if it was not made ahead, and kept for its prefill."""
        if not self.prefix_cache.enabled:
            return request.prompt_positions
        plan = request.ahead.plan
        if plan is None:
            try:
                plan = request.ahead.plan = self._prefiller.plan(request.prepared, fetch=False)
            except Exception:  # its prompt cannot be expanded: its prefill says so, and it fails alone
                return request.prompt_positions
        if plan.key is None or not self.prefix_cache.holds(plan.key):
            return request.prompt_positions
        return request.prompt_positions - plan.cut // self.kv.block_size * self.kv.block_size

    def _drop_cancelled(self) -> None:
        gone = [i for i, row in enumerate(self._running) if row.request.cancelled]
        if gone:
            for i in gone:
                self._outputs.cancelled(self._running[i].request)
            self._leave(gone)
        for work in [w for w in self._prefilling if w.request.cancelled or w.request.failed]:
            self._prefilling.drop(work)
            if work.request.cancelled:
                self._outputs.cancelled(work.request)

    def _leave(self, rows: list[int]) -> None:
        """Rows ``rows`` (indices into the running rows) leave the batch; their blocks go back."""
        for i in rows:
            self.kv.release(self._running[i].kv)
        gone = set(rows)
        self._running = [row for i, row in enumerate(self._running) if i not in gone]

    # ---- when the pool runs out --------------------------------------------------------------------------------
    def _make_room(self, order: tuple[int, int, int], itself: bool) -> bool:
        """Free blocks for the row or prefill at ``order``: evict a cached prefix, else preempt the latest admitted
        row or prefill that holds blocks and comes after it (or is it, with ``itself``), as vLLM v1's scheduler
        preempts; whether anything was freed."""
        if self.prefix_cache.evict():
            return True
        holders = [(row.order, row) for row in self._running if row.kv.blocks]
        holders += [(w.order, w) for w in self._prefilling if w.holds_blocks]
        holders = [h for h in holders if h[0] > order or (itself and h[0] == order)]
        if not holders:
            return False
        self._preempt(max(holders, key=lambda h: h[0])[1])
        return True

    def _preempt(self, victim: Row | Prefilling) -> None:
        """``victim``'s blocks go back; it is prefilled again later (a row: its prompt and its tokens so far)."""
        self.stats.preempted += 1
        if isinstance(victim, Prefilling):
            log.info("KV pool full: the prefill of request %d starts again later", victim.request.id)
            self._prefilling.release(victim)
            return
        log.info("KV pool full: row %d of request %d is preempted (%d tokens so far)", victim.index,
                 victim.request.id, len(victim.tokens))
        self._running.remove(victim)
        self.kv.release(victim.kv)
        self._prefilling.add(Prefilling(victim.request, row=victim))  # before later requests' prefills

    def _room_for(self, work: Prefilling) -> bool:
        """Free blocks for ``work``'s next chunk (True: try again; False: wait for blocks); ``KVBudgetError`` when
        nothing else holds any, so it can never fit."""
        if self._make_room(work.order, itself=False):
            return True
        if not self._running and not any(w.holds_blocks for w in self._prefilling if w is not work):
            raise KVBudgetError(f"the KV pool ({self.kv.max_positions} positions) cannot hold this prompt "
                                f"({len(work.task.ids)} positions)")
        return False

    def _reserve_decode(self) -> None:
        """Room for every running row's next position, the earliest admitted first (rows preempted, the row itself
        perhaps, when the pool runs out)."""
        for row in sorted(self._running, key=lambda r: r.order):
            while any(r is row for r in self._running):
                try:
                    self.kv.reserve(row.kv, row.kv.length + 1)
                    break
                except NoFreeBlocks:
                    self._make_room(row.order, itself=True)

    def _join(self, work: Prefilling, logits: Any) -> None:
        """A prompt done: a preempted row decodes on; a new request's ``n`` answers get their first token and join
        the batch (sharing the prompt's blocks) unless already done."""
        task = work.task
        if work.row is not None:
            work.row.kv, task.table = task.table, work.row.kv
            self._running.append(work.row)
            return
        request, p = work.request, work.request.params
        try:
            rows = [self._outputs.sequence(request, i, work.started, task.cached, task.vision_s,
                                           new_stream(None if p.seed is None else p.seed + i)) for i in range(p.n)]
            first = sample(logits.expand(p.n, -1), [RowDraw(p, row.stream, 0) for row in rows],
                           self._grammars.allowed([row.matcher for row in rows], logits.device))
            error = next((t for t in first.tokens if isinstance(t, Exception)), None)
            if error is not None:
                raise error
        except Exception as exc:
            self._prefilling.drop(work, exc)
            return
        self.stats.prefills += 1
        self.stats.prefix_hits += task.prefix_hit
        request.unfinished = p.n
        try:
            for row, token, raw in zip(rows, first.tokens, first.logprobs):
                if not self._outputs.append(row, token, raw):
                    row.kv = self.kv.share(task.table)
                    self._running.append(row)
        except Exception as exc:  # its rows already in the batch leave at the next step (``failed``)
            log.exception("first token failed")
            self._failed(request, exc)
        finally:
            self.kv.release(task.table)  # the rows hold its blocks now

    # ---- decode steps ------------------------------------------------------------------------------------------
    def _step(self) -> None:
        """One decode step: every running sequence gets its next token; finished ones leave the batch."""
        self._reserve_decode()
        if not self._running:  # every row was preempted
            return
        self.stats.steps += 1
        self.stats.max_running = max(self.stats.max_running, len(self._running))
        with self._cond:  # read by other threads (recent_running): a deque must not change while they copy it
            self.stats.running_per_step.append(len(self._running))
        rows, logits, failed = self._runner.decode(self._running)  # a device fault raises: the loop fails everyone
        for row, exc in failed:
            self.kv.release(row.kv)
            self._failed(row.request, exc)
        self._running = rows
        self.stats.kv_positions = max(self.stats.kv_positions, self.kv.held_positions)
        if not rows:
            return
        step = sample(logits, [RowDraw(row.request.params, row.stream, len(row.tokens)) for row in rows],
                      self._grammars.allowed([row.matcher for row in rows], logits.device))
        done = [i for i, (row, token, raw) in enumerate(zip(rows, step.tokens, step.logprobs))
                if self._outputs.sampled(row, token, raw)]
        if done:
            self._leave(done)


def _one_answer(params: SamplingParams) -> None:
    if params.n != 1:
        raise ValueError(f"stream gives one answer per request (n=1), got n={params.n}: use events or run")


def _close_at_exit(engine_ref: "weakref.ref[Engine]") -> None:
    """An engine still running when the interpreter exits (a script that never called ``close``) is closed first:
    its daemon loop, killed mid-step during finalization, could abort the process ("terminate called without an
    active exception") and its requests would never end."""
    engine = engine_ref()
    if engine is not None:
        engine.close()
