"""What the model's forward is given as its cache: transformers' ``DynamicCache`` whose layers write into the paged KV
pool (``kv.PagedKV``) and hand the attention each row's positions gathered from its blocks."""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicCache, DynamicLayer


class PagedLayer(DynamicLayer):
    """One model layer's view of the pool: ``update`` writes the forward's new keys and values to the slots of the
    KV's ``view`` (``index_copy_``) and returns every row's positions, in order (``index_select``)."""

    def __init__(self, kv: Any, index: int):
        super().__init__()
        self.kv, self.index = kv, index
        self.is_initialized = True

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        view = self.kv.view
        out = []
        for pool, states in ((self.kv.keys[self.index], key_states), (self.kv.values[self.index], value_states)):
            rows, heads, new, dim = states.shape
            pool.index_copy_(1, view.write, states.transpose(0, 1).reshape(heads, rows * new, dim))
            if view.block_mask is not None:  # FlexAttention reads the pool itself, through the view's block mask
                out.append(pool.unsqueeze(0))
                continue
            gathered = pool.index_select(1, view.gather.reshape(-1))
            out.append(gathered.view(heads, rows, view.positions, dim).transpose(0, 1))
        return out[0], out[1]

    def get_seq_length(self) -> int:
        """Positions before the forward's new ones (of the longest row)."""
        view = self.kv.view
        return 0 if view is None else view.positions - view.new

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        view = self.kv.view
        return (0 if view is None else view.positions), 0

    def get_max_length(self) -> int:
        return self.kv.max_positions

    @property
    def keys(self) -> Any:  # DynamicLayer's __init__ sets these; the pool is the KV's
        return None

    @keys.setter
    def keys(self, value: Any) -> None:
        pass

    @property
    def values(self) -> Any:
        return None

    @values.setter
    def values(self, value: Any) -> None:
        pass


def paged_cache(kv: Any, num_layers: int) -> DynamicCache:
    """A ``DynamicCache`` whose layers read and write ``kv``'s pool."""
    cache = DynamicCache()
    cache.layers = [PagedLayer(kv, i) for i in range(num_layers)]
    return cache
