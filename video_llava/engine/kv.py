"""The running batch's KV cache: per model layer one buffer of row slots x positions, written in place.

A sequence is prefilled alone (no padding in its prefill); its one-row cache is copied into a free row slot between
decode steps, its positions ending where the batch writes next. Every decode step writes one position of every row
at the same index (``write``), and a mask marks each row's real positions, so attention sees exactly what each
sequence alone would (as ``generate`` does with a left-padded batch). A row leaving moves the last row into its slot:
joining and leaving copy one row, never the batch. Only when the buffer runs out of positions are the rows gathered
into a larger one (right-aligned, gaps closed), once per ``RESERVE`` steps or so.

What the buffers hold is row slots x positions, whatever each row's own length: every row is given the positions of
the longest (``positions_after``, what the engine's KV budget bounds). Slots come in powers of two (up to
``max_slots``), so that a row joining rarely moves the others.

A row longer than the batch's write index moves the index forward (the other rows get a masked gap, closed at the
next regathering). The attention reads only the positions from the first real one of any row to the one being
written (``view``); a compiled decode step (``static=True``) reads whole buffers instead, so that its shapes never
change between steps (CUDA graphs).
"""

from __future__ import annotations

from typing import Any, Sequence

RESERVE = 256  # positions of room a buffer is given past what its rows hold
STATIC_POSITIONS = 1024  # static buffers' positions are a multiple of this: few shapes, few compiled graphs


