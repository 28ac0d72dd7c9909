"""Media made ready ahead: while the engine's loop runs the model, a thread of its own takes the first waiting
requests not yet prepared together, plans their prompts and runs their media through the processor and the vision
tower in one pass (none for a request whose prefix KV is cached). A request is admitted once its media are ready,
so on a CPU this work runs beside the decode steps instead of between them."""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from video_llava.engine.prefill import Plan, Prefiller
from video_llava.model.media_embeds import MediaFeatures

log = logging.getLogger(__name__)


@dataclass
class Ahead:
    """What was made ahead for one waiting request (dropped once its prefill used it)."""

    plan: Plan | None = None  # its prompt's ids and prefix key (the prefix KV is fetched at admission)
    features: MediaFeatures | None = None  # its media's vision features
    preparing: bool = False  # they are being made
    done: bool = False  # they were made (or that failed: then its prefill makes them)


class MediaAhead:
    """The thread that makes the media of the engine's first waiting requests ready, at most ``limit`` held (0: no
    thread; the loop makes them at admission). It shares the engine's lock, condition and waiting queue; a request
    is anything with ``prepared``, ``cancelled`` and ``ahead`` (an ``Ahead``)."""

    def __init__(self, prefiller: Prefiller, limit: int, cond: threading.Condition, waiting: collections.deque,
                 closed: Callable[[], bool]):
        self.prefiller, self.limit = prefiller, max(0, limit)
        self._cond, self._waiting, self._closed = cond, waiting, closed
        self._thread: threading.Thread | None = None
        self.made = 0  # requests whose vision features were made ahead

    def start(self) -> None:
        """Start the thread (once; called holding the engine's lock)."""
        if self._thread is None and self.limit:
            self._thread = threading.Thread(target=self._loop, name="engine-preprocess", daemon=True)
            self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def ready(self, request: Any) -> bool:
        """Whether a waiting request may be admitted: its media are ready (when they are made ahead)."""
        return not self.limit or request.ahead.done or request.cancelled

    def _loop(self) -> None:
        while True:
            with self._cond:
                group: list[Any] = []
                while not self._closed() and not (group := self._next_group()):
                    self._cond.wait()
                if self._closed():
                    return
                for request in group:
                    request.ahead.preparing = True
            try:
                self._prepare(group)
            except Exception:  # the loop prepares them itself, and fails one alone if that fails again
                log.exception("preparing %d requests ahead failed", len(group))
            with self._cond:
                for request in group:
                    request.ahead.preparing, request.ahead.done = False, True
                self._cond.notify_all()

    def _next_group(self) -> list[Any]:
        """The first waiting requests not prepared yet, as many as fit beside those that hold what was made ahead
        (``limit`` in all)."""
        held, group = 0, []
        for request in self._waiting:
            if request.cancelled:
                continue
            if request.ahead.done or request.ahead.preparing:
                held += 1
            elif held + len(group) < self.limit:
                group.append(request)
            else:
                break
        return group

    def _prepare(self, group: list[Any]) -> None:
        """Plans and vision features of ``group``, but for a request whose prefix KV is cached (it needs none)."""
        need = []
        for request in group:
            try:
                request.ahead.plan = self.prefiller.plan(request.prepared, fetch=False)
            except Exception:  # its prompt cannot be expanded: its prefill says so, and it fails alone
                continue
            if self.prefiller.needs_vision(request.ahead.plan):
                need.append(request)
        for request, features in zip(need, self.prefiller.features_each([r.prepared for r in need])):
            request.ahead.features = features
            self.made += features is not None
