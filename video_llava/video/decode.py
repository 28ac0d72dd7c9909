"""Open a video (path, bytes or file object), sample frames, return them with metadata.

The container is demuxed first (``probe``): its packets' presentation times say how many frames there are and
when each is shown, and they are what both decoders are held to. decord is tried first (fast seeking
``get_batch``) where it is known to be right, and its count, frame size and every sampled timestamp are checked
against the container; any disagreement sends the file to PyAV, which decodes in order, skips packets that do
not decode, and matches frames to indices by presentation time. Timestamps are seconds from the first video
frame, whichever decoder ran. Every failure becomes one ``VideoDecodeError`` with a human reason. These
functions decode in the calling process; ``video_llava.video.isolated`` runs them in a worker process with a time
limit so a hostile file can neither hang nor crash the caller.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, Union

import numpy as np

from video_llava.video.probe import (
    ContainerProbe,
    VideoDecodeError,
    open_for_reader,
    probe_container,
)
from video_llava.video.sampling import SamplingMode, sample_by_time

VideoInput = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]
Backend = Literal["auto", "decord", "pyav"]
log = logging.getLogger("video_llava.video")

@dataclass(frozen=True)
class DecodeOptions:
    """What to sample and how.

    ``num_frames``: frames wanted (fewer come back when the video is shorter: see ``uniform_indices``).
    ``short_side``: when set, frames are resized so their shorter side has this many pixels (aspect kept), or
    kept as they are when smaller: the checkpoint's ``CheckpointInputs.frame_short_side``, above the size its
    processor resizes to, so that resizing while decoding bounds memory for 4K input without blurring frames.
    ``max_pixels``, ``max_aspect_ratio``, ``max_duration_s``: refuse a video over these (``VideoDecodeError`` with
    code ``invalid_video_dimensions`` / ``video_too_long``) from its container header, before decoding a frame.
    The processor scales the short side up to its size (336), so a 16x8192 clip (12 KB) became 336x172,000 frames:
    an aspect-ratio bound is a memory bound. ``SERVICE_LIMITS`` are the values the service and caption job use.
    """

    num_frames: int = 32
    mode: SamplingMode = SamplingMode.UNIFORM
    sample_fps: float = 1.0
    short_side: int | None = None
    backend: Backend = "auto"
    threads: int = 1  # decoder threads per video; 1 suits many videos decoded in parallel workers, 0 = all cores
    max_pixels: int | None = None
    max_aspect_ratio: float | None = None
    max_duration_s: float | None = None

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.short_side is not None and self.short_side < 8:
            raise ValueError(f"short_side must be >= 8 pixels, got {self.short_side}")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        object.__setattr__(self, "mode", SamplingMode(self.mode))


# 8K UHD at most, and no side more than 8 times the other (32:9 panoramas are 3.6).
SERVICE_LIMITS = {"max_pixels": 7680 * 4320, "max_aspect_ratio": 8.0}


def check_limits(size: tuple[int, int], duration: float, opts: DecodeOptions) -> None:
    """Refuse a video whose frames (``size``, coded: rotation does not change area or ratio) or ``duration`` are
    over ``opts``' limits. Run on the header's figures before demuxing and on the demuxed ones after."""
    width, height = size  # 0x0: not known yet (the decoders find out)
    ratio = max(width, height) / max(1, min(width, height))
    if opts.max_aspect_ratio is not None and min(width, height) > 0 and ratio > opts.max_aspect_ratio:
        raise VideoDecodeError(
            f"frames of {width}x{height} have an aspect ratio of {ratio:.1f}:1; at most {opts.max_aspect_ratio:g}:1 "
            "is accepted", "invalid_video_dimensions",
        )
    if opts.max_pixels is not None and width * height > opts.max_pixels:
        raise VideoDecodeError(
            f"frames of {width}x{height} ({width * height / 1e6:.1f} MP) are over the limit of "
            f"{opts.max_pixels / 1e6:.1f} MP", "invalid_video_dimensions",
        )
    if opts.max_duration_s is not None and duration > opts.max_duration_s:
        raise VideoDecodeError(f"video is {duration:.1f} s long; the limit is {opts.max_duration_s:g} s", "video_too_long")


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
    """Sampled frames ``(N, H, W, 3)`` uint8 RGB, their indices and timestamps (seconds from the first frame).

    ``warnings``: how the frames were obtained when not by the first choice (a decoder fallen back from);
    ``decode_warnings``: what of the file could not be decoded (damaged stretches), in which case ``indices``
    count the frames that did decode.
    """

    frames: np.ndarray
    metadata: VideoMetadata
    indices: np.ndarray
    timestamps: np.ndarray
    warnings: list[str] = field(default_factory=list)
    decode_warnings: list[str] = field(default_factory=list)

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
            "decode_warnings": list(self.decode_warnings),
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


@dataclass
class _Decoded:
    """What one backend produced: frames and the indices (into the decodable frames) they are."""

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    frame_count: int
    decode_warnings: list[str] = field(default_factory=list)


class DecordMismatch(VideoDecodeError):
    """decord's answer disagrees with the container: the file goes to PyAV."""


