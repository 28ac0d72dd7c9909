"""What the container says, before any frame is sampled: the presentation time of every video packet.

Demuxing reads packets without decoding them (the first frame is decoded, for its display rotation), so this is
cheap next to decoding; MP4/MOV files need not even that: their header's sample table gives every time
(``_from_index``) and its track matrix the rotation (``mp4_header``). It is the reference both decoders are held to:
frame ``i`` of a video is the packet with the ``i``-th smallest presentation time, and its timestamp is that time
minus the first one (seconds from the first video frame, whatever the container's clock starts at).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np

from video_llava.video.mp4_header import mp4_rotation


class VideoDecodeError(ValueError):
    """The input could not be turned into frames; ``reason`` says why in words a user can act on.

    ``code``: ``invalid_video`` (unreadable), ``invalid_video_dimensions`` or ``video_too_long`` (over a limit of
    ``DecodeOptions``, found from the container before any frame is decoded).
    """

    def __init__(self, reason: str, code: str = "invalid_video"):
        super().__init__(reason)
        self.reason = reason
        self.code = code

    def __reduce__(self):  # keeps ``code`` across processes
        return (type(self), (self.reason, self.code))


# Containers whose timestamps decord gets wrong when the stream has B-frames (checked with a frame-number barcode,
# decord 0.6.0): MPEG-TS/PS return every frame one GOP late under correct-looking timestamps, so no timestamp check
# can catch it; AVI (DivX/XviD B-frames) returns wrong frames with timestamps near -3.7e17.
DECORD_WRONG_WITH_B_FRAMES = {"mpegts": "MPEG-TS", "mpeg": "MPEG-PS", "mpegvideo": "MPEG video", "avi": "AVI"}

# Demuxers that read every sample's time and size from the header (MP4/MOV's sample tables) into the stream's index
# when the file is opened; times are read from there instead of demuxing every packet (9 us each: 160 ms for a
# 10-minute clip at 30 fps).
INDEXED_CONTAINERS = ("mov", "mp4")
REORDER_WINDOW = 16  # packets read from the start to find where presentation times begin (B-frames reorder <= 16)


@dataclass(frozen=True)
class ContainerProbe:
    """The container's facts about its first video stream.

    ``pts``: presentation timestamps of the video packets in ``time_base`` units, sorted (one per frame);
    ``times``: the same in seconds from the first one. ``fps`` is the stream's average rate (0 when unknown).
    """

    container: str
    codec: str | None
    rotation: int
    coded_size: tuple[int, int]
    fps: float
    time_base: float
    pts: np.ndarray
    has_b_frames: bool
    declared_frames: int = 0  # the header's frame count (0: the container does not say)
    notes: list[str] = field(default_factory=list)  # what could not be read (a demux error part-way)
    times_from: str = "packets"  # or "index": the header's sample table (MP4/MOV), packets past the first few unread

    @property
    def frame_count(self) -> int:
        return len(self.pts)

    @cached_property  # read per sampled frame and per check: computed once (frozen dataclass, no slots)
    def times(self) -> np.ndarray:
        return (self.pts - self.pts[0]) * self.time_base

    @property
    def display_size(self) -> tuple[int, int]:
        width, height = self.coded_size
        return (height, width) if self.rotation % 180 == 90 else (width, height)

    @cached_property
    def frame_interval(self) -> float:
        """Typical seconds between frames (median spacing; 1/fps for a single frame)."""
        if self.frame_count > 1:
            return float(np.median(np.diff(self.times)))
        return 1.0 / self.fps if self.fps > 0 else 0.0

    @property
    def duration(self) -> float:
        """From the first frame's start to the last frame's end."""
        times = self.times
        return float(times[-1] - times[0]) + self.frame_interval

    def decord_is_wrong_here(self) -> str | None:
        """Why decord cannot be trusted for this file at all, or None."""
        name = next((label for key, label in DECORD_WRONG_WITH_B_FRAMES.items() if key in self.container.split(",")), None)
        if name and self.has_b_frames:
            return f"decord returns wrong frames for {name} with B-frames"
        if self.declared_frames > self.frame_count:
            # Packets are missing (a damaged or cut file, or frames an edit list hides): decord counts from the
            # index it read, and past damage it returned other frames under the right timestamps (AVI).
            return f"the header declares {self.declared_frames} frames and {self.frame_count} are in the file"
        return None


def open_for_reader(source: str | bytes) -> str | io.BytesIO:
    return source if isinstance(source, str) else io.BytesIO(source)


HeaderCheck = Callable[[tuple[int, int], float], None]  # (display size, duration in s or 0) -> raise to refuse


def probe_container(source: str | bytes, check_header: HeaderCheck | None = None,
                    use_header: bool = True) -> ContainerProbe:
    """Demux ``source``'s first video stream. Raises ``VideoDecodeError`` for anything a file can cause.

    ``check_header`` sees the frame size and the duration the header declares before a packet is read, so a
    video over a limit is refused without reading it (a two-hour file is not demuxed to learn it is too long).
    ``use_header=False`` demuxes every packet and decodes the first frame for the rotation even where an MP4/MOV
    header gives the same (its sample table, its track matrix).
    """
    import av

    try:
        container = av.open(open_for_reader(source), metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
        raise VideoDecodeError(
            "not a readable video: the data is not in a known video container, or it is truncated or corrupt "
            f"(an MP4 cut short loses its index); details: {_first_line(exc)}"
        ) from exc
    with container:
        fmt = container.format.name if container.format is not None else "unknown"
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoDecodeError(f"no video stream in the file ({fmt}; streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None or not ctx.name:
            raise VideoDecodeError(f"the video stream's codec is unknown or not supported ({fmt})")
        codec = ctx.name
        ctx.thread_count = 1  # at most one frame is decoded (for the rotation): a thread pool costs more than it
        if check_header is not None:
            size = (int(ctx.width or 0), int(ctx.height or 0))
            check_header(size, _declared_duration(container, stream))
        mp4 = use_header and any(name in INDEXED_CONTAINERS for name in fmt.split(","))
        pts, rotation, notes, times_from = _demux(container, stream, mp4, mp4_rotation(source) if mp4 else None)
        if not len(pts):
            raise VideoDecodeError(f"the video has zero frames ({fmt}, codec {codec})")
        declared = int(stream.frames or 0)
        if declared > len(pts):
            notes.append(f"the header declares {declared} frames; {len(pts)} are in the file to be shown")
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        return ContainerProbe(
            container=fmt,
            codec=codec,
            rotation=rotation,
            coded_size=(int(ctx.width or 0), int(ctx.height or 0)),
            fps=fps,
            time_base=float(stream.time_base) if stream.time_base else (1.0 / fps if fps else 1.0),
            pts=pts,
            has_b_frames=bool(ctx.has_b_frames),
            declared_frames=declared,
            notes=notes,
            times_from=times_from,
        )


def _declared_duration(container, stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration else 0.0


def _demux(container, stream, indexed: bool, rotation: int | None) -> tuple[np.ndarray, int, list[str], str]:
    """Sorted packet presentation times, the display rotation (``rotation`` if known, else from the first decodable
    frame), notes, and where the times came from; ``indexed``: they may come from the stream's index
    (``_from_index``), the rest of the packets then left unread."""
    import av

    stamps: list[int] = []
    notes: list[str] = []
    packets = container.demux(stream)
    if rotation is None:
        rotation = _first_rotation(stream, packets, stamps, notes)
    if indexed and not notes:
        pts = _from_index(stream, packets, stamps)
        if pts is not None:
            return pts, rotation, notes, "index"
    try:  # the hot loop of the check: kept to attribute reads (about 1 us a packet over libav's own cost)
        for packet in packets:
            if packet.size and not packet.is_discard:  # skip the final flush packet and frames an edit list cuts
                ts = packet.pts
                stamps.append(ts if ts is not None else _no_pts(packet, stamps))
    except (av.FFmpegError, ValueError, OSError) as exc:
        notes.append(f"the container could not be read past packet {len(stamps)}: {_first_line(exc)}")
    return np.unique(np.asarray(stamps, dtype=np.int64)), rotation, notes, "packets"


def _from_index(stream, packets, stamps: list[int]) -> np.ndarray | None:
    """Every packet's presentation time from the index, or None where it might not give them exactly (then every
    packet is demuxed).

    The index holds decode times. When they are evenly spaced (a constant frame rate) and the header's frame count
    matches, the presentation times are the same times shifted by where the first packets' presentation times begin
    (B-frames only reorder frames within a window): the first ``REORDER_WINDOW`` packets (2 without B-frames) are read
    to find that, and each of their times must be one of the result, or the index is not used.
    """
    import av

    entries = stream.index_entries
    if not stream.frames or len(entries) <= 2 * REORDER_WINDOW:
        return None  # fragmented files index only what has been read; a short file is demuxed as fast
    dts = np.fromiter((e.timestamp for e in entries if not e.is_discard), np.int64)
    steps = np.diff(dts)
    if len(dts) != stream.frames or not len(steps) or steps[0] <= 0 or not (steps == steps[0]).all():
        return None
    try:
        while len(stamps) < (REORDER_WINDOW if stream.codec_context.has_b_frames else 2):
            packet = next(packets)
            if packet.size and not packet.is_discard:
                stamps.append(packet.pts if packet.pts is not None else _no_pts(packet, stamps))
    except StopIteration:
        return None
    except (av.FFmpegError, ValueError, OSError):
        return None  # the demux reports it
    pts = dts + (min(stamps) - int(dts[0]))
    return pts if np.isin(stamps, pts).all() else None


def _no_pts(packet, stamps: list[int]) -> int:
    # No presentation time: the decode time, else (a raw elementary stream) one time-base unit after the last.
    if packet.dts is not None:
        return int(packet.dts)
    return stamps[-1] + 1 if stamps else 0


def _first_rotation(stream, packets, stamps: list[int], notes: list[str]) -> int:
    """Demux up to the first decodable frame (its times go into ``stamps``) and return its display rotation."""
    import av

    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return 0
        except (av.FFmpegError, ValueError, OSError) as exc:
            notes.append(f"the container could not be read past packet {len(stamps)}: {_first_line(exc)}")
            return 0
        if not packet.size or packet.is_discard:
            continue
        stamps.append(packet.pts if packet.pts is not None else _no_pts(packet, stamps))
        try:
            for frame in stream.decode(packet):
                return int(round(getattr(frame, "rotation", 0) or 0)) % 360
        except (av.FFmpegError, ValueError):
            pass  # damaged first packets: the next decodable frame tells the rotation


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
