"""The KV block manager, as vLLM v1's block pool (``v1/core/block_pool.py``), in our own code: which fixed-size blocks
of the KV pool are free, and how many holders each used block has (a prompt's ``n`` answers and a cached prefix share
blocks: a block is free again when its last holder lets it go).

Pure bookkeeping: no tensors. Block 0 is never handed out: it is the null block that padding reads and writes (as
vLLM's ``null_block``), so a padded row never touches a block a sequence holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class NoFreeBlocks(RuntimeError):
    """Fewer free KV blocks than asked for: something must be freed (a prefix evicted, a row preempted) first."""


@dataclass
class BlockTable:
    """One sequence's KV: the blocks holding its positions, in order, and how many positions are written."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0  # positions whose keys and values are in the blocks


class BlockManager:
    """``num_blocks`` blocks of ``block_size`` positions (the null block among them); ``limit``: blocks that may be
    in use at once (the KV pool may hold fewer so far: ``add`` makes more of them usable)."""

    def __init__(self, block_size: int, usable: int = 1):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.refs: list[int] = [1]  # per block: its holders (the null block: always held)
        self._free: list[int] = []  # a stack: the lowest-numbered blocks are handed out first
        self.add(usable - 1)

    @property
    def num_blocks(self) -> int:
        """Blocks usable now, the null block included."""
        return len(self.refs)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        """Blocks some sequence or cached prefix holds (the null block not counted)."""
        return self.num_blocks - 1 - self.free_blocks

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def add(self, blocks: int) -> None:
        """``blocks`` more blocks are usable (the pool has grown)."""
        first = len(self.refs)
        self.refs += [0] * max(blocks, 0)
        self._free = list(range(len(self.refs) - 1, first - 1, -1)) + self._free

    def allocate(self, count: int) -> list[int]:
        """``count`` free blocks, each with one holder; ``NoFreeBlocks`` (and none taken) if fewer are free."""
        if count > len(self._free):
            raise NoFreeBlocks(f"{count} KV blocks asked for, {len(self._free)} free")
        taken = [self._free.pop() for _ in range(count)]
        for block in taken:
            self.refs[block] = 1
        return taken

    def share(self, blocks: list[int]) -> list[int]:
        """Another holder for each of ``blocks`` (a copy of the table that reads the same blocks)."""
        for block in blocks:
            if self.refs[block] < 1:
                raise ValueError(f"block {block} is free: it cannot be shared")
            self.refs[block] += 1
        return list(blocks)

    def free(self, blocks: list[int]) -> None:
        """One holder of each of ``blocks`` lets it go; a block nobody holds is free again."""
        for block in reversed(blocks):  # the table's first blocks end on top of the stack: reused first
            if block == 0:
                continue
            if self.refs[block] < 1:
                raise ValueError(f"block {block} freed twice")
            self.refs[block] -= 1
            if not self.refs[block]:
                self._free.append(block)

    def shared(self, block: int) -> bool:
        """Whether another holder reads ``block`` too (writing to it must copy it first)."""
        return self.refs[block] > 1
