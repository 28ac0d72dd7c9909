"""What runs in each step of the engine: which waiting requests are admitted, and how the step's budgets are shared.

As vLLM v1's scheduler does (``v1/core/sched/scheduler.py``), in our own code: every step has a token budget
(``max_num_batched_tokens``): each running row's decode token comes first, and what is left goes to prefills in
chunks, the requests being prefilled taken in order, so that a burst of long prompts never holds the running
streams for longer than one step's budget (chunked prefill). The vision pass has a budget of its own
(``max_num_vision_frames`` a step), as vLLM's encoder budget. Waiting requests are taken by ``priority`` (lower
first, as vLLM's), then arrival; one whose rows or prompt's KV do not fit yet may be passed by later ones, but only
``max_bypass`` times: then it waits at the head until it fits (no request waits for ever behind smaller ones). Only
the prompt's KV is counted at admission, as vLLM does: rows take blocks as they grow, and when the pool runs out the
engine preempts the latest admitted (their KV recomputed later) instead of reserving every answer's worst case.

Pure bookkeeping: no model, no tensors; the engine runs what it decides.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Protocol


class Schedulable(Protocol):
    """What the scheduler reads of a request."""

    id: int
    priority: int
    rows: int  # answers it decodes (``n``)
    prompt_positions: int  # KV positions its prompt takes
    cancelled: bool
    bypassed: int  # times a later request was admitted past it


@dataclass(frozen=True)
class Budgets:
    max_running: int  # rows decoded together
    max_num_batched_tokens: int  # tokens a step computes: decode rows plus prefill chunks
    max_num_vision_frames: int  # frames through the vision tower in a step
    max_bypass: int = 8  # times a waiting request that does not fit may be passed by later ones

    def __post_init__(self):
        if self.max_num_batched_tokens <= self.max_running:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be more than max_running "
                             f"({self.max_running}): a step decodes every running row and prefills with what is left")
        if self.max_num_vision_frames < 1 or self.max_bypass < 0:
            raise ValueError(f"max_num_vision_frames must be >= 1 and max_bypass >= 0, got "
                             f"{self.max_num_vision_frames}, {self.max_bypass}")


class Scheduler:
    """The waiting requests in order, and the admission rule. ``kv_room()``: KV positions the pool can still give
    that no admitted request is promised."""

    def __init__(self, budgets: Budgets, kv_room: Callable[[], int],
                 positions: Callable[[Any], int] = lambda request: request.prompt_positions):
        self.budgets = budgets
        self.kv_room = kv_room
        self.positions = positions  # KV positions a request's prefill takes from the pool (a cached prefix's not)
        self.waiting: list[Any] = []  # in the order they are taken: (priority, arrival)

    def add(self, request: Schedulable) -> None:
        bisect.insort(self.waiting, request, key=lambda r: (r.priority, r.id))

    def admit(self, rows: int, ready: Callable[[Any], bool]) -> tuple[list[Any], list[Any]]:
        """The waiting requests admitted now, beside ``rows`` rows (running, or reserved for requests being
        prefilled), and those found cancelled (both removed from ``waiting``). ``ready``: whether a request may start
        (its media made ahead)."""
        b = self.budgets
        admitted, cancelled, passed = [], [], []
        room = self.kv_room() if self.waiting else 0
        for request in list(self.waiting):
            if request.cancelled:
                self.waiting.remove(request)
                cancelled.append(request)
                continue
            if not ready(request):
                break  # its media are being made: it keeps its place (the batch decodes meanwhile)
            needs = self.positions(request)
            fits = not rows or (rows + request.rows <= b.max_running and needs <= room)
            if not fits:
                passed.append(request)
                if request.bypassed >= b.max_bypass:
                    break  # passed often enough: nothing behind it is admitted until it fits
                continue
            for earlier in passed:
                earlier.bypassed += 1
            self.waiting.remove(request)
            admitted.append(request)
            rows, room = rows + request.rows, room - needs
            if any(earlier.bypassed >= b.max_bypass for earlier in passed):
                break
        return admitted, cancelled

    def chunks(self, prefilling: list[Any], remaining: Callable[[Any], int], rows: int) -> list[tuple[Any, int]]:
        """Prompt tokens each request being prefilled computes this step, in order, within what the step's token
        budget leaves beside ``rows`` decode rows (``remaining``: a request's prompt tokens still to compute; 0: it
        is not ready, its vision pass runs)."""
        left = self.budgets.max_num_batched_tokens - rows
        out = []
        for request in prefilling:
            if left <= 0:
                break
            n = min(remaining(request), left)
            if n > 0:
                out.append((request, n))
                left -= n
        return out
