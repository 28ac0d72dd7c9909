"""One optimizer step over micro-batches, under the run's precision: what lets a step take more examples than fit in
memory at once (``grad_accum``), and bf16 where the hardware has it, with the same update as one large batch.

Each micro-batch's loss is weighted by its share of the step (its answer tokens for SFT, its pairs for DPO), so the
gradient is that of the whole batch's mean loss, not a mean of micro-batch means. Under DDP the gradients are
all-reduced once, after the last micro-batch (under FSDP, reduce-scattered once). bf16 runs the forward under autocast; the weights, their gradients
and the optimizer's state stay float32 (the master copy an optimizer needs).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Literal, Sequence

Precision = Literal["fp32", "bf16"]


def autocast(precision: Precision, device: Any) -> contextlib.AbstractContextManager:
    """The forward's precision: bf16 autocast, or nothing for float32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    """``items`` in runs of ``size`` (the last shorter)."""
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def optimizer_step(model: Any, optimizer: Any, parts: Sequence[tuple[Any, float]], loss_of: Callable[[Any], Any],
                   precision: Precision, device: Any) -> float:
    """Zero the gradients, backward each ``(part, weight)`` (``weight``: the part's share of the step, summing to
    1) under ``precision``, step the optimizer once; the step's loss (the weighted sum)."""
    optimizer.zero_grad()
    total = 0.0
    for k, (part, weight) in enumerate(parts):
        last = k == len(parts) - 1
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: gradients reduce-scattered after the last only
            model.set_requires_gradient_sync(last)
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(precision, device):
                loss = loss_of(part) * weight
            loss.backward()
        total += float(loss.detach())
    optimizer.step()
    return total


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (memory for time);
    the KV cache, which it cannot keep, is switched off for training."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    for part in (config, getattr(config, "text_config", None)):
        if part is not None and hasattr(part, "use_cache"):
            part.use_cache = False
