"""Open a video (path, bytes or file object), sample frames, return them with metadata.

decord is tried first (fast seeking ``get_batch``); PyAV is the fallback for anything decord cannot open or
read (e.g. AV1, some webm/avi files, truncated files). Every failure becomes one ``VideoDecodeError`` with a
human reason. These functions decode in the calling process; ``video_llava.video.isolated`` runs them in a
worker process with a time limit so a hostile file can neither hang nor crash the caller.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, Union

import numpy as np

from video_llava.video.sampling import SamplingMode, sample_frame_indices

VideoInput = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]
Backend = Literal["auto", "decord", "pyav"]


class VideoDecodeError(ValueError):
    """The input could not be turned into frames; ``reason`` says why in words a user can act on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodeOptions:
    """What to sample and how.

    ``num_frames``: frames wanted (fewer come back when the video is shorter: see ``uniform_indices``).
    ``short_side``: when set, frames are resized so their shorter side has this many pixels (aspect kept);
    the model's processor resizes to 336 anyway, so doing it while decoding bounds memory for 4K input.
    """

    num_frames: int = 32
    mode: SamplingMode = SamplingMode.UNIFORM
    sample_fps: float = 1.0
    short_side: int | None = None
    backend: Backend = "auto"
    threads: int = 1  # decoder threads per video; 1 suits many videos decoded in parallel workers, 0 = all cores

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.short_side is not None and self.short_side < 8:
            raise ValueError(f"short_side must be >= 8 pixels, got {self.short_side}")
        object.__setattr__(self, "mode", SamplingMode(self.mode))


@dataclass(frozen=True)
class VideoMetadata:
    """Facts about the whole video. ``width``/``height`` are as displayed (after rotation)."""

    frame_count: int
    fps: float
    duration: float
    width: int
    height: int
    rotation: int = 0
    codec: str | None = None
    container: str | None = None
    backend: str = ""


@dataclass(frozen=True)
class SampledVideo:
    """Sampled frames ``(N, H, W, 3)`` uint8 RGB, their source indices and timestamps (seconds)."""

    frames: np.ndarray
    metadata: VideoMetadata
    indices: np.ndarray
    timestamps: np.ndarray
    warnings: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def describe(self) -> dict:
        """JSON-ready summary (no pixels)."""
        return {
            **asdict(self.metadata),
            "num_sampled": self.num_frames,
            "frame_shape": list(self.frames.shape[1:]),
            "sampled_indices": [int(i) for i in self.indices],
            "timestamps": [round(float(t), 4) for t in self.timestamps],
            "warnings": list(self.warnings),
        }


def as_source(video: VideoInput) -> str | bytes:
    """A filesystem path (kept as a path so large files are not read into memory) or the raw bytes."""
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if not path.exists():
            raise VideoDecodeError(f"no such file: {path}")
        if not path.is_file():
            raise VideoDecodeError(f"not a regular file: {path}")
        if path.stat().st_size == 0:
            raise VideoDecodeError(f"empty file (0 bytes): {path}")
        return str(path)
    if isinstance(video, (bytes, bytearray, memoryview)):
        data = bytes(video)
    elif hasattr(video, "read"):
        data = video.read()
        if not isinstance(data, (bytes, bytearray)):
            raise VideoDecodeError("file object must be opened in binary mode")
        data = bytes(data)
    else:
        raise VideoDecodeError(f"unsupported video input type: {type(video).__name__}")
    if not data:
        raise VideoDecodeError("empty input (0 bytes)")
    return data


def _open_for_reader(source: str | bytes) -> str | io.BytesIO:
    return source if isinstance(source, str) else io.BytesIO(source)


