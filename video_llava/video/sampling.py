"""Which frames of a video the model sees: uniform and fps-based sampling (LLaVA-NeXT-Video's rules)."""

from __future__ import annotations

from enum import Enum

import numpy as np


class SamplingMode(str, Enum):
    """How frame indices are chosen.

    ``uniform``: ``num_frames`` indices spread evenly from the first to the last frame.
    ``fps``: one frame every ``1/sample_fps`` seconds, as LLaVA-NeXT's demo does (step = round(avg_fps /
    sample_fps)); when that gives more than ``num_frames`` indices, uniform sampling of ``num_frames`` instead.
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
