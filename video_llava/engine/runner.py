"""The model runner, as vLLM v1's: one decode forward over the running rows, each row's KV in its blocks of the paged
pool (``kv.PagedKV``). A step that raises runs again in halves until the rows that fail alone are found (an
out-of-memory step succeeds in smaller parts: nobody fails; no KV is copied to split a step, the rows' tables are
their own); a device fault is not retried."""

from __future__ import annotations

import logging
from typing import Any, Protocol, Sequence

from video_llava.engine.blocks import BlockTable
from video_llava.engine.compiled import DecodeMode, compiled_steps
from video_llava.engine.kv import PagedKV
from video_llava.engine.prefill import Forward

log = logging.getLogger(__name__)


class Decoding(Protocol):
    """What the runner reads of a running row."""

    tokens: list[int]  # its generated tokens: the last is this step's input
    kv: BlockTable  # its KV, with room reserved for this step's position


class _Dummy:
    """A row of a warm-up step."""

    def __init__(self, kv: BlockTable):
        self.kv, self.tokens = kv, [0]


class ModelRunner:
    """Decode steps over the running rows (in the engine's order)."""

    def __init__(self, forward: Forward, kv: PagedKV, decode_mode: DecodeMode, is_device_fault: Any = lambda e: False):
        self.forward, self.model, self.kv, self.decode_mode = forward, forward.model, kv, decode_mode
        self.is_device_fault = is_device_fault
        self._step_logits = forward.step_logits if decode_mode != "compiled" else compiled_steps(forward)
        self.split_steps = 0  # steps that raised and were run again in halves

    def warm_up(self, max_rows: int) -> int:
        """Compiled steps only: compile the decode step before any request, so none compiles in the middle of traffic:
        every bucket of rows the scheduler will use (powers of two up to ``max_rows``) at the first span of
        positions, then a longer span (after which torch has made both dimensions dynamic). The dummy rows' blocks go
        back. Returns the steps run."""
        from video_llava.engine.blocks import BlockTable
        from video_llava.engine.kv import STATIC_POSITIONS

        if self.decode_mode != "compiled":
            return 0
        longer = STATIC_POSITIONS + 1  # one row and several apart: torch specialises a dimension of size 1
        shapes = [(1 << k, 1) for k in range((max_rows - 1).bit_length() + 1)] + [(min(2, max_rows), longer),
                                                                                   (1, longer)]
        for rows, length in shapes:
            dummy = [_Dummy(BlockTable()) for _ in range(rows)]
            try:
                for row in dummy:
                    self.kv.reserve(row.kv, length)
                    row.kv.length = length - 1  # what it attends to is never read: its logits are dropped
                self._step(dummy)
            finally:
                for row in dummy:
                    self.kv.release(row.kv)
        return len(shapes)

    def decode(self, rows: Sequence[Decoding]) -> tuple[list[Any], Any, list[tuple[Any, BaseException]]]:
        """One decode step over ``rows``: the rows that ran, their logits (rows x vocabulary, float32), and the rows
        whose part of the step failed alone with its error."""
        import torch

        failed: list[tuple[Any, BaseException]] = []
        parts = self._isolated(list(rows), failed)
        ran = [row for part, _ in parts for row in part]
        logits = parts[0][1] if len(parts) == 1 else (torch.cat([p[1] for p in parts]) if parts else None)
        return ran, logits, failed

    def _step(self, rows: list[Decoding]) -> Any:
        """Logits of one decode step over ``rows`` (their tables advanced; as they were if the step raises)."""
        import torch

        tables = [row.kv for row in rows]
        mask, positions = self.kv.step_inputs(tables, 1, self.forward.four_d_mask)
        tokens = [row.tokens[-1] for row in rows]
        tokens += tokens[-1:] * (mask.shape[0] - len(tokens))  # static: the padding rows compute a copy
        ids = torch.tensor(tokens, device=self.model.device).unsqueeze(1)
        try:
            with torch.inference_mode():
                logits = self._step_logits(ids, mask, self.kv.cache, positions)
        finally:
            self.kv.finish()  # what a failed step wrote is not counted (and is overwritten by the next)
        self.kv.advance(tables, 1)
        return logits[:len(rows)]

    def _isolated(self, rows: list[Decoding], failed: list) -> list[tuple[list[Decoding], Any]]:
        """``_step``, and if it fails, the same step in halves until the rows that fail alone are found (into
        ``failed``); the parts that ran: (rows, logits)."""
        try:
            return [(rows, self._step(rows))]
        except Exception as exc:
            if self.is_device_fault(exc):  # no half of the step can be trusted
                raise
            if len(rows) == 1:
                log.warning("decode step failed for one row: %s: %s", type(exc).__name__, exc)
                failed.append((rows[0], exc))
                return []
            log.warning("decode step of %d rows failed (%s: %s): retrying in halves", len(rows),
                        type(exc).__name__, exc)
            self.split_steps += 1
        half = len(rows) // 2
        return self._isolated(rows[:half], failed) + self._isolated(rows[half:], failed)
