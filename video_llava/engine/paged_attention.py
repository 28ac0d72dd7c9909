"""Attention over the paged KV pool itself, with torch's FlexAttention (``attention="flex"``): no row's positions
are gathered; a block mask over the whole pool lets each query see exactly the slots of its own row's blocks, up to
its own position. No kernel is written here: FlexAttention's (compiled to a block-sparse kernel on a GPU; on a CPU
in eager mode it computes every score of the pool and masks them, which is what tests need, not what is fast).

The model's text attention runs through ``paged_flex_attention`` (registered with transformers' ``AttentionInterface``
under ``FLEX``); outside the engine's forwards (transformers' own ``generate`` on the same model) it is sdpa's.
"""

from __future__ import annotations

import threading
from typing import Any

FLEX = "video_llava_paged_flex"
_active = threading.local()  # the view of the engine's forward running in this thread (``PagedKV.step_inputs``)


def set_active(view: Any) -> None:
    _active.view = view


def active() -> Any:
    return getattr(_active, "view", None)


def register() -> None:
    """``FLEX`` as an attention implementation transformers knows (its masks made as sdpa's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLEX, paged_flex_attention)
    AttentionMaskInterface.register(FLEX, sdpa_mask)


def paged_flex_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
                         dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """(rows, new, heads, head dim) attention output. In an engine forward ``key``/``value`` are the pool
    (1, kv heads, pool positions, head dim) and the view's block mask says what each query sees; otherwise sdpa."""
    view = active()
    if view is None or view.block_mask is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    rows, heads, new, dim = query.shape
    packed = query.transpose(0, 1).reshape(1, heads, rows * new, dim)  # every row's queries, one sequence
    out = _flex(query.is_cuda)(packed, key, value, block_mask=view.block_mask, scale=scaling,
                               enable_gqa=key.shape[1] != heads)
    return out.reshape(heads, rows, new, dim).permute(1, 2, 0, 3), None


def _flex(on_gpu: bool) -> Any:
    """FlexAttention: compiled on a GPU (its block-sparse kernel, shapes dynamic), eager on a CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    if not on_gpu:
        return flex_attention
    if getattr(_flex, "compiled", None) is None:
        import torch

        _flex.compiled = torch.compile(flex_attention, dynamic=True)
    return _flex.compiled


def block_mask(tables: list[list[int]], starts: list[int], new: int, pool_positions: int, block_size: int,
               device: Any) -> Any:
    """FlexAttention's block mask for ``new`` queries per row (row i's at positions ``starts[i]`` onwards) over the
    whole pool: a query sees the slots of its row's blocks whose position in the row is at most its own."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    rows = len(tables)
    blocks = pool_positions // block_size
    logical = torch.full((rows, blocks), -1, dtype=torch.long)  # per row and pool block: its place in the row
    for i, table in enumerate(tables):
        logical[i, torch.tensor(table, dtype=torch.long)] = torch.arange(len(table))
    logical = logical.to(device)
    start = torch.tensor(starts, dtype=torch.long, device=device)

    def visible(b: Any, h: Any, q: Any, kv: Any) -> Any:
        row = q // new
        place = logical[row, kv // block_size]
        return (place >= 0) & (place * block_size + kv % block_size <= start[row] + q % new)

    return create_block_mask(visible, None, None, rows * new, pool_positions, device=device,
                             _compile=getattr(device, "type", str(device)) == "cuda")
