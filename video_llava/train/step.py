"""One optimizer step over micro-batches, under the run's precision: what lets a step take more examples than fit in
memory at once (``grad_accum``), and bf16 where the hardware has it, with the same update as one large batch.

Each micro-batch's loss is weighted by its share of the step (its answer tokens for SFT, its pairs for DPO), so the
gradient is that of the whole batch's mean loss, not a mean of micro-batch means. Under DDP the gradients are
all-reduced once, after the last micro-batch (under FSDP, reduce-scattered once). bf16 runs the forward under autocast; the weights, their gradients
and the optimizer's state stay float32 (the master copy an optimizer needs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class StepResult:
    """What an optimizer step did: its loss (the weighted sum over micro-batches), the gradients' global norm before
    any clipping, the learning rate it stepped with (``--lr`` scaled by the schedule; ``None`` where the caller set
    none) and each part's (``train.parts``)."""

    loss: float
    grad_norm: float
    lr: float | None = None
    part_lrs: dict[str, float] | None = None


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
                   precision: Precision, device: Any, max_grad_norm: float = 0.0) -> StepResult:
    """Zero the gradients, backward each ``(part, weight)`` (``weight``: the part's share of the step, summing to
    1) under ``precision``, clip the gradients' global norm to ``max_grad_norm`` (0: no clipping; under DDP the
    gradients are already all-reduced, under FSDP2 torch computes the norm over every shard), step the optimizer
    once."""
    import torch

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
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    optimizer.step()
    return StepResult(total, float(norm), optimizer.param_groups[0].get("lr"))


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (memory for time);
    the KV cache, which it cannot keep, is switched off for training."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    for part in (config, getattr(config, "text_config", None)):
        if part is not None and hasattr(part, "use_cache"):
            part.use_cache = False
