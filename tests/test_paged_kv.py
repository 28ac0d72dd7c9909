"""Paged KV without a model: the block manager's holders, and the pool read through the model's interface (the mask
and what each layer's ``update`` returns): every row attends to exactly its own positions, in order, through shared
prompts, copies on write, rows leaving and the pool growing; a pool that cannot grow stays as it was."""

from __future__ import annotations

import pytest
import torch

from video_llava.engine.blocks import BlockManager, BlockTable, NoFreeBlocks
from video_llava.engine.kv import KVShape, PagedKV

SHAPE = KVShape(layers=2, heads=2, head_dim=3, dtype=torch.float32, device=torch.device("cpu"))


# ---- the block manager -----------------------------------------------------------------------------------------
def test_blocks_are_handed_out_lowest_first_never_the_null_block_and_all_or_nothing():
    m = BlockManager(block_size=4, usable=5)  # the null block and four
    assert m.free_blocks == 4 and m.blocks_for(9) == 3
    assert m.allocate(3) == [1, 2, 3]
    with pytest.raises(NoFreeBlocks):
        m.allocate(2)
    assert m.free_blocks == 1  # the refused allocation took nothing
    m.free([2])
    assert m.allocate(2) == [2, 4]


def test_a_shared_block_is_free_only_when_its_last_holder_lets_it_go():
    m = BlockManager(block_size=4, usable=4)
    blocks = m.allocate(2)
    m.share(blocks)
    assert m.shared(blocks[0]) and m.used_blocks == 2
    m.free(blocks)
    assert not m.shared(blocks[0]) and m.used_blocks == 2
    m.free(blocks)
    assert m.used_blocks == 0
    with pytest.raises(ValueError, match="freed twice"):
        m.free(blocks)


# ---- the pool, read as the model reads it ----------------------------------------------------------------------
def _write(kv: PagedKV, tables: list[BlockTable], values: list[list[float]]) -> list[list[list[float]]]:
    """One forward writing ``values[i]`` (its new positions) for row i; per row, the key values the last new
    position attends to, in order, read through every layer (each must see the same)."""
    new = len(values[0])
    for table in tables:
        kv.reserve(table, table.length + new)
    mask, positions = kv.step_inputs(tables, new)
    seen = []
    for layer in kv.cache.layers:
        rows = len(mask)
        states = torch.zeros(rows, SHAPE.heads, new, SHAPE.head_dim)
        states[:len(values)] = torch.tensor(values).reshape(len(values), 1, new, 1) + 1000 * layer.index
        keys, vals = layer.update(states.clone(), -states.clone())
        assert torch.equal(vals, -keys)
        visible = mask[:len(tables), 0, -1, :] == 0
        seen.append([(keys[i, 0, visible[i], 0] - 1000 * layer.index).tolist() for i in range(len(tables))])
    assert positions[:len(tables), -1].tolist() == [t.length + new - 1 for t in tables]
    kv.advance(tables, new)
    assert seen[0] == seen[1]
    return seen[0]


@pytest.mark.parametrize("static", [False, True])
def test_each_row_attends_to_exactly_its_own_positions_through_shares_copies_leaves_and_growth(static):
    kv = PagedKV(SHAPE, max_positions=4096, block_size=4, static=static, preallocate=False, first_blocks=4)
    first_pool = kv.keys[0]
    tables: list[BlockTable] = []
    expected: list[list[float]] = []
    for step in range(80):
        if step % 9 == 0:  # a prompt is prefilled in two chunks; its answers join, sharing its blocks
            prompt = BlockTable()
            values = [100.0 * (step + 1) + p for p in range(3 + step % 7)]
            _write(kv, [prompt], [values[:2]])
            assert _write(kv, [prompt], [values[2:]]) == [values]
            answers = 2 if step % 18 == 0 else 1
            for _ in range(answers):
                tables.append(kv.share(prompt))
                expected.append(list(values))
            kv.release(prompt)
        if step % 7 == 6 and len(tables) > 1:  # a row leaves
            gone = tables.pop(len(tables) // 2)
            expected.pop(len(expected) // 2)
            kv.release(gone)
        values = [[10_000.0 * (step + 1) + i] for i in range(len(tables))]
        for row, v in zip(expected, values):
            row.append(v[0])
        assert _write(kv, tables, values) == expected, step
    assert kv.keys[0] is not first_pool  # the pool grew on the way (its blocks kept their contents)
    held = kv.manager.used_blocks
    assert held <= sum(kv.manager.blocks_for(len(r)) for r in expected)  # no block held that no row needs
    for table in tables:
        kv.release(table)
    assert kv.manager.used_blocks == 0


def test_a_shared_last_block_is_copied_before_a_row_writes_to_it():
    kv = PagedKV(SHAPE, max_positions=64, block_size=4, preallocate=False)
    prompt = BlockTable()
    _write(kv, [prompt], [[1.0, 2.0, 3.0, 4.0, 5.0]])  # a block and a bit
    a, b = kv.share(prompt), kv.share(prompt)
    kv.release(prompt)
    assert a.blocks == b.blocks and kv.manager.used_blocks == 2
    assert _write(kv, [a, b], [[6.0], [7.0]]) == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 2.0, 3.0, 4.0, 5.0, 7.0]]
    assert a.blocks[0] == b.blocks[0] and a.blocks[1] != b.blocks[1]  # the full block still shared
    assert kv.manager.used_blocks == 3


def test_a_pool_that_fails_to_grow_at_layer_k_stays_as_it_was_and_stops_growing():
    kv = PagedKV(SHAPE, max_positions=1 << 16, block_size=4, preallocate=False, first_blocks=4)
    table = BlockTable()
    _write(kv, [table], [[float(p) for p in range(8)]])
    made = {"n": 0}
    original = kv._new_pool

    def failing(positions):
        made["n"] += 1
        if made["n"] == 3:  # the second layer's keys (fault injection: an allocation that raises at layer k)
            raise torch.OutOfMemoryError("no room")
        return original(positions)

    kv._new_pool = failing
    pools = list(kv.keys + kv.values)
    big = BlockTable()
    with pytest.raises(NoFreeBlocks):
        kv.reserve(big, kv.max_positions)
    assert made["n"] == 3 and all(a is b for a, b in zip(kv.keys + kv.values, pools))
    assert kv.max_positions == (kv.manager.num_blocks - 1) * 4  # capped at what it holds
    assert big.blocks == []
    assert _write(kv, [table], [[8.0]]) == [[float(p) for p in range(9)]]  # the row is as it was
