"""A KV cache layer that appends in place.

transformers' ``DynamicLayer.update`` concatenates: every decode step copied each layer's whole KV to add one
position (for eight 32-frame 7B sequences, about 19 GB read and written per step, on top of attention reading it).
``ReservedLayer`` keeps its keys and values as views of buffers with room for ``RESERVE`` more positions and writes
new ones into that room; only when the room runs out (or the batch replaced its tensors: a row joined or left) is
the KV copied, into a new buffer with room again. The attention sees the same values as with ``DynamicLayer``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

RESERVE = 256  # positions of room a buffer is given past its current length


def buffer_with_room(tensor: torch.Tensor, room: int = RESERVE) -> tuple[torch.Tensor, torch.Tensor]:
    """(a buffer of ``tensor``'s rows, heads and head size with ``room`` positions more, the view of it holding
    ``tensor``'s values)."""
    rows, heads, length, dim = tensor.shape
    buffer = torch.empty(rows, heads, length + room, dim, dtype=tensor.dtype, device=tensor.device)
    view = buffer[..., :length, :]
    view.copy_(tensor)
    return buffer, view


class ReservedLayer(DynamicLayer):
    """``DynamicLayer`` whose ``update`` writes into spare room instead of concatenating."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _holds_views(self, new: int) -> bool:
        """Whether keys and values are still views of the buffers starting at their first position, with room for
        ``new`` positions."""
        for tensor, buffer in ((self.keys, self._key_buffer), (self.values, self._value_buffer)):
            if buffer is None or tensor is None or tensor.dim() != 4 or tensor.data_ptr() != buffer.data_ptr():
                return False
            if tensor.stride() != buffer.stride() or tensor.shape[:2] != buffer.shape[:2]:
                return False
            if tensor.shape[-2] + new > buffer.shape[-2]:
                return False
        return True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        new = key_states.shape[-2]
        if not self._holds_views(new):
            self._key_buffer, self.keys = buffer_with_room(self.keys, new + RESERVE)
            self._value_buffer, self.values = buffer_with_room(self.values, new + RESERVE)
        length = self.keys.shape[-2]
        self._key_buffer[..., length:length + new, :].copy_(key_states)
        self._value_buffer[..., length:length + new, :].copy_(value_states)
        self.keys = self._key_buffer[..., :length + new, :]
        self.values = self._value_buffer[..., :length + new, :]
        return self.keys, self.values

    def forget_buffers(self) -> None:
        """Stop writing into the current buffers (another layer now shares them)."""
        self._key_buffer = self._value_buffer = None


def reserved_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A ``DynamicCache`` of ``ReservedLayer``s holding these (keys, values), one pair per model layer."""
    cache = DynamicCache()
    cache.layers = []
    for keys, values in layers:
        layer = ReservedLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache
