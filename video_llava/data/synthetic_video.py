"""Synthetic clips of moving coloured shapes, written as real video files with PyAV.

Used for the bundled sample video, test fixtures, benchmarks and the synthetic training set.
Everything is deterministic: the same arguments give the same pixels and, for a given PyAV build, the same file
bytes, in one process or many (see ``write_video``).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Sequence

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# (container format, codec, pixel format) for the common cases; PyAV's wheel ships these encoders.
FORMATS: dict[str, tuple[str, str, str]] = {
    "mp4": ("mp4", "libx264", "yuv420p"),
    "mp4-mpeg4": ("mp4", "mpeg4", "yuv420p"),
    "mp4-hevc": ("mp4", "libx265", "yuv420p"),
    "mp4-av1": ("mp4", "libsvtav1", "yuv420p"),
    "avi": ("avi", "mpeg4", "yuv420p"),
    "webm": ("webm", "libvpx-vp9", "yuv420p"),
    "mkv": ("matroska", "libx264", "yuv420p"),
    "mov": ("mov", "libx264", "yuv420p"),
    "mjpeg": ("avi", "mjpeg", "yuvj420p"),
    "mkv-444": ("matroska", "libx264", "yuv444p"),  # no chroma subsampling: odd widths/heights allowed
    "mpegts": ("mpegts", "libx264", "yuv420p"),  # broadcast / camera .ts (x264's default B-frames)
    "mpeg-ps": ("mpeg", "mpeg2video", "yuv420p"),  # DVD / capture .mpg
    "gif": ("gif", "gif", "rgb8"),  # animated GIF: what chat apps send as "video"
}


@dataclass(frozen=True)
class MovingShape:
    """A filled shape that starts at ``start`` (fractions of width/height) and moves ``direction``."""

    shape: str
    color: str
    direction: str
    start: tuple[float, float] = (0.5, 0.5)
    size: float = 0.18  # fraction of the shorter side
    speed: float = 0.5  # fraction of the frame per second


def _shape_mask(shape: str, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    if shape == "triangle":  # apex up
        inside_y = (ys >= cy - r) & (ys <= cy + r)
        half = (ys - (cy - r)) / 2.0
        return inside_y & (np.abs(xs - cx) <= half)
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def render_frames(
    shapes: Sequence[MovingShape],
    num_frames: int = 48,
    fps: float = 12.0,
    width: int = 320,
    height: int = 240,
    background: tuple[int, int, int] = (245, 245, 245),
) -> np.ndarray:
    """RGB frames ``(num_frames, height, width, 3)`` uint8 of ``shapes`` moving (wrapping at the edges)."""
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    short = min(width, height)
    for t in range(num_frames):
        frame = frames[t]
        frame[:] = background
        seconds = t / fps
        for s in shapes:
            dx, dy = DIRECTIONS[s.direction]
            x = (s.start[0] + dx * s.speed * seconds) % 1.0 * width
            y = (s.start[1] + dy * s.speed * seconds) % 1.0 * height
            frame[_shape_mask(s.shape, height, width, x, y, s.size * short / 2)] = COLORS[s.color]
        # A frame counter bar along the bottom makes each frame distinct and its index recoverable.
        bar = int(round((t + 1) / num_frames * width))
        frame[-4:, :bar] = (0, 0, 0)
    return frames


def write_video(
    dest: str | os.PathLike | BinaryIO,
    frames: np.ndarray,
    fps: float = 12.0,
    fmt: str = "mp4",
    rotation: int = 0,
    frame_times: Sequence[float] | None = None,
    gop: int | None = None,
    b_frames: int | None = None,
) -> None:
    """Encode RGB ``frames`` into ``dest`` as ``fmt`` (a key of ``FORMATS``).

    ``rotation`` stores display-rotation metadata (degrees counter-clockwise) as phones do.
    ``frame_times`` (seconds, increasing) gives a variable frame rate; otherwise frames are 1/fps apart.
    ``gop``: keyframe interval in frames (encoder default when ``None``; phones use about one second).
    ``b_frames``: most consecutive B-frames (encoder default when ``None``; DivX/XviD AVIs and DVDs use 2).

    Byte-identical output: muxers run ``bitexact`` (no random Matroska segment UID or date, no library version
    string), and libx264 runs without its assembly (``asm=0``). x264's SIMD lookahead reads memory it never wrote,
    so with PyAV 18 two encodes of the same frames in one process gave different bytes (a fresh process happened
    to see the same garbage, so separate runs agreed); the C path is the reference those kernels must match, at
    about 2.4x the encode time of these small clips.
    """
    import av

    container_fmt, codec, pix_fmt = FORMATS[fmt]
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(dest, mode="w", format=container_fmt, options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "28", "x264-params": "asm=0"}
        if codec == "libx265":
            stream.options = {"preset": "ultrafast", "x265-params": "log-level=error"}
        if codec == "libsvtav1":
            stream.options = {"preset": "8"}  # 10 and up leave stale blocks when the whole frame changes
        if gop is not None:
            stream.codec_context.gop_size = gop
        if b_frames is not None:
            stream.codec_context.max_b_frames = b_frames
        if frame_times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            if frame_times is not None:
                frame.pts = int(round(frame_times[i] * 1000))
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_bytes(frames: np.ndarray, fps: float = 12.0, fmt: str = "mp4", **kwargs) -> bytes:
    """``write_video`` into memory."""
    buf = io.BytesIO()
    write_video(buf, frames, fps=fps, fmt=fmt, **kwargs)
    return buf.getvalue()


SAMPLE_SHAPES = (
    MovingShape("circle", "red", "right", start=(0.2, 0.35)),
    MovingShape("square", "blue", "down", start=(0.7, 0.2), size=0.16, speed=0.3),
)


def write_sample_video(dest: str | os.PathLike, seconds: float = 4.0, fps: float = 12.0) -> None:
    """The bundled sample: a red circle moving right and a blue square moving down, 320x240, mp4."""
    frames = render_frames(SAMPLE_SHAPES, num_frames=int(seconds * fps), fps=fps)
    write_video(dest, frames, fps=fps, fmt="mp4")
