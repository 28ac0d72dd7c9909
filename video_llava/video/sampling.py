"""Which frames of a video the model sees: uniform and fps-based sampling (LLaVA-NeXT-Video's rules), by time.

Both rules are defined on presentation times, so a variable-frame-rate video is sampled evenly in time, not in
frame numbers. For a constant-frame-rate video (every frame within half a frame of ``i / fps``) the time rules and
the index rules agree, and the index rules below are used as they are: the indices LLaVA-NeXT-Video's own
sampling gives.
"""

from __future__ import annotations

from enum import Enum

import numpy as np


class SamplingMode(str, Enum):
    """How frame indices are chosen.

    ``uniform``: ``num_frames`` frames spread evenly in time from the first frame to the last.
    ``fps``: one frame every ``1/sample_fps`` seconds (at a constant frame rate: step = round(avg_fps /
    sample_fps), as LLaVA-NeXT's demo does); when that gives more than ``num_frames`` frames, uniform sampling
    of ``num_frames`` instead.
    """

    UNIFORM = "uniform"
    FPS = "fps"


def uniform_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """``min(num_frames, total_frames)`` distinct, sorted indices spread evenly over ``[0, total_frames)``.

    The first and last frame are always included (when ``num_frames >= 2``). A video with fewer frames than
    asked for yields all of its frames, never repeated ones: a clip of 5 frames sampled at 32 gives 5 frames,
    and the model sees 5 x 144 visual tokens.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames >= total_frames:
        return np.arange(total_frames, dtype=np.int64)
    if num_frames == 1:
        return np.array([(total_frames - 1) // 2], dtype=np.int64)
    # Spacing is (total-1)/(num-1) >= 1 here, so rounding keeps the indices strictly increasing.
    return np.rint(np.linspace(0, total_frames - 1, num_frames)).astype(np.int64)


def fps_indices(total_frames: int, avg_fps: float, num_frames: int, sample_fps: float = 1.0) -> np.ndarray:
    """One frame per ``1/sample_fps`` seconds; falls back to ``uniform_indices`` when that exceeds ``num_frames``."""
    if sample_fps <= 0:
        raise ValueError(f"sample_fps must be > 0, got {sample_fps}")
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    step = max(1, round(avg_fps / sample_fps)) if avg_fps > 0 else 1
    indices = np.arange(0, total_frames, step, dtype=np.int64)
    if len(indices) > num_frames:
        return uniform_indices(total_frames, num_frames)
    return indices


def sample_frame_indices(
    total_frames: int,
    num_frames: int,
    mode: SamplingMode | str = SamplingMode.UNIFORM,
    avg_fps: float = 0.0,
    sample_fps: float = 1.0,
) -> np.ndarray:
    """Dispatch to the sampling rule named by ``mode``."""
    mode = SamplingMode(mode)
    if mode is SamplingMode.UNIFORM:
        return uniform_indices(total_frames, num_frames)
    return fps_indices(total_frames, avg_fps, num_frames, sample_fps)


def is_constant_rate(times: np.ndarray) -> bool:
    """Every frame within half a frame interval of where an even spacing from the first to the last puts it."""
    times = np.asarray(times, dtype=np.float64)
    if len(times) < 3:
        return True
    step = (times[-1] - times[0]) / (len(times) - 1)
    if step <= 0:
        return False
    even = times[0] + step * np.arange(len(times))
    return bool(np.all(np.abs(times - even) <= step / 2))


def _nearest(times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    if len(times) == 1:
        return np.zeros(len(targets), dtype=np.int64)
    right = np.clip(np.searchsorted(times, targets), 1, len(times) - 1)
    left = right - 1
    return np.where(targets - times[left] <= times[right] - targets, left, right).astype(np.int64)


def nearest_distinct_frames(times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """One frame per target (``len(targets) <= len(times)``), sorted and distinct: each target's nearest frame,
    moved to the next free one where two targets share a nearest frame (a sparse stretch of a VFR video)."""
    nearest = _nearest(times, targets)
    total, count = len(times), len(targets)
    picks = np.empty(count, dtype=np.int64)
    for k, index in enumerate(nearest):
        low = picks[k - 1] + 1 if k else 0
        picks[k] = min(max(int(index), low), total - (count - k))
    return picks


def sample_by_time(
    times: np.ndarray,
    num_frames: int,
    mode: SamplingMode | str = SamplingMode.UNIFORM,
    avg_fps: float = 0.0,
    sample_fps: float = 1.0,
) -> np.ndarray:
    """Indices into ``times`` (each frame's presentation time in seconds, sorted) chosen by ``mode``.

    Constant frame rate: exactly ``sample_frame_indices``. Variable: the frames nearest to ``num_frames`` evenly
    spaced times (``uniform``; ``min(num_frames, len(times))`` distinct frames, as at a constant rate) or to
    every ``1/sample_fps`` seconds (``fps``; a frame nearest to two of those times is taken once).
    """
    times = np.asarray(times, dtype=np.float64)
    total = len(times)
    mode = SamplingMode(mode)
    if total < 1:
        raise ValueError("times must hold at least one frame")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if sample_fps <= 0:
        raise ValueError(f"sample_fps must be > 0, got {sample_fps}")
    if is_constant_rate(times):
        span = times[-1] - times[0]
        fps = avg_fps if avg_fps > 0 else ((total - 1) / span if span > 0 else 0.0)
        return sample_frame_indices(total, num_frames, mode, fps, sample_fps)
    first, last = times[0], times[-1]
    if mode is SamplingMode.FPS:
        targets = np.arange(first, last + 1e-9, 1.0 / sample_fps)
        if len(targets) <= num_frames:  # where no new frame was shown within a step, there is none to take
            return np.unique(_nearest(times, targets))
    if num_frames >= total:
        return np.arange(total, dtype=np.int64)
    if num_frames == 1:
        return _nearest(times, np.array([(first + last) / 2]))
    return nearest_distinct_frames(times, np.linspace(first, last, num_frames))
