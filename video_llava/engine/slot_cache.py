"""What the model's forward is given as its cache during a decode step: transformers' ``DynamicCache`` whose layers
write into the running batch's buffers (``kv.BatchKV``) at its write index and return the positions it reads."""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicCache, DynamicLayer


class SlotLayer(DynamicLayer):
    """One model layer's view of the batch's buffers: ``update`` writes the step's keys and values of every row at
    the batch's write index (``index_copy_`` with a tensor index: the same kernel every step) and returns the
    positions of the batch's ``view``."""

    def __init__(self, batch: Any, index: int):
        super().__init__()
        self.batch, self.index = batch, index
        self.is_initialized = True

    @property
    def _buffers(self) -> tuple[Any, Any]:
        return self.batch.keys[self.index], self.batch.values[self.index]

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        keys, values = self._buffers
        rows, start, stop = self.batch.view
        keys[:key_states.shape[0]].index_copy_(2, self.batch.write, key_states)
        values[:value_states.shape[0]].index_copy_(2, self.batch.write, value_states)
        return keys[:rows, :, start:stop], values[:rows, :, start:stop]

    def get_seq_length(self) -> int:
        return self.batch.end

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        _, start, stop = self.batch.view
        return stop - start, 0

    def get_max_length(self) -> int:
        return self.batch.capacity

    @property
    def keys(self) -> Any:  # what it holds now, for code that reads a layer's keys
        rows, start, stop = self.batch.view
        return self._buffers[0][:rows, :, start:stop - 1]

    @keys.setter
    def keys(self, value: Any) -> None:  # DynamicLayer's __init__ sets None: the buffers are the batch's
        pass

    @property
    def values(self) -> Any:
        rows, start, stop = self.batch.view
        return self._buffers[1][:rows, :, start:stop - 1]

    @values.setter
    def values(self, value: Any) -> None:
        pass


def slot_cache(batch: Any, num_layers: int) -> DynamicCache:
    """A ``DynamicCache`` whose layers read and write ``batch``'s buffers."""
    cache = DynamicCache()
    cache.layers = [SlotLayer(batch, i) for i in range(num_layers)]
    return cache
