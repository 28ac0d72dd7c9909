"""The model runner, as vLLM v1's: one decode forward over the running rows, their KV in the batch's buffers
(``kv.BatchKV``), rows joining and leaving between steps. A step that raises runs again in halves until the rows
that fail alone are found (an out-of-memory step succeeds in smaller parts: nobody fails); a device fault is not
retried."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from video_llava.engine.compiled import DecodeMode, compiled_steps
from video_llava.engine.kv import BatchKV
from video_llava.engine.prefill import Forward

log = logging.getLogger(__name__)


class ModelRunner:
    """The running batch's KV and its decode steps, for rows in the engine's order (anything with ``tokens``)."""

    def __init__(self, forward: Forward, decode_mode: DecodeMode, max_running: int,
                 is_device_fault: Any = lambda exc: False):
        self.forward, self.model, self.decode_mode, self.max_running = forward, forward.model, decode_mode, max_running
        self.is_device_fault = is_device_fault
        self.kv = self.new_kv()
        self._step_logits = forward.step_logits if decode_mode != "compiled" else compiled_steps(forward)
        # flash-attention takes a padding mask (rows x positions); sdpa and eager the 4-D mask built per step
        self._four_d_mask = getattr(self.model.config, "_attn_implementation", "sdpa") != "flash_attention_2"
        self.split_steps = 0  # steps that raised and were run again in halves

    def new_kv(self) -> BatchKV:
        return BatchKV(static=self.decode_mode != "dynamic", max_slots=self.max_running)

    def reset(self) -> None:
        """Every row gone (the engine failed them all)."""
        self.kv = self.new_kv()

    def join(self, cache: Any, length: int, copies: int) -> None:
        """A prefilled one-row cache of ``length`` positions joins as the last ``copies`` rows."""
        self.kv.add(cache, length, copies=copies)

    def leave(self, rows: list[int], max_tokens: int) -> list[int]:
        """Rows ``rows`` leave; per slot now, the old row it holds (the engine reorders its rows the same way)."""
        order = self.kv.remove(rows)
        if not self.kv.rows and (self.decode_mode == "dynamic" or self.kv.positions > max_tokens):
            # the buffers go, to be sized for the next rows; static steps keep theirs (CUDA graphs keep reading the
            # same addresses) unless a request larger than the budget made them
            self.kv = self.new_kv()
        return order

    def decode(self, rows: Sequence[Any]) -> tuple[list[Any], Any, list[tuple[Any, BaseException]]]:
        """One decode step over ``rows``: the rows that ran (in the batch's new order), their logits (rows x
        vocabulary, float32), and the rows whose part of the step failed alone with its error."""
        import torch

        failed: list[tuple[Any, BaseException]] = []
        parts = self._isolated(self.kv, list(rows), failed)
        if len(parts) != 1 or parts[0][1] != list(rows):  # the step was split: the rows that survived, rejoined
            self.kv, rows = self.new_kv(), []
            for kv, part, _ in parts:
                self.kv.extend(kv)
                rows += part
        logits = parts[0][2] if len(parts) == 1 else (torch.cat([p[2] for p in parts]) if parts else None)
        return list(rows), logits, failed

    def _step(self, kv: BatchKV, rows: list[Any]) -> Any:
        """Logits of one decode step over ``rows`` (their KV ``kv``, advanced; as it was if the step raises)."""
        import torch

        mask, positions = kv.step_inputs(self.model.dtype, self._four_d_mask)
        tokens = [row.tokens[-1] for row in rows]
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

    def _isolated(self, kv: BatchKV, rows: list[Any], failed: list) -> list[tuple[BatchKV, list[Any], Any]]:
        """``_step``, and if it fails, the same step in halves until the rows that fail alone are found (into
        ``failed``); the parts that ran: (KV, rows, logits)."""
        try:
            return [(kv, rows, self._step(kv, rows))]
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
        second = kv.take(range(half, len(rows)))
        kv.keep(range(half))
        return self._isolated(kv, rows[:half], failed) + self._isolated(second, rows[half:], failed)
