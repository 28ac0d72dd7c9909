"""The engine's prefill stage: the admitted requests (and preempted rows) on their way into the running batch, in the
engine's order. Each step plans as many as keep the step's budgets busy, runs up to the frame budget of their vision
passes (``vision.py``), then their prompts in chunks with what the token budget leaves (``prefill.py``: into blocks
of the paged pool); a prompt done is handed back to the engine, which samples its first tokens and lets it join."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from video_llava.engine.blocks import NoFreeBlocks
from video_llava.engine.kv import PagedKV
from video_llava.engine.output import Request, Row
from video_llava.engine.prefill import Plan, PrefillTask, Prefiller
from video_llava.engine.scheduler import Scheduler
from video_llava.engine.vision import VisionWork, run_vision

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Prefilling:
    """An admitted request on its way into the batch (or a preempted row of one, its KV to recompute): its plan,
    then its vision pass, then its prompt in chunks."""

    request: Request
    row: Row | None = None  # a preempted row: its prompt and tokens so far are prefilled, then it decodes on
    plan: Plan | None = None  # once it starts
    started: float = 0.0  # when its prefill began (what its answers' generate_s count from)
    vision: VisionWork | None = None  # its media features still being made
    task: PrefillTask | None = None  # its prompt, once its features are all made

    @property
    def rows(self) -> int:
        return 1 if self.row is not None else self.request.rows

    @property
    def order(self) -> tuple[int, int, int]:
        """Its place in the engine's order (as ``Row.order``; a request's prefill comes before its rows)."""
        return self.request.priority, self.request.id, -1 if self.row is None else self.row.index

    @property
    def pending(self) -> int:
        """KV positions its prompt still needs from the pool."""
        if self.task is not None:
            return self.task.remaining
        return self.request.prompt_positions + (len(self.row.tokens) - 1 if self.row is not None else 0)

    @property
    def holds_blocks(self) -> bool:
        return self.task is not None and bool(self.task.table.blocks)


class Prefills:
    """The prefilling works of one engine. ``fail(request, error)``: a request fails alone; ``room(work)``: free
    blocks for ``work``'s chunk (True: something was freed, try again; False: wait a step)."""

    def __init__(self, qa: Any, prefiller: Prefiller, scheduler: Scheduler, kv: PagedKV,
                 fail: Callable[[Request, BaseException], None], room: Callable[[Prefilling], bool]):
        self.qa, self.prefiller, self.scheduler, self.kv = qa, prefiller, scheduler, kv
        self.fail, self.room = fail, room
        self.works: list[Prefilling] = []
        self.chunks_run = 0  # forwards of prompt chunks

    def __len__(self) -> int:
        return len(self.works)

    def __iter__(self) -> Iterator[Prefilling]:
        return iter(list(self.works))

    @property
    def rows(self) -> int:
        """Rows these works will add to the batch."""
        return sum(w.rows for w in self.works)

    @property
    def pending(self) -> int:
        """KV positions their prompts still need from the pool."""
        return sum(w.pending for w in self.works)

    def add(self, work: Prefilling) -> None:
        """A work joins, in the engine's order (a preempted row's before later requests')."""
        self.works.append(work)
        self.works.sort(key=lambda w: w.order)

    def drop(self, work: Prefilling, exc: BaseException | None = None) -> None:
        """A work leaves (its blocks go back); with ``exc``, its request fails."""
        if work in self.works:
            self.works.remove(work)
        self.release(work)
        if exc is not None:
            log.warning("prefill failed: %s: %s", type(exc).__name__, exc)
            self.fail(work.request, exc)

    def release(self, work: Prefilling) -> None:
        """Whatever blocks ``work`` holds go back; it starts again from its plan if it runs again."""
        if work.task is not None:
            self.kv.release(work.task.table)
        if work.plan is not None and work.plan.prefix is not None:
            self.kv.release(work.plan.prefix)
        work.plan = work.vision = work.task = None

    def clear(self) -> list[Prefilling]:
        """Every work leaves (the engine failed them all); the works."""
        works, self.works = self.works, []
        return works

    # ---- a step ------------------------------------------------------------------------------------------------
    def step(self, decoded: int) -> tuple[int, int, list[tuple[Prefilling, Any]]]:
        """This step's vision pass (up to the frame budget) and prompt chunks (up to what the token budget leaves
        beside the ``decoded`` rows of its decode step): the prompt tokens and frames computed, and the works whose
        prompt is done with their last logits (no longer among these works)."""
        self._plan()
        frames = self._vision()
        chunks = self.scheduler.chunks([w for w in self.works if w.task is not None], lambda w: w.task.remaining,
                                       decoded)
        computed, done = 0, []
        for work, tokens in chunks:
            if work not in self.works or work.task is None:  # preempted for an earlier one's chunk
                continue
            try:
                ran, logits = self._chunk(work, tokens)
            except Exception as exc:  # this request alone: out of memory for its size, a bad input that got through
                self.drop(work, exc)
                continue
            if not ran:
                continue
            computed += tokens
            self.chunks_run += 1
            if work.task.remaining == 0:
                self.works.remove(work)
                done.append((work, logits))
        return computed, frames, done

    def _plan(self) -> None:
        """Works start, in order, as many as keep this step's budgets busy: their plan (prompt ids, a cached prefix),
        then their vision pass (none when the prefix is cached, or the media were made ahead or are in the feature
        cache). Planning all of a burst in one step would tokenize every long prompt between two decode steps."""
        b = self.scheduler.budgets
        started = [w for w in self.works if w.plan is not None]
        frames = sum(w.vision.pending_frames for w in started if w.vision is not None)
        tokens = sum(w.task.remaining for w in started if w.task is not None)
        for work in [w for w in self.works if w.plan is None]:
            if frames >= b.max_num_vision_frames or tokens >= b.max_num_batched_tokens:
                break
            request = work.request
            try:
                made = request.ahead.plan if work.row is None else None
                work.plan = self.prefiller.fetch(made) if made is not None else self.prefiller.plan(
                    request.prepared, then=work.row.tokens[:-1] if work.row is not None else ())
                work.started = work.started or time.perf_counter()
                if work.plan.prefix is not None:
                    work.task = self.prefiller.start(work.plan, None)
                elif request.ahead.features is not None and work.row is None:
                    work.task = self.prefiller.start(work.plan, request.ahead.features)
                else:
                    work.vision = VisionWork(self.qa.embedder, request.prepared)
            except Exception as exc:  # its prompt cannot be tokenized or expanded: it fails alone
                self.drop(work, exc)
                continue
            finally:
                request.ahead.plan = request.ahead.features = None  # used: their memory goes
            frames += work.vision.pending_frames if work.vision is not None else 0
            tokens += work.task.remaining if work.task is not None else 0

    def _vision(self) -> int:
        """Up to the frame budget of the works' vision passes, in one pass per frame shape; if that pass fails, each
        work's runs alone, so that only a request whose own media fail fails. The frames computed."""
        pending = [w for w in self.works if w.vision is not None]
        if not pending:
            return 0
        budget = self.scheduler.budgets.max_num_vision_frames
        try:
            used = run_vision(self.qa.embedder, [w.vision for w in pending], budget)
        except Exception as exc:
            log.warning("the vision pass of %d requests failed (%s: %s): each runs alone", len(pending),
                        type(exc).__name__, exc)
            used = 0
            for work in pending:
                if used >= budget:
                    break
                try:
                    used += run_vision(self.qa.embedder, [work.vision], budget - used)
                except Exception as alone:
                    self.drop(work, alone)
        for work in pending:
            if work in self.works and work.vision is not None and work.vision.done:
                try:
                    work.task = self.prefiller.start(work.plan, work.vision.features())
                    work.vision = None
                except Exception as exc:
                    self.drop(work, exc)
        return used

    def _chunk(self, work: Prefilling, tokens: int) -> tuple[bool, Any]:
        """``tokens`` more of ``work``'s prompt: whether they ran (not: no room in the pool this step, it waits for
        blocks), and its last logits once the prompt is done."""
        while True:
            try:
                return True, self.prefiller.chunk(work.task, tokens)
            except NoFreeBlocks:
                if not self.room(work):
                    return False, None