def _plan(probe: ContainerProbe, times: np.ndarray, opts: DecodeOptions) -> np.ndarray:
    return sample_by_time(times, opts.num_frames, opts.mode, probe.fps, opts.sample_fps)


def _decode_decord(source: str | bytes, probe: ContainerProbe, opts: DecodeOptions) -> _Decoded:
    """decord's seeking decode, checked against the container: count, shape and every sampled timestamp."""
    import decord

    why_not = probe.decord_is_wrong_here()
    if why_not:
        raise DecordMismatch(why_not)
    display_w, display_h = probe.display_size  # decord applies the display rotation; its sizes are display sizes
    width, height = _resized_dims(display_w, display_h, opts.short_side)
    sized = {"width": width, "height": height} if (width, height) != (display_w, display_h) else {}
    reader = decord.VideoReader(open_for_reader(source), ctx=decord.cpu(0), num_threads=opts.threads, **sized)
    if len(reader) != probe.frame_count:
        raise DecordMismatch(f"decord counts {len(reader)} frames where the container holds {probe.frame_count}")
    times = probe.times
    indices = _plan(probe, times, opts)
    frames = reader.get_batch(indices.tolist()).asnumpy()
    if frames.shape[1:3] != (height, width):
        raise DecordMismatch(f"decord returned {frames.shape[2]}x{frames.shape[1]} frames, expected {width}x{height}")
    stamps = reader.get_frame_timestamp([0] + indices.tolist())[:, 0].astype(np.float64)
    stamps = stamps[1:] - stamps[0]
    tolerance = max(probe.frame_interval / 2, 1e-3)
    wrong = np.flatnonzero(np.abs(stamps - times[indices]) > tolerance)
    if len(wrong):
        k = wrong[0]
        raise DecordMismatch(
            f"decord's frame {int(indices[k])} is at {stamps[k]:.3f} s where the container says {times[indices[k]]:.3f} s"
        )
    return _Decoded(frames, indices, times[indices], probe.frame_count)


def _decode_pyav(source: str | bytes, probe: ContainerProbe, opts: DecodeOptions) -> _Decoded:
    """Decode in order, skipping packets that do not decode; frames are matched to indices by presentation time.

    When packets are lost to damage, the frames that did decode are sampled again (a second pass fetches them),
    and ``frame_count`` is what decoded: the model sees what ffmpeg can show, never a frame under another's index.
    """
    times = probe.times
    indices = _plan(probe, times, opts)
    first = _pyav_pass(source, probe, opts, indices, stop_early=True)
    frames, decoded, complete = first
    if complete:
        return _Decoded(np.stack([frames[int(i)] for i in indices]), indices, times[indices], probe.frame_count)
    good = np.asarray(sorted(decoded), dtype=np.int64)
    if not len(good):
        raise VideoDecodeError("no frame could be decoded (corrupt or unsupported video data)")
    chosen = good[_plan(probe, times[good], opts)]
    if not all(int(i) in frames for i in chosen):
        frames, _, _ = _pyav_pass(source, probe, opts, chosen, stop_early=False)
        if not all(int(i) in frames for i in chosen):
            raise VideoDecodeError("frames could not be decoded consistently (corrupt video data)")
    lost = _lost_runs(probe, good)
    positions = np.searchsorted(good, chosen)
    return _Decoded(np.stack([frames[int(i)] for i in chosen]), positions, times[chosen], len(good), lost)


