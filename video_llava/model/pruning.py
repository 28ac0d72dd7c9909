"""A video token budget: the tokens a video repeats are dropped before the LLM (Efficient Video Sampling's rule,
as vLLM applies it to Qwen2.5-VL: each token's dissimilarity from the same grid position in the frame before).

The first frame is kept whole; of the later frames' pooled-grid tokens, those that changed least from the frame
before are dropped, down to the budget, and the kept ones stay in frame order (OneVision's closing newline after
them). Why this rule: it needs only the projected features the vision pass already made (no attention scores, which
the paged and flash attention paths never materialise), it is exact and cheap (one cosine per token), and it removes
what a static camera repeats, most of a video's tokens. The features are cached unpruned, so one video's vision pass
serves every budget; the prefix cache keys on the expanded prompt, whose length is the kept count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class VideoTokenBudgetError(ValueError):
    """A budget that cannot hold a video's first frame, or a rate outside [0, 1)."""


@dataclass(frozen=True)
class VideoPruning:
    """How many of a video's tokens to keep: ``rate`` drops that share, ``budget`` caps the kept tokens (per video);
    both given, the smaller count wins. The default keeps every token."""

    rate: float = 0.0
    budget: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.rate < 1.0:
            raise VideoTokenBudgetError(f"video_pruning_rate must be in [0, 1), got {self.rate}")
        if self.budget is not None and self.budget < 1:
            raise VideoTokenBudgetError(f"video_token_budget must be positive, got {self.budget}")

    @property
    def active(self) -> bool:
        return self.rate > 0 or self.budget is not None

    def kept(self, frames: int, per_frame: int) -> int:
        """The frame tokens kept of a video of ``frames`` frames (its closing tokens come on top): at least its
        first frame's; a budget that cannot hold that is refused, naming the numbers."""
        total = frames * per_frame
        if self.budget is not None and self.budget < per_frame:
            raise VideoTokenBudgetError(
                f"video_token_budget={self.budget} is below one frame's {per_frame} tokens (a video keeps its first "
                f"frame whole); ask for at least {per_frame}, or for a video_pruning_rate")
        kept = total if self.budget is None else min(total, self.budget)
        if self.rate:
            kept = min(kept, math.ceil(total * (1 - self.rate)))
        return max(per_frame, kept) if frames else 0


def kept_positions(features: Any, frames: int, per_frame: int, kept: int) -> Any:
    """The positions (sorted, in ``0 .. frames*per_frame``) of the ``kept`` frame tokens the rule keeps."""
    import torch

    total = frames * per_frame
    if kept >= total:
        return torch.arange(total, device=features.device)
    grid = features[:total].float().reshape(frames, per_frame, -1)
    change = torch.full((frames, per_frame), float("inf"), device=features.device)  # frame 0: always kept
    change[1:] = 1 - torch.nn.functional.cosine_similarity(grid[1:], grid[:-1], dim=-1)
    # ties broken by position (stable), so the choice does not depend on the device's sort
    order = torch.sort(change.flatten(), descending=True, stable=True).indices
    return torch.sort(order[:kept]).values


def prune_video(features: Any, frames: int, per_frame: int, kept_tokens: int) -> Any:
    """A video's features (frames x per_frame rows, then its closing rows) cut to ``kept_tokens`` rows in all, the
    closing rows kept: the rows ``kept_positions`` names, in order."""
    import torch

    closing = features.shape[0] - frames * per_frame
    kept = kept_tokens - closing
    if kept >= frames * per_frame:
        return features
    positions = kept_positions(features, frames, per_frame, kept)
    return torch.cat([features[positions], features[frames * per_frame:]])
