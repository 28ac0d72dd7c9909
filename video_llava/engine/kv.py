"""Paged KV: every sequence's keys and values in fixed-size blocks of one pool per model layer, as vLLM v1's KV cache
(``v1/core/kv_cache_manager.py``), in our own code.

A sequence holds a ``BlockTable`` (its blocks, in order, and the positions written). Blocks are taken as it grows
(``reserve``) and go back as it leaves (``release``); the ``n`` answers of one prompt and a cached prefix share the
prompt's blocks (``share``: one more holder each), and a shared block is copied before it is written (copy on
write). What the pool holds is what the rows' own positions need, to within one block each.

A forward (a prompt chunk of one sequence, or a decode step of every running row) is given ``view``: the slots its
new keys and values go to and, per row, the slots of every position it attends to, in order. The cache layers
(``paged_cache.py``) write the new positions into the pool (``index_copy_``) and hand the attention each row's
positions gathered from its blocks (``index_select``), with a mask over the padding: the attention kernel is
torch's own (sdpa, or flash-attention's with a padding mask), no kernel written here. A row's positions come back
in order, so a greedy answer is token-identical to ``generate`` (float32 on CPU, tested). The gather reads every
row's positions once per layer and step; ``attention="flex"`` reads the pool itself instead, through FlexAttention
and a block mask (``paged_attention.py``: no copy; compiled on a GPU).

On a CPU the pool starts small and grows (built, then swapped in: a failed allocation leaves the pool as it was and
caps its size); on a GPU it is allocated whole at start, so its address never changes (CUDA graphs).
``static`` views pad the rows to a power of two and the positions to a multiple of ``STATIC_POSITIONS``, so a
compiled step sees few shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from video_llava.engine.blocks import BlockManager, BlockTable, NoFreeBlocks

log = logging.getLogger(__name__)

BLOCK_SIZE = 16  # positions per block (vLLM's default)
STATIC_POSITIONS = 1024  # static views' positions are a multiple of this: few shapes, few compiled graphs
FIRST_BLOCKS = 256  # blocks a growing pool starts with


@dataclass(frozen=True)
class KVShape:
    """What one KV position of a model is: per layer, ``heads`` key and value vectors of ``head_dim``."""

    layers: int
    heads: int
    head_dim: int
    dtype: Any
    device: Any

    @classmethod
    def of(cls, model: Any) -> "KVShape":
        text = model.config.get_text_config()
        layer_types = getattr(text, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types) and getattr(text, "sliding_window", None):
            raise TypeError(f"the engine's paged KV holds full-attention layers only, got {sorted(set(layer_types))}")
        head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        heads //= getattr(model, "tp_size", None) or 1  # tensor parallelism: this rank's heads (engine/shards.py)
        return cls(text.num_hidden_layers, heads, head, model.dtype, model.device)

    @property
    def position_bytes(self) -> int:
        return 2 * self.layers * self.heads * self.head_dim * self.dtype.itemsize


@dataclass
class View:
    """What one forward reads and writes: ``write`` (rows x new positions, flattened) the slots its new positions
    go to; ``gather`` (rows x positions) the slots each row attends to, in order (padding: the null block's);
    ``rows`` the sequences it computes (``gather`` may have more: static padding)."""

    write: Any
    gather: Any
    rows: int
    new: int  # positions each row writes
    block_mask: Any = None  # FlexAttention's mask over the whole pool (``attention="flex"``), else None
    span: int = 0  # with a block mask: the positions of the longest row (``gather`` is not made)

    @property
    def positions(self) -> int:
        return self.span or self.gather.shape[1]


class PagedKV:
    """The KV pool of one engine: ``max_positions`` positions at most, in blocks of ``block_size``; allocated whole
    (``preallocate``; by default on a GPU) or ``first_blocks`` first, doubling as needed."""

    def __init__(self, shape: KVShape, max_positions: int, block_size: int = BLOCK_SIZE, static: bool = False,
                 preallocate: bool | None = None, first_blocks: int = FIRST_BLOCKS, attention: str = "gather"):
        if attention not in ("gather", "flex") or (attention == "flex" and static):
            raise ValueError(f"attention must be gather or flex (flex with dynamic steps only), got {attention!r}")
        self.shape, self.block_size, self.static, self.attention = shape, block_size, static, attention
        self.max_blocks = 1 + -(-max_positions // block_size)  # the null block and the sequences'
        whole = shape.device.type == "cuda" if preallocate is None else preallocate
        self.manager = BlockManager(block_size)
        self.keys: list[Any] = []  # per layer: (heads, blocks x block_size, head_dim): a head's positions contiguous
        self.values: list[Any] = []
        self.view: View | None = None  # the forward running now
        self._static_views: dict[tuple, View] = {}
        self._grow(self.max_blocks if whole else min(first_blocks, self.max_blocks))
        from video_llava.engine.paged_cache import paged_cache

        self.cache = paged_cache(self, shape.layers)  # what the model is given: a DynamicCache over the pool

    # ---- what it holds -----------------------------------------------------------------------------------------
    @property
    def max_positions(self) -> int:
        """Positions the sequences may hold at most (the null block not counted)."""
        return (self.max_blocks - 1) * self.block_size

    @property
    def held_positions(self) -> int:
        """Positions of the blocks in use now (what the rows' own positions need, up to a block each)."""
        return self.manager.used_blocks * self.block_size

    @property
    def free_positions(self) -> int:
        """Positions that may still be taken: the free blocks and those the pool may grow by."""
        return (self.manager.free_blocks + self.max_blocks - self.manager.num_blocks) * self.block_size

    @property
    def static_shapes(self) -> list[tuple[int, int]]:
        """(rows, positions) of the static views made so far: the shapes compiled steps see."""
        return [tuple(view.gather.shape) for view in self._static_views.values()]

    @property
    def pool_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ---- blocks ------------------------------------------------------------------------------------------------
    def reserve(self, table: BlockTable, positions: int) -> None:
        """Room in ``table`` for positions up to ``positions`` (all of them or none: ``NoFreeBlocks``): new blocks,
        and a copy of the block the next position is written to if another holder reads it."""
        m = self.manager
        new = max(m.blocks_for(positions) - len(table.blocks), 0)
        at = table.length // self.block_size
        copy = at < len(table.blocks) and m.shared(table.blocks[at])
        needed = new + copy
        if needed > m.free_blocks:
            self._grow(m.num_blocks + max(needed - m.free_blocks, m.num_blocks))  # doubles, up to the limit
            if needed > m.free_blocks:
                raise NoFreeBlocks(f"{needed} KV blocks needed, {m.free_blocks} free")
        taken = m.allocate(needed)
        if copy:
            old, table.blocks[at] = table.blocks[at], taken.pop()
            self._copy_block(old, table.blocks[at], table.length % self.block_size)
            m.free([old])
        table.blocks += taken

    def share(self, table: BlockTable, positions: int | None = None) -> BlockTable:
        """A table reading the same blocks as ``table`` (its first ``positions``; all of them by default)."""
        length = table.length if positions is None else min(positions, table.length)
        return BlockTable(self.manager.share(table.blocks[:self.manager.blocks_for(length)]), length)

    def release(self, table: BlockTable) -> None:
        """``table``'s blocks go back (to the other holders, or free); the table is empty after."""
        self.manager.free(table.blocks)
        table.blocks, table.length = [], 0

    def _copy_block(self, source: int, target: int, positions: int) -> None:
        bs = self.block_size
        for pool in self.keys + self.values:
            pool[:, target * bs:target * bs + positions] = pool[:, source * bs:source * bs + positions]

    def _grow(self, blocks: int) -> None:
        """The pool holds ``blocks`` blocks (at most ``max_blocks``): every layer's new tensors made before any is
        used, so a failed allocation (out of memory at layer k) leaves the pool as it was, and caps it there."""
        blocks = min(blocks, self.max_blocks)
        have = self.manager.num_blocks if self.keys else 0
        if blocks <= have:
            return
        s, bs = self.shape, self.block_size
        try:
            built = [[self._new_pool(blocks * bs) for _ in range(s.layers)] for _ in range(2)]
        except (MemoryError, RuntimeError) as exc:  # torch's out-of-memory errors are RuntimeErrors
            if not self.keys or "CUDA error" in str(exc):
                raise
            log.warning("the KV pool could not grow past %d positions (%s: %s): it stays at that size",
                        (have - 1) * bs, type(exc).__name__, exc)
            self.max_blocks = have
            return
        for fresh, old in zip(built[0] + built[1], self.keys + self.values):
            fresh[:, :old.shape[1]] = old
        self.keys[:], self.values[:] = built  # in place: the cache's layers read these lists
        self.manager.add(blocks - max(have, 1))

    def _new_pool(self, positions: int) -> Any:
        """One layer's keys or values for ``positions`` positions; on a GPU with ``static`` views, at an address a
        CUDA graph may keep."""
        import torch

        s = self.shape
        pool = torch.zeros(s.heads, positions, s.head_dim, dtype=s.dtype, device=s.device)
        if self.static and pool.is_cuda:
            torch._dynamo.mark_static_address(pool)
        elif self.static:  # a pool that grows: its size is no reason to compile a step again
            torch._dynamo.mark_dynamic(pool, 1)
        return pool

    # ---- forwards ----------------------------------------------------------------------------------------------
    def step_inputs(self, tables: Sequence[BlockTable], new: int, four_d: bool = True) -> tuple[Any, Any]:
        """Set ``view`` for a forward of ``new`` positions per table (room already reserved) and return its
        (attention mask, position ids): 4-D and additive in the model's dtype, or with ``four_d=False`` the rows x
        positions padding mask flash-attention takes."""
        import torch

        if self.attention == "flex":
            return self._flex_inputs(tables, new)
        bs, rows = self.block_size, len(tables)
        lengths = [t.length for t in tables]
        padded = 1 << (rows - 1).bit_length() if self.static else rows
        longest = max(lengths) + new
        span = -(-longest // STATIC_POSITIONS) * STATIC_POSITIONS if self.static else longest
        width = max(len(t.blocks) for t in tables)
        table = torch.zeros(padded, max(width, -(-span // bs)), dtype=torch.long)
        for i, t in enumerate(tables):
            table[i, :len(t.blocks)] = torch.tensor(t.blocks, dtype=torch.long)
        start = torch.zeros(padded, 1, dtype=torch.long)
        start[:rows, 0] = torch.tensor(lengths, dtype=torch.long)
        position = torch.arange(span).unsqueeze(0)
        slot = table.gather(1, (position // bs).expand(padded, -1)) * bs + position % bs  # gather: no broadcast
        readable = position < start + new  # written before, or by this forward
        readable[rows:, 0] = True  # a padding row reads the null block's first slot (a softmax over nothing is NaN)
        gather = torch.where(readable, slot, 0)
        fresh = start + torch.arange(new).unsqueeze(0)  # rows x new: the positions this forward writes
        write = table.gather(1, fresh // bs) * bs + fresh % bs  # a padding row's: the null block's
        device = self.shape.device
        self.view = self._static_view(write.reshape(-1), gather, rows, new) if self.static else \
            View(write.reshape(-1).to(device), gather.to(device), rows, new)
        fresh = fresh.to(device)
        if not four_d:
            return readable.long().to(device), fresh
        visible = readable.to(device).unsqueeze(1) & (position.to(device) <= fresh.unsqueeze(2))  # causal
        mask = torch.zeros(visible.shape, dtype=self.shape.dtype, device=device)
        mask.masked_fill_(~visible, torch.finfo(self.shape.dtype).min)
        return mask.unsqueeze(1), fresh

    def _flex_inputs(self, tables: Sequence[BlockTable], new: int) -> tuple[Any, Any]:
        """``step_inputs`` for FlexAttention over the pool: the view's block mask says what each query sees, the mask
        handed to the model is a placeholder its attention ignores."""
        import torch

        from video_llava.engine import paged_attention

        device = self.shape.device
        starts = [t.length for t in tables]
        mask = paged_attention.block_mask([t.blocks for t in tables], starts, new, self.manager.num_blocks *
                                          self.block_size, self.block_size, device)
        bs = self.block_size
        write = torch.tensor([t.blocks[q // bs] * bs + q % bs for t in tables for q in range(t.length, t.length + new)],
                             dtype=torch.long)
        self.view = View(write.to(device), torch.zeros(len(tables), 1, dtype=torch.long, device=device),
                         len(tables), new, block_mask=mask, span=max(starts) + new)
        paged_attention.set_active(self.view)
        positions = torch.tensor(starts, device=device).unsqueeze(1) + torch.arange(new, device=device)
        return torch.zeros(len(tables), 1, new, 1, dtype=self.shape.dtype, device=device), positions

    def finish(self) -> None:
        """The forward is over (run or raised): no view is active."""
        from video_llava.engine import paged_attention

        self.view = None
        paged_attention.set_active(None)

    def _static_view(self, write: Any, gather: Any, rows: int, new: int) -> View:
        """The view of a static forward in the same tensors as the last one of its shapes (updated in place): a
        compiled step reads them as the same inputs every time."""
        key = (tuple(write.shape), tuple(gather.shape))
        kept = self._static_views.get(key)
        if kept is None:
            kept = self._static_views[key] = View(write.to(self.shape.device), gather.to(self.shape.device), rows, new)
        else:
            kept.write.copy_(write)
            kept.gather.copy_(gather)
            kept.rows = rows
        return kept

    def advance(self, tables: Sequence[BlockTable], new: int) -> None:
        """The forward ran: each table's ``new`` positions are written."""
        for t in tables:
            t.length += new
        self.finish()

    def drop(self) -> None:
        """The pool's memory goes (its engine is closed: nothing reads it again)."""
        self.keys.clear()
        self.values.clear()
        self._static_views.clear()

    def reset(self) -> None:
        """Every block free (the engine failed every sequence after an error of its own)."""
        self.manager = BlockManager(self.block_size, self.manager.num_blocks)
        self.view = None


__all__ = ["BlockTable", "KVShape", "NoFreeBlocks", "PagedKV", "View"]
