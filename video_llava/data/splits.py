"""Which split an item belongs to, by a stable hash of its id: the same on every run and machine, and an item's
place does not move when others are added."""

from __future__ import annotations

import hashlib


def held_out(item_id: str, fraction: float) -> bool:
    """Whether ``item_id`` falls in the held-out ``fraction`` (a DPO pair kept for evaluation, a record for val)."""
    return int.from_bytes(hashlib.sha256(str(item_id).encode()).digest()[:8], "big") / 2**64 < fraction