def cache_layers(cache: Any) -> list[Any]:
    """A prefill cache's per-layer key/value holders; ``TypeError`` for a cache this batch cannot splice."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer).__name__ == "DynamicLayer" for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []})
        raise TypeError(f"continuous batching needs a DynamicCache of full-attention layers, got {kinds or cache!r}")
    return list(layers)


def _round_up(n: int, to: int = 64) -> int:
    return -(-n // to) * to


class BatchKV:
    """KV of the running rows: slot ``i`` holds row ``i`` (``rows`` of them, in the engine's order)."""

    def __init__(self, reserve: int = RESERVE, static: bool = False, max_slots: int = 0):
        self.reserve = reserve
        self.max_slots = max_slots  # slots grow in powers of two up to this many (0: no cap), never fewer than rows
        self.keys: list[Any] = []  # per layer: (row slots, heads, positions, head size)
        self.values: list[Any] = []
        self.real: Any = None  # (row slots, positions) bool: a row's real positions
        self.lengths: Any = None  # (row slots,) long: real positions per row
        self.first: list[int] = []  # per row: its first real position
        self.rows = 0
        self.end = 0  # the position the next decode step writes, the same for every row
        self.write: Any = None  # ``end`` as a one-element tensor on the device (read by the layers' index_copy_)
        self.view: tuple[int, int, int] = (0, 0, 0)  # rows, first and last + 1 position the attention reads
        self.static = static  # compiled steps: the view is every slot of a bucket and every position
        self.cache: Any = None  # what the model is given: a DynamicCache of ``SlotLayer``s over these buffers

    @property
    def slots(self) -> int:
        return self.real.shape[0] if self.real is not None else 0

    @property
    def capacity(self) -> int:
        return self.real.shape[1] if self.real is not None else 0

    @property
    def positions(self) -> int:
        """KV positions (row slots x positions, per layer) the buffers hold now."""
        return self.slots * self.capacity

    def slots_for(self, rows: int) -> int:
        """Row slots the buffers have once they hold ``rows`` rows: never fewer than now (the buffers do not shrink
        while rows run)."""
        if rows <= self.slots:
            return self.slots
        grown = 1 << (rows - 1).bit_length()
        return max(rows, min(grown, self.max_slots)) if self.max_slots else grown

    def positions_after(self, rows: int, longest: int) -> int:
        """KV positions (row slots x positions, per layer) the buffers may come to hold with ``rows`` rows none of
        which grows past ``longest`` positions: each regathering makes room for the longest row and ``reserve``
        more. An upper bound: what the engine's KV budget is checked against before a request joins."""
        return self.slots_for(rows) * max(self._positions(longest + self.reserve), self.capacity)

    def _positions(self, n: int) -> int:
        """Positions of a new buffer that must hold ``n``: a multiple of 64, or (``static``) of
        ``STATIC_POSITIONS``, so that compiled steps see few shapes."""
        return _round_up(n, STATIC_POSITIONS if self.static else 64)

    def _new_buffer(self, *shape: int, dtype: Any, device: Any) -> Any:
        """A zeroed KV buffer (``_fixed``)."""
        import torch

        return self._fixed(torch.zeros(*shape, dtype=dtype, device=device))

    def _fixed(self, buffer: Any) -> Any:
        """``buffer``, which a compiled step writes in place: on a GPU it keeps its address for CUDA graphs."""
        import torch

        if self.static and buffer.is_cuda:
            torch._dynamo.mark_static_address(buffer)
        return buffer

    # ---- rows joining ------------------------------------------------------------------------------------------
    def add(self, cache: Any, length: int, copies: int = 1) -> None:
        """Append a prefilled sequence's one-row cache of ``length`` positions as the last ``copies`` rows (the
        answers of one prefill)."""
        import torch

        layers = [(layer.keys, layer.values) for layer in cache_layers(cache)]
        real = torch.ones(1, length, dtype=torch.bool, device=layers[0][0].device)
        self._place(layers, real, [0] * copies)

    def extend(self, other: "BatchKV") -> None:
        """Append ``other``'s rows after these (``other`` is used up)."""
        if other.rows:
            span = slice(0, other.end)
            layers = [(k[:other.rows, :, span], v[:other.rows, :, span]) for k, v in zip(other.keys, other.values)]
            self._place(layers, other.real[:other.rows, span], list(range(other.rows)))

    def _place(self, layers: list[tuple[Any, Any]], real: Any, sources: list[int]) -> None:
        """Copy rows ``sources`` of (keys, values per layer; ``real``: which positions are real) into the slots after
        the last row, their positions ending at the write index (moved forward if they are longer)."""
        import torch

        span = real.shape[1]
        if self.real is None:
            self._allocate(layers, self.slots_for(len(sources)), self._positions(span + self.reserve))
        if span > self.end:
            if span >= self.capacity:  # no room: regather every row to end where these do
                self._regather(span, span + self.reserve, self.rows + len(sources))
            self._move_write(span)
        if self.rows + len(sources) > self.slots:
            self._regather(self.end, self.capacity, self.rows + len(sources))
        at, start = self.rows, self.end - span
        index = torch.tensor(sources, device=real.device)
        for mine_k, mine_v, (k, v) in zip(self.keys, self.values, layers):
            mine_k[at:at + len(sources), :, start:self.end] = k.index_select(0, index)
            mine_v[at:at + len(sources), :, start:self.end] = v.index_select(0, index)
        rows = slice(at, at + len(sources))
        self.real[rows] = False
        self.real[rows, start:self.end] = real.index_select(0, index)
        counts = real.sum(1)
        self.lengths[rows] = counts.index_select(0, index)
        firsts = [start + int(real[s].nonzero()[0]) if int(counts[s]) else self.end for s in sources]
        self.first += firsts
        self.rows += len(sources)
        self._set_view()

    def _allocate(self, layers: list[tuple[Any, Any]], rows: int, capacity: int) -> None:
        import torch

        k, v = layers[0]
        device = k.device
        self.keys = [self._new_buffer(rows, k.shape[1], capacity, k.shape[-1], dtype=k.dtype, device=device)
                     for k, _ in layers]
        self.values = [self._new_buffer(rows, v.shape[1], capacity, v.shape[-1], dtype=v.dtype, device=device)
                       for _, v in layers]
        self.real = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.write = torch.zeros(1, dtype=torch.long, device=device)
        from video_llava.engine.slot_cache import slot_cache

        self.cache = slot_cache(self, len(layers))

    def _move_write(self, end: int) -> None:
        self.end = end
        self.write.fill_(end)

    def _regather(self, end: int, capacity: int, slots: int) -> None:
        """New buffers of ``slots`` rows and ``capacity`` positions, each row's real positions gathered to end at
        ``end`` (gaps closed; ``end`` >= every row's length)."""
        import torch

        slots = max(self.slots_for(slots), 1)
        capacity = self._positions(max(capacity, end + 1))
        n, device = self.rows, self.real.device
        lengths = self.lengths[:n]
        # per row and new position: the old position it holds (real ones in order, right-aligned at ``end``)
        order = torch.sort((~self.real[:n, :self.end]).to(torch.int8), dim=1, stable=True).indices  # real first
        new = torch.arange(end, device=device).unsqueeze(0)
        offset = new - (end - lengths).unsqueeze(1)  # the row's k-th real position lands at end - length + k
        holds = offset >= 0
        source = torch.where(holds, order.gather(1, offset.clamp(0, max(self.end - 1, 0))), 0) if self.end else None
        real = torch.zeros(slots, capacity, dtype=torch.bool, device=device)
        real[:n, :end] = holds
        built: list[list[Any]] = [[], []]  # every new buffer made before any is used: a failure (out of memory at
        for group, fresh_group in zip((self.keys, self.values), built):  # layer k) leaves the batch as it was
            for old in group:
                fresh = self._new_buffer(slots, old.shape[1], capacity, old.shape[-1], dtype=old.dtype, device=device)
                if n and source is not None:
                    index = source[:, None, :, None].expand(n, old.shape[1], end, old.shape[-1])
                    fresh[:n, :, :end] = old[:n, :, :self.end].gather(2, index) * holds[:, None, :, None]
                fresh_group.append(fresh)
        kept = torch.zeros(slots, dtype=torch.long, device=device)
        kept[:n] = lengths
        self.keys[:], self.values[:] = built  # in place: the cache's layers read these lists
        self.real, self.lengths = real, kept
        self.first = [end - int(length) for length in lengths.tolist()]
        self._move_write(end)
        self._set_view()

    # ---- rows leaving ------------------------------------------------------------------------------------------
    def remove(self, rows: Sequence[int]) -> list[int]:
        """Drop ``rows``; each slot left empty takes the last row. Returns, per slot now, the old row it holds (the
        engine reorders its sequences the same way)."""
        order = list(range(self.rows))
        for row in sorted(set(rows), reverse=True):  # the last row is never one still to drop
            last = len(order) - 1
            if row != last:
                self._copy_row(last, row)
                order[row] = order[last]
            order.pop()
            self.first.pop()
        self.rows = len(order)
        if not self.rows:
            self._move_write(0)
        self._set_view()
        return order

    def _copy_row(self, source: int, target: int) -> None:
        for group in (self.keys, self.values):
            for buffer in group:
                buffer[target, :, :self.end] = buffer[source, :, :self.end]
        self.real[target] = self.real[source]
        self.lengths[target] = self.lengths[source]
        self.first[target] = self.first[source]

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (ascending), in their order."""
        rows = list(rows)
        if any(b <= a for a, b in zip(rows, rows[1:])):
            raise ValueError(f"keep takes ascending rows, got {rows}")
        for slot, row in enumerate(rows):
            if row != slot:
                for group in (self.keys, self.values):
                    for buffer in group:
                        buffer[slot, :, :self.end] = buffer[row, :, :self.end]
                self.real[slot] = self.real[row]
                self.lengths[slot] = self.lengths[row]
        self.first = [self.first[r] for r in rows]
        self.rows = len(rows)
        if not self.rows:
            self._move_write(0)
        self._set_view()

    def take(self, rows: Sequence[int]) -> "BatchKV":
        """A new batch of copies of ``rows``; this one is unchanged."""
        import torch

        part = BatchKV(self.reserve, self.static, self.max_slots)

        index = torch.tensor(list(rows), device=self.real.device)
        for k, v in zip(self.keys, self.values):  # index_select copies
            part.keys.append(part._fixed(k.index_select(0, index)))
            part.values.append(part._fixed(v.index_select(0, index)))
        part.real = self.real.index_select(0, index).clone()
        part.lengths = self.lengths.index_select(0, index).clone()
        part.first = [self.first[r] for r in rows]
        part.rows = len(rows)
        part.write = self.write.clone()
        part._move_write(self.end)
        from video_llava.engine.slot_cache import slot_cache

        part.cache = slot_cache(part, len(part.keys))
        part._set_view()
        return part

    # ---- decode steps ------------------------------------------------------------------------------------------
    def step_rows(self) -> int:
        """Rows a step computes: the running ones, or (``static``) the bucket of slots they fall in."""
        if not self.static:
            return self.rows
        bucket = 1
        while bucket < self.rows:
            bucket *= 2
        return min(bucket, self.slots)

    def _set_view(self) -> None:
        if self.static:
            self.view = (self.step_rows(), 0, self.capacity)
        else:
            start = min(self.first) if self.first else self.end
            self.view = (self.rows, min(start, self.end), self.end + 1)

    def step_inputs(self, dtype: Any, four_d: bool = True) -> tuple[Any, Any]:
        """(attention mask, position ids) of one decode step that writes a token for every row at ``end``; the
        buffers get room first if they are full. The mask is 4-D and additive (``dtype``), or with ``four_d=False``
        the rows x positions padding mask flash-attention takes."""
        import torch

        if self.end >= self.capacity:
            lengths = self.lengths[:self.rows]
            longest = int(lengths.max()) if self.rows else 0
            self._regather(longest, longest + self.reserve, self.slots)
        rows, start, stop = self.view
        self.real[:rows, self.end] = True  # each new token sees itself (an empty bucket slot: only itself)
        visible = self.real[:rows, start:stop]
        if not four_d:
            return visible.long(), self.lengths[:rows, None].clone()
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return mask[:, None, None, :], self.lengths[:rows, None].clone()

    def crop(self) -> None:
        """Undo a step that raised: its position is not real (what it wrote there is overwritten next time)."""
        self.real[:, self.end] = False

    def advance(self) -> None:
        """Every row gained one real position (the decode step ran)."""
        self.real[self.rows:, self.end] = False  # bucket slots past the rows hold nothing
        self.lengths[:self.rows] += 1
        self._move_write(self.end + 1)
        self._set_view()
