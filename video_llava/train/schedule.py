"""The learning rate of each step: a linear warmup, then constant, linear or cosine decay (the shapes of
transformers' ``get_*_schedule_with_warmup``, which TRL's DPO and LLaVA's recipes use), as a function of the step
alone: a resumed run follows the same curve with no scheduler state to save."""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "linear", "cosine"]


def lr_factor(step: int, total: int, warmup: int = 0, schedule: Schedule = "constant",
              decay_from: int | None = None) -> float:
    """The share of the peak learning rate at ``step`` (1-based) of ``total``: ``step / warmup`` for the first
    ``warmup`` steps, then 1 until the decay starts (after ``decay_from`` when given: warmup-stable-decay, else right
    after the warmup), then falling linearly or along a half cosine to just above 0 at the last step."""
    if warmup and step <= warmup:
        return step / warmup
    start = max(warmup, decay_from or 0)
    if schedule == "constant" or step <= start:
        return 1.0
    left = (total - step + 1) / (total - start + 1)  # 1 just after the start, 1/(steps decaying) at the last step
    if schedule == "linear":
        return max(0.0, left)
    return 0.5 * (1.0 + math.cos(math.pi * (1.0 - max(0.0, left))))
