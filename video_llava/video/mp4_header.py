"""The display rotation an MP4/MOV header declares, read from its boxes without decoding a frame.

PyAV 18 exposes the display matrix only on decoded frames, and decoding one costs more than the whole rest of the
probe of a small clip. This reads the first video track's ``tkhd`` matrix (ISO/IEC 14496-12 8.3.2) as FFmpeg's mov
demuxer does, for the plain case only: a rotation by a multiple of 90 degrees and an identity movie matrix. Anything
else (flips, scaling, a compressed or missing header) returns None and the caller decodes a frame instead.
"""

from __future__ import annotations

import math
import struct
from typing import Callable, Iterator

MAX_MOOV_BYTES = 64 * 2**20  # a movie header larger than this is not read here (the frame decode says)
ONE = 1 << 16  # 1.0 in the matrix's 16.16 fixed point
IDENTITY = (ONE, 0, 0, 0, ONE, 0, 0, 0, 1 << 30)

Read = Callable[[int, int], bytes]  # (offset, size) -> the bytes there (fewer at the end)


def mp4_rotation(source: str | bytes) -> int | None:
    """Degrees (0, 90, 180, 270, as decoded frames report them) or None when the header does not say plainly."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = memoryview(source)
            return _rotation(lambda offset, size: bytes(data[offset: offset + size]), len(data))
        with open(source, "rb") as f:
            def read(offset: int, size: int) -> bytes:
                f.seek(offset)
                return f.read(size)

            f.seek(0, 2)
            return _rotation(read, f.tell())
    except (OSError, ValueError, IndexError, struct.error):  # a damaged header: the frame decode says
        return None


def _rotation(read: Read, end: int) -> int | None:
    moov = next((body for kind, body in _boxes(read, 0, end) if kind == b"moov"), None)
    if moov is None:
        return None
    start, size = moov
    if size > MAX_MOOV_BYTES:
        return None
    header = read(start, size)
    local: Read = lambda offset, n: header[offset: offset + n]  # noqa: E731
    matrix = None
    for kind, (at, length) in _boxes(local, 0, len(header)):
        if kind == b"mvhd" and _movie_matrix(header[at: at + length]) != IDENTITY:
            return None
        if kind == b"trak" and matrix is None:
            matrix = _video_track_matrix(header[at: at + length])
    return None if matrix is None else _degrees(matrix)


def _boxes(read: Read, start: int, end: int) -> Iterator[tuple[bytes, tuple[int, int]]]:
    """(type, (offset of its body, body size)) of each box between ``start`` and ``end``."""
    at = start
    while at + 8 <= end:
        size, kind = struct.unpack(">I4s", read(at, 8))
        body = at + 8
        if size == 1:  # a 64-bit size follows
            (size,) = struct.unpack(">Q", read(at + 8, 8))
            body = at + 16
        elif size == 0:  # to the end
            size = end - at
        if size < body - at or at + size > end:
            return  # a damaged box: stop here
        yield kind, (body, at + size - body)
        at += size


def _movie_matrix(mvhd: bytes) -> tuple[int, ...]:
    # version 0: 4 (version, flags) + 16 (times, timescale, duration) + 4 rate + 2 volume + 10 reserved
    offset = 36 if mvhd[0] == 0 else 48
    return struct.unpack_from(">9i", mvhd, offset)


def _video_track_matrix(trak: bytes) -> tuple[int, ...] | None:
    local: Read = lambda offset, n: trak[offset: offset + n]  # noqa: E731
    matrix, video = None, False
    for kind, (at, length) in _boxes(local, 0, len(trak)):
        if kind == b"tkhd":
            # version 0: 4 (version, flags) + 20 (times, track id, reserved, duration) + 16 (reserved, layer, ...)
            matrix = struct.unpack_from(">9i", trak, at + (40 if trak[at] == 0 else 52))
        elif kind == b"mdia":
            video = any(sub == b"hdlr" and trak[s + 8: s + 12] == b"vide"
                        for sub, (s, _) in _boxes(local, at, at + length))
    return matrix if video else None


def _degrees(matrix: tuple[int, ...]) -> int | None:
    a, b, _, c, d = matrix[:5]
    if not (a == d and b == -c and {abs(a), abs(b)} == {0, ONE}):
        return None  # not a plain rotation by a multiple of 90 degrees (a flip, a scale): left to the decoder
    return round(-math.degrees(math.atan2(b, a))) % 360