def _resized_dims(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to ``short_side``; even numbers for the scalers."""
    if short_side is None or min(width, height) <= short_side:
        return width, height
    scale = short_side / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _rotate(frames: np.ndarray, rotation: int) -> np.ndarray:
    """Apply display rotation (degrees counter-clockwise, as FFmpeg's display matrix gives it)."""
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(frames, k=k, axes=(1, 2))) if k else frames


def probe_stream_info(source: str | bytes) -> dict:
    """Container/codec names and display rotation from PyAV (cheap: headers plus at most one frame)."""
    import av

    info: dict = {"rotation": 0, "codec": None, "container": None}
    try:
        with av.open(_open_for_reader(source), metadata_errors="ignore") as container:
            info["container"] = container.format.name
            if not container.streams.video:
                return info
            stream = container.streams.video[0]
            info["codec"] = stream.codec_context.name
            for frame in container.decode(stream):
                info["rotation"] = int(round(getattr(frame, "rotation", 0) or 0)) % 360
                break
    except (av.FFmpegError, ValueError, IndexError, OSError):
        pass  # The decoders below report a precise reason if the file is really unreadable.
    return info


def _decode_decord(source: str | bytes, opts: DecodeOptions) -> tuple:
    import decord

    reader = decord.VideoReader(_open_for_reader(source), ctx=decord.cpu(0), num_threads=opts.threads)
    total = len(reader)
    if total < 1:
        raise VideoDecodeError("the video has zero frames")
    # decord applies the display rotation itself, and its width/height arguments are display dimensions.
    display_h, display_w = reader[0].shape[:2]
    if opts.short_side is not None:
        width, height = _resized_dims(display_w, display_h, opts.short_side)
        if (width, height) != (display_w, display_h):
            reader = decord.VideoReader(
                _open_for_reader(source), ctx=decord.cpu(0), num_threads=opts.threads, width=width, height=height
            )
    fps = float(reader.get_avg_fps() or 0.0)
    indices = sample_frame_indices(total, opts.num_frames, opts.mode, fps, opts.sample_fps)
    frames = reader.get_batch(indices.tolist()).asnumpy()
    stamps = reader.get_frame_timestamp(indices.tolist())[:, 0].astype(np.float64)
    last_end = float(reader.get_frame_timestamp([total - 1])[0, 1])
    duration = last_end if last_end > 0 else (total / fps if fps else 0.0)
    return frames, indices, stamps, total, fps, duration, (display_w, display_h)


def _packet_times(source: str | bytes) -> tuple[list[float], float]:
    """Presentation times (s) of every video packet, sorted, via demuxing only (no decoding)."""
    import av

    with av.open(_open_for_reader(source), metadata_errors="ignore") as container:
        if not container.streams.video:
            raise VideoDecodeError("no video stream in the file")
        stream = container.streams.video[0]
        tb = float(stream.time_base) if stream.time_base else 0.0
        rate = float(stream.average_rate or stream.guessed_rate or 0.0)
        times = []
        for n, packet in enumerate(container.demux(stream)):
            if packet.size == 0:
                continue  # flush packet
            ts = packet.pts if packet.pts is not None else packet.dts
            times.append(ts * tb if ts is not None and tb else (n / rate if rate else float(n)))
    times.sort()
    return times, rate


def _decode_pyav(source: str | bytes, opts: DecodeOptions, rotation: int) -> tuple:
    import av

    times, rate = _packet_times(source)
    if not times:
        raise VideoDecodeError("the video has zero frames")
    for _ in range(2):  # a second pass only when fewer frames decode than packets
        total = len(times)
        span = times[-1] - times[0]
        fps = rate or ((total - 1) / span if span > 0 else 0.0)
        indices = sample_frame_indices(total, opts.num_frames, opts.mode, fps, opts.sample_fps)
        wanted = {int(i): k for k, i in enumerate(indices)}
        frames: list = [None] * len(indices)
        stamps = np.zeros(len(indices), dtype=np.float64)
        decoded = 0
        with av.open(_open_for_reader(source), metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = opts.threads
            coded_w, coded_h = stream.codec_context.width, stream.codec_context.height
            width, height = _resized_dims(coded_w, coded_h, opts.short_side)
            display = (coded_h, coded_w) if rotation % 180 == 90 else (coded_w, coded_h)
            try:
                for frame in container.decode(stream):
                    if decoded in wanted:
                        k = wanted[decoded]
                        frames[k] = frame.to_ndarray(format="rgb24", width=width, height=height)
                        stamps[k] = frame.time if frame.time is not None else times[min(decoded, total - 1)]
                    decoded += 1
                    if decoded > indices[-1]:
                        break
            except av.FFmpegError:
                pass  # truncated/corrupt tail: keep what decoded, re-plan below if needed
        if all(f is not None for f in frames):
            duration = span + (1.0 / fps if fps else 0.0)
            # PyAV hands out frames as coded; turn them the way the display matrix says.
            return _rotate(np.stack(frames), rotation), indices, stamps, total, fps, duration, display
        if decoded == 0:
            raise VideoDecodeError("no frame could be decoded (corrupt or unsupported video data)")
        times = times[:decoded]  # fewer decodable frames than packets: sample from what decodes
    raise VideoDecodeError("frames could not be decoded consistently (corrupt video data)")


_DECORD_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: |Check failed: .*?\(-?\d+ vs\. -?\d+\) ")


def _humanize(exc: BaseException) -> str:
    """First line of a decoder's message without decord's ``[time] file.cc:line:`` log prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _DECORD_LOG_PREFIX.sub("", text)[:300]


def sample_video(video: VideoInput, options: DecodeOptions | None = None) -> SampledVideo:
    """Decode ``video`` in this process and return the sampled frames. Raises ``VideoDecodeError``."""
    opts = options or DecodeOptions()
    source = as_source(video)
    info = probe_stream_info(source)
    rotation = info["rotation"]
    order = {"auto": ["decord", "pyav"], "decord": ["decord"], "pyav": ["pyav"]}[opts.backend]
    errors: list[str] = []
    for backend in order:
        try:
            if backend == "decord":  # decord applies the display rotation itself
                frames, indices, stamps, total, fps, duration, display = _decode_decord(source, opts)
            else:
                frames, indices, stamps, total, fps, duration, display = _decode_pyav(source, opts, rotation)
        except VideoDecodeError as exc:
            errors.append(f"{backend}: {exc.reason}")
            continue
        except Exception as exc:  # decoder libraries raise many types; each is reported, none is hidden
            errors.append(f"{backend}: {_humanize(exc)}")
            continue
        if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
            errors.append(f"{backend}: decoder returned frames of shape {frames.shape}")
            continue
        frames = frames.astype(np.uint8, copy=False)
        width, height = display
        meta = VideoMetadata(
            frame_count=int(total),
            fps=round(float(fps), 4),
            duration=round(float(duration), 4),
            width=int(width),
            height=int(height),
            rotation=rotation,
            codec=info["codec"],
            container=info["container"],
            backend=backend,
        )
        warnings = [f"fell back from {e}" for e in errors]
        return SampledVideo(frames=frames, metadata=meta, indices=indices, timestamps=stamps, warnings=warnings)
    raise VideoDecodeError(_summarize_failures(errors, info))


def _summarize_failures(errors: list[str], info: dict) -> str:
    if info.get("container") is None:
        return (
            "not a readable video: the data is not in a known video container, or it is truncated or corrupt "
            "(an MP4 cut short loses its index); details: " + "; ".join(errors)
        )
    joined = "; ".join(errors)
    return f"could not decode video ({info.get('container')}, codec {info.get('codec')}): {joined}"
