"""KV reuse for repeat questions: a prompt's prefix up to its last visual token (system text, earlier turns, the
media), kept by content, so a second question about the same video prefills only its own text.

The key is the prefix's token ids and the media's content keys (their pixels, hashed once per request); the value is
a block table holding the prefix's blocks in the paged KV pool (``kv.PagedKV``): a hit shares those blocks with the
new request (one more holder each, copied only where it writes: the last, partly filled block), nothing is copied
into or out of the cache. Bounded by bytes, least recently used first out; the engine also evicts from here before
it preempts a running row when the pool runs out. A 32-frame LLaVA-NeXT-Video-7B prefix holds about 2.4 GB in bf16:
size ``prefix_cache_mb`` to the GPU.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from video_llava.cache import LRUCache, content_key
from video_llava.engine.blocks import BlockTable


def prefix_length(ids: Sequence[int], visual_ids: set[int]) -> int:
    """Positions up to and including the last visual token (0: the prompt has none)."""
    last = max((k for k, t in enumerate(ids) if t in visual_ids), default=-1)
    return last + 1


class PrefixCache:
    """Prefixes' block tables in ``kv``'s pool, up to ``max_bytes`` of their blocks."""

    def __init__(self, max_bytes: int, kv: Any):
        self.kv = kv
        self.block_bytes = kv.shape.position_bytes * kv.block_size
        self.store = LRUCache(max_bytes, lambda table: len(table.blocks) * self.block_bytes, kv.release)

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

    def get(self, key: str) -> BlockTable | None:
        """A table sharing the prefix's blocks (its holder must ``release`` it), or None."""
        table = self.store.get(key)
        return None if table is None else self.kv.share(table)

    def put(self, key: str, table: BlockTable, length: int) -> None:
        """Keep the first ``length`` positions of ``table`` (its blocks shared, not copied; a prefix larger than the
        whole cache is not kept, and so not shared)."""
        if self.kv.manager.blocks_for(length) * self.block_bytes > self.store.max_bytes:
            return
        self.store.put(key, self.kv.share(table, length))

    def evict(self) -> bool:
        """Let the least recently used prefix's blocks go (the pool needs them); whether there was one."""
        return self.store.evict_oldest()

    def clear(self) -> None:
        self.store.clear()

    def stats(self) -> dict:
        return self.store.stats()