def _pyav_pass(
    source: str | bytes, probe: ContainerProbe, opts: DecodeOptions, wanted: np.ndarray, stop_early: bool
) -> tuple[dict[int, np.ndarray], set[int], bool]:
    """One decode pass: {index: frame} for ``wanted``, the indices that decoded, whether nothing was lost."""
    import av

    want = {int(i) for i in wanted}
    last_wanted = max(want)
    frames: dict[int, np.ndarray] = {}
    decoded: set[int] = set()
    damaged = False
    width, height = _resized_dims(*probe.coded_size, opts.short_side)
    with av.open(open_for_reader(source), metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = opts.threads
        packets = container.demux(stream)
        order = 0  # frames without a timestamp are matched by decode order
        broke_early = False
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except (av.FFmpegError, ValueError, OSError):
                damaged = True  # the container ends early: what decoded so far is what there is
                break
            try:
                out = stream.decode(packet)
            except (av.FFmpegError, ValueError):
                damaged = True  # this packet does not decode: skip it, as ffmpeg does, and go on
                continue
            for frame in out:
                index = _frame_index(probe, frame.pts, order)
                order += 1
                if index is None or index in decoded:
                    continue
                decoded.add(index)
                if index in want:
                    frames[index] = _rotate(
                        frame.to_ndarray(format="rgb24", width=width, height=height)[None], probe.rotation
                    )[0]
            if stop_early and not damaged and want <= frames.keys() and order > last_wanted:
                broke_early = True
                break
    complete = not damaged and want <= frames.keys() and (broke_early or len(decoded) == probe.frame_count)
    return frames, decoded, complete


def _frame_index(probe: ContainerProbe, pts: int | None, order: int) -> int | None:
    if pts is None:
        return order if order < probe.frame_count else None
    i = int(np.searchsorted(probe.pts, pts))
    return i if i < probe.frame_count and probe.pts[i] == pts else None


def _lost_runs(probe: ContainerProbe, good: np.ndarray, limit: int = 5) -> list[str]:
    """Human lines for the runs of frames that did not decode."""
    missing = np.setdiff1d(np.arange(probe.frame_count), good)
    if not len(missing):
        return []
    runs = np.split(missing, np.flatnonzero(np.diff(missing) > 1) + 1)
    times = probe.times
    lines = [
        f"frames {int(r[0])}-{int(r[-1])} ({times[r[0]]:.2f}-{times[r[-1]]:.2f} s) could not be decoded (damaged data)"
        if len(r) > 1 else f"frame {int(r[0])} ({times[r[0]]:.2f} s) could not be decoded (damaged data)"
        for r in runs[:limit]
    ]
    if len(runs) > limit:
        lines.append(f"... and {len(runs) - limit} more damaged stretches")
    lines.append(f"{len(good)} of {probe.frame_count} frames decoded; indices count the decoded frames")
    return lines


_DECORD_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: |Check failed: .*?\(-?\d+ vs\. -?\d+\) ")


def _humanize(exc: BaseException) -> str:
    """First line of a decoder's message without decord's ``[time] file.cc:line:`` log prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _DECORD_LOG_PREFIX.sub("", text)[:300]


def sample_video(video: VideoInput, options: DecodeOptions | None = None) -> SampledVideo:
    """Decode ``video`` in this process and return the sampled frames. Raises ``VideoDecodeError`` only."""
    opts = options or DecodeOptions()
    source = as_source(video)
    try:
        return _sample(source, opts)
    except (VideoDecodeError, MemoryError):  # out of memory is the caller's to handle (a worker over its limit)
        raise
    except Exception as exc:  # a library error a file caused: the typed error, with the library's words
        raise VideoDecodeError(f"could not decode video: {type(exc).__name__}: {_humanize(exc)}") from exc


def _sample(source: str | bytes, opts: DecodeOptions) -> SampledVideo:
    probe = probe_container(source, lambda size, duration: check_limits(size, duration, opts))
    check_limits(probe.coded_size, probe.duration, opts)
    order = {"auto": ["decord", "pyav"], "decord": ["decord"], "pyav": ["pyav"]}[opts.backend]
    errors: list[str] = []
    for backend in order:
        try:
            decoded = (_decode_decord if backend == "decord" else _decode_pyav)(source, probe, opts)
        except VideoDecodeError as exc:
            errors.append(f"{backend}: {exc.reason}")
            if isinstance(exc, DecordMismatch) and len(order) > 1:
                log.warning("video decoded with PyAV: %s (%s, codec %s)", exc.reason, probe.container, probe.codec)
            continue
        except MemoryError:
            raise
        except Exception as exc:  # decoder libraries raise many types; each is reported, none is hidden
            errors.append(f"{backend}: {_humanize(exc)}")
            continue
        frames = decoded.frames
        if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
            errors.append(f"{backend}: decoder returned frames of shape {frames.shape}")
            continue
        width, height = probe.display_size
        fps = probe.fps or (1.0 / probe.frame_interval if probe.frame_interval > 0 else 0.0)
        meta = VideoMetadata(
            frame_count=int(decoded.frame_count),
            fps=round(float(fps), 4),
            duration=round(probe.duration, 4),
            width=int(width),
            height=int(height),
            rotation=probe.rotation,
            codec=probe.codec,
            container=probe.container,
            backend=backend,
        )
        return SampledVideo(
            frames=frames.astype(np.uint8, copy=False),
            metadata=meta,
            indices=decoded.indices.astype(np.int64),
            timestamps=decoded.timestamps.astype(np.float64),
            warnings=[f"fell back from {e}" for e in errors],
            decode_warnings=probe.notes + decoded.decode_warnings,
        )
    raise VideoDecodeError(f"could not decode video ({probe.container}, codec {probe.codec}): {'; '.join(errors)}")
