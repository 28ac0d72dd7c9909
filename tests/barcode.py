"""Frames that say which frame they are: the index burned into each frame as a barcode, and read back.

Ten black/white blocks across the top third of the frame spell the index in binary (up to 1023), big enough to
survive any lossy codec and a resize; the lower half changes from frame to frame so encoders cannot skip frames.
"""

from __future__ import annotations

import numpy as np

BITS = 10


def barcode_frames(count: int, width: int = 320, height: int = 240) -> np.ndarray:
    """``(count, height, width, 3)`` uint8 frames, frame ``i`` carrying the barcode of ``i``."""
    if count > 2**BITS:
        raise ValueError(f"at most {2**BITS} frames can be numbered")
    frames = np.full((count, height, width, 3), 128, dtype=np.uint8)
    block = width // BITS
    for i in range(count):
        for bit in range(BITS):
            frames[i, : height // 3, bit * block : (bit + 1) * block] = 255 if (i >> bit) & 1 else 0
        frames[i, height // 2 :] = (i * 37) % 200 + 20
    return frames


def read_barcode(frame: np.ndarray) -> int:
    """The index a frame of ``barcode_frames`` carries (any size it was scaled to, as long as it is upright)."""
    height, width = frame.shape[:2]
    block = width / BITS
    index = 0
    for bit in range(BITS):
        x0, x1 = int(bit * block + block / 4), int((bit + 1) * block - block / 4)
        if frame[height // 12 : height // 4, x0:x1].mean() > 128:
            index |= 1 << bit
    return index


def read_barcodes(frames: np.ndarray) -> list[int]:
    return [read_barcode(f) for f in frames]
