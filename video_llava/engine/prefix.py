"""KV reuse for repeat questions: the KV of a prompt's prefix up to its last visual token (system text, earlier
turns, the media), kept by content, so a second question about the same video prefills only its own text.

The key is the prefix's token ids and the media's content keys (their pixels, hashed once per request); the value is each layer's keys and values of those
positions (copied out of the request's cache, never written to afterwards). Bounded by bytes, least recently used
first out. A 32-frame LLaVA-NeXT-Video-7B prefix holds about 2.4 GB in bf16: size ``prefix_cache_mb`` to the GPU.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from video_llava.cache import LRUCache, content_key
from video_llava.engine.kv import cache_layers

Layers = list[tuple[Any, Any]]  # per layer: keys, values (1, heads, positions, head_dim)


def prefix_length(ids: Sequence[int], visual_ids: set[int]) -> int:
    """Positions up to and including the last visual token (0: the prompt has none)."""
    last = max((k for k, t in enumerate(ids) if t in visual_ids), default=-1)
    return last + 1


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.store = LRUCache(max_bytes, lambda layers: sum(k.numel() * k.element_size() * 2 for k, _ in layers))

    @property
    def enabled(self) -> bool:
        return self.store.max_bytes > 0

    @staticmethod
    def key(prefix_ids: Sequence[int], media_keys: Sequence[str]) -> str:
        """The key of a prefix: its token ids and its media's content keys (``media_embeds.media_keys``)."""
        return content_key(np.asarray(prefix_ids, np.int64).tobytes(), *media_keys)

    def holds(self, key: str) -> bool:
        """Whether ``key`` is cached now (no copy made, not counted as a use)."""
        return self.enabled and key in self.store

    def get(self, key: str) -> Any | None:
        """A fresh one-row ``DynamicCache`` holding the prefix, or None."""
        layers = self.store.get(key)
        if layers is None:
            return None
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(layers):
            cache.update(k, v, i)  # into new tensors: the stored ones stay as they are
        return cache

    def put(self, key: str, cache: Any, length: int) -> None:
        """Keep the first ``length`` positions of a one-row cache."""
        layers = [(layer.keys[..., :length, :].clone(), layer.values[..., :length, :].clone())
                  for layer in cache_layers(cache)]
        self.store.put(key, layers)

    def stats(self) -> dict:
        return self.store.stats()
