"""Context arithmetic: visual tokens per frame, LLaVA-NeXT's RoPE scaling rule, and the token-budget check."""

from __future__ import annotations

import math
from dataclasses import dataclass

BASE_CONTEXT = 4096  # LLaVA-NeXT-Video's Vicuna/Mistral backbones were trained on 4096 positions
RESERVED_TEXT_TOKENS = 1000  # LLaVA-NeXT's rule keeps this much room for the prompt and the answer


def tokens_per_frame(image_size: int = 336, patch_size: int = 14, pool_stride: int = 2) -> int:
    """Visual tokens one frame becomes: the (image/patch)^2 patch grid average-pooled by ``pool_stride``.

    336 px / patch 14 = 24x24 patches, pooled with stride 2 -> 12x12 = 144.
    """
    grid = image_size // patch_size
    return math.ceil(grid / pool_stride) ** 2


# LLaVA-NeXT-Video's count at 336 px, patch 14, stride 2. Only for checks made before a checkpoint is read (a serve
# config's batch limit); a loaded model takes its own count from its config.
VIDEO_TOKENS_PER_FRAME = tokens_per_frame()


def rope_factor_for_frames(num_frames: int, per_frame: int = VIDEO_TOKENS_PER_FRAME, base_context: int = BASE_CONTEXT) -> float:
    """LLaVA-NeXT's rule: ceil((frames x 144 + 1000) / 4096); 1.0 means no scaling (16 -> 1, 32 -> 2, 56 -> 3)."""
    return float(max(1, math.ceil((num_frames * per_frame + RESERVED_TEXT_TOKENS) / base_context)))


class ContextBudgetError(ValueError):
    """A request does not fit the model's (scaled) context or frame limit; the message says what would."""

    def __init__(self, message: str, *, needed: int, context: int, max_frames_that_fit: int):
        super().__init__(message)
        self.needed = needed
        self.context = context
        self.max_frames_that_fit = max_frames_that_fit


@dataclass(frozen=True)
class TokenBudget:
    """The numbers that decide whether a request fits."""

    context: int  # base positions x RoPE factor
    per_frame: int
    max_frames: int

    def frames_that_fit(self, prompt_tokens: int, max_new_tokens: int, fixed_visual: int = 0) -> int:
        room = self.context - prompt_tokens - max_new_tokens - fixed_visual
        if self.per_frame == 0:  # the model takes no video
            return 0
        return max(0, min(self.max_frames, room // self.per_frame))

    def check(self, num_frames: int, prompt_tokens: int, max_new_tokens: int, fixed_visual: int = 0,
              pruned: int = 0) -> int:
        """Total tokens needed; raises ``ContextBudgetError`` naming the numbers and the largest frame count that fits.

        ``fixed_visual``: visual tokens that do not scale with the frame count (images, a video's newline token);
        ``pruned``: video tokens a token budget dropped (``model.pruning``).
        """
        video = num_frames * self.per_frame
        needed = video - pruned + fixed_visual + prompt_tokens + max_new_tokens
        fit = self.frames_that_fit(prompt_tokens, max_new_tokens, fixed_visual)
        too_many = num_frames > self.max_frames
        if not too_many and needed <= self.context:
            return needed
        visual = f"{num_frames} frames x {self.per_frame} = {video} visual tokens" if num_frames else ""
        if pruned:
            visual = f"{visual} - {pruned} pruned"
        if fixed_visual:
            visual = f"{visual} + {fixed_visual} image and separator tokens" if num_frames else f"{fixed_visual} image tokens"
        math_ = f"{visual} + {prompt_tokens} prompt + {max_new_tokens} new = {needed} tokens, context {self.context}"
        problem = f"num_frames={num_frames} exceeds max_frames={self.max_frames}" if too_many else "request does not fit the context"
        if not num_frames:
            hint = "send fewer or smaller images, shorten the conversation, or lower max_new_tokens"
        elif fit == 0:
            hint = "shorten the question or lower max_new_tokens: not even one frame fits"
        else:
            hint = f"use at most {fit} frames" + ("" if too_many else ", shorten the question, or lower max_new_tokens")
        raise ContextBudgetError(
            f"{problem} ({math_}); {hint}", needed=needed, context=self.context, max_frames_that_fit=fit
        )
