"""The next token of each row from its own sampling parameters: greedy rows take the argmax (as ``generate`` with
``do_sample=False``), sampled rows draw from their temperature/top-p distribution with their own generator."""

from __future__ import annotations

import random
from typing import Any, Sequence

from video_llava.engine.params import SamplingParams


def row_generator(seed: int | None) -> Any:
    """A CPU generator for one sampled row: seeded by the request, else from the system's entropy."""
    import torch

    return torch.Generator().manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(63))


def _top_p_filtered(logits: Any, top_p: float) -> Any:
    """Logits with every token outside the smallest set whose probability reaches ``top_p`` set to -inf."""
    import torch

    ordered, index = logits.sort(descending=True)
    probs = ordered.softmax(-1)
    outside = probs.cumsum(-1) - probs >= top_p  # the token that crosses top_p stays in
    ordered = ordered.masked_fill(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(0, index, ordered)


def next_tokens(logits: Any, params: Sequence[SamplingParams], generators: Sequence[Any]) -> list[int | Exception]:
    """One token per row of ``logits`` (rows x vocabulary, float32); in place of a row's token, the error its
    sampling raised (non-finite probabilities), so one bad row does not take the others' tokens with it."""
    import torch

    chosen: list[int | Exception] = logits.argmax(-1).tolist()
    for i, (p, generator) in enumerate(zip(params, generators)):
        if p.temperature <= 0:
            continue
        try:
            row = logits[i].float().cpu() / p.temperature
            if p.top_p < 1:
                row = _top_p_filtered(row, p.top_p)
            chosen[i] = int(torch.multinomial(row.softmax(-1), 1, generator=generator))
        except RuntimeError as exc:
            chosen[i] = exc
    return chosen
