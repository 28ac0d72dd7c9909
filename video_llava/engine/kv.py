"""The running batch's KV cache: one transformers ``DynamicCache`` whose rows are left-padded to one length.

A sequence is prefilled alone (no padding in its prefill) and its one-row cache joins the batch between decode
steps; a finished sequence's row leaves. The mask marks each row's real positions, so one decode step over all rows
attends exactly as each sequence alone would (as ``generate`` does with a left-padded batch). The batch's layers
append in place (``reserved.ReservedLayer``: a decode step writes one position, it does not copy the KV); a row
joining or leaving copies the batch's KV, which a paged cache would avoid.
"""

from __future__ import annotations

from typing import Any, Sequence


def cache_layers(cache: Any) -> list[Any]:
    """The cache's per-layer key/value holders; ``TypeError`` for a cache this batch cannot splice."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer).__name__ in ("DynamicLayer", "ReservedLayer") for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []})
        raise TypeError(f"continuous batching needs a DynamicCache of full-attention layers, got {kinds or cache!r}")
    return list(layers)


def _left_pad(tensor: Any, length: int) -> Any:
    import torch.nn.functional as F

    missing = length - tensor.shape[-2]
    return tensor if missing == 0 else F.pad(tensor, (0, 0, missing, 0))


class BatchKV:
    """KV of the running rows (``cache``) and which of its positions are real (``mask``, rows x length)."""

    def __init__(self):
        self.cache: Any = None
        self.mask: Any = None

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, cache: Any, length: int, copies: int = 1) -> None:
        """Append a prefilled sequence's one-row cache of ``length`` positions as the last ``copies`` rows (the
        answers of one prefill)."""
        import torch

        theirs = [(layer.keys, layer.values) for layer in cache_layers(cache)]
        if copies > 1:
            theirs = [(k.expand(copies, -1, -1, -1), v.expand(copies, -1, -1, -1)) for k, v in theirs]
        self._append_rows(theirs, torch.ones(copies, length, dtype=torch.long, device=theirs[0][0].device))

    def extend(self, other: "BatchKV") -> None:
        """Append ``other``'s rows after these (``other`` is used up)."""
        if other.cache is not None:
            self._append_rows([(layer.keys, layer.values) for layer in cache_layers(other.cache)], other.mask)

    def _append_rows(self, theirs: list[tuple[Any, Any]], mask: Any) -> None:
        import torch

        if self.cache is None:
            from video_llava.engine.reserved import reserved_cache

            self.cache = reserved_cache([(k.contiguous(), v.contiguous()) for k, v in theirs])
            self.mask = mask
            return
        width = max(self.length, mask.shape[1])
        for mine, (k, v) in zip(cache_layers(self.cache), theirs):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(k, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(v, width)])
        pad = lambda m: torch.nn.functional.pad(m, (width - m.shape[1], 0))  # noqa: E731
        self.mask = torch.cat([pad(self.mask), pad(mask)])

    def take(self, rows: Sequence[int]) -> "BatchKV":
        """A new batch of (copies of) ``rows``; this one is unchanged."""
        import copy

        part = BatchKV()
        part.cache = copy.copy(self.cache)
        part.cache.layers = [copy.copy(layer) for layer in cache_layers(self.cache)]
        for layer in part.cache.layers:
            getattr(layer, "forget_buffers", lambda: None)()  # its rows are copied out below: no shared writes
        part.mask = self.mask
        part.keep(rows)
        return part

    def crop(self) -> None:
        """Drop the positions a failed step appended to some layers before it raised (the mask was not advanced)."""
        for layer in cache_layers(self.cache):
            if layer.keys.shape[-2] > self.length:
                layer.keys, layer.values = layer.keys[..., :self.length, :], layer.values[..., :self.length, :]

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in this order); positions no kept row uses are dropped from the front."""
        import torch

        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(list(rows), device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.mask = self.mask[:, start:]
        for layer in cache_layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[..., start:, :]
            layer.values = layer.values.index_select(0, index)[..., start:, :]

    def step_inputs(self) -> tuple[Any, Any]:
        """(attention mask, position ids) of one decode step that appends a token to every row."""
        import torch

        ones = torch.ones(self.rows, 1, dtype=self.mask.dtype, device=self.mask.device)
        return torch.cat([self.mask, ones], dim=1), self.mask.sum(dim=1, keepdim=True)

    def advance(self) -> None:
        """Every row gained one real position (the decode step ran)."""
        import torch

        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
