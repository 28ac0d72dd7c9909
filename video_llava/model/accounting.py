"""What a conversation costs before any compute: its rendered prompt, its text tokens and each medium's visual
tokens as the family's processor expands them.

``VideoQAModel.prepare_conversation`` and ``video-llava info`` both count with ``conversation_cost``, so the budget
check, the usage in replies and ``info`` give the same numbers; it needs the processor only, never the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np

from video_llava.model.budget import TokenBudget
from video_llava.model.families.base import IMAGE, VIDEO, Family, media_kind
from video_llava.model.pruning import VideoPruning
from video_llava.model.prompts import (
    ChatTemplateName,
    InvalidQuestionError,
    Turn,
    build_conversation,
    check_user_text,
    count_prompt_tokens,
)
from video_llava.video.decode import SampledVideo

# One medium (an image (H, W, 3), video frames (N, H, W, 3), a SampledVideo) or several, for one question.
MediaArg = Union[np.ndarray, SampledVideo, Sequence[Union[np.ndarray, SampledVideo]]]


def as_media_list(media: MediaArg) -> list[np.ndarray]:
    """One question's media as a list of image ``(H, W, 3)`` and video ``(N, H, W, 3)`` uint8 arrays."""
    if isinstance(media, SampledVideo) or (isinstance(media, np.ndarray) and media.ndim in (3, 4)):
        items = [media]
    else:
        items = list(media)
    # contiguous: a view with negative strides (frames[::-1]) is refused by torch.from_numpy in the processors
    arrays = [np.ascontiguousarray(m.frames if isinstance(m, SampledVideo) else m) for m in items]
    for item in arrays:
        media_kind(item)  # raises ValueError naming the shape
        if item.dtype != np.uint8:
            raise ValueError(f"media must be uint8 pixels, got {item.dtype}")
    return arrays


def media_tokens(family: Family, processor: Any, media: Sequence[np.ndarray],
                 pruning: VideoPruning = VideoPruning()) -> list[int]:
    """Visual tokens of each medium as the family's processor expands it (a conversation's images counted
    together: a family may treat several images differently from one), each video's cut to what ``pruning`` keeps
    (its closing tokens, OneVision's newline, always kept)."""
    kinds = [media_kind(m) for m in media]
    sizes = [m.shape[:2] for m, k in zip(media, kinds) if k == IMAGE]
    images = iter(family.image_tokens(processor, sizes) if sizes else [])

    def video(frames: int) -> int:
        if not pruning.active:
            return family.video_tokens(processor, frames)
        return pruning.kept(frames, family.tokens_per_frame(processor)) + family.video_tokens(processor, 0)

    return [next(images) if k == IMAGE else video(m.shape[0]) for m, k in zip(media, kinds)]


@dataclass(frozen=True)
class ConversationCost:
    """A checked conversation, rendered and counted."""

    turns: tuple[Turn, ...]  # media as uint8 arrays
    prompt: str  # one placeholder per medium
    prompt_tokens: int  # text tokens of the prompt, placeholders excluded
    media_tokens: tuple[int, ...]  # per medium, in conversation order (videos: the tokens their pruning keeps)
    per_frame: int  # the family's visual tokens per video frame
    closing: int = 0  # tokens a video's features end with (OneVision's newline)

    @property
    def media(self) -> tuple[np.ndarray, ...]:
        return tuple(m for t in self.turns for m in t.media)

    @property
    def frames(self) -> int:
        return sum(m.shape[0] for m in self.media if media_kind(m) == VIDEO)

    @property
    def visual_tokens(self) -> int:
        return sum(self.media_tokens)

    @property
    def videos(self) -> int:
        return sum(1 for m in self.media if media_kind(m) == VIDEO)

    @property
    def pruned(self) -> int:
        """Video tokens a token budget dropped (``model.pruning``)."""
        kept = sum(n for m, n in zip(self.media, self.media_tokens) if media_kind(m) == VIDEO)
        return self.frames * self.per_frame + self.videos * self.closing - kept

    @property
    def fixed_visual(self) -> int:
        """Visual tokens that do not scale with the frame count: images, a video's separator (OneVision)."""
        return self.visual_tokens + self.pruned - self.frames * self.per_frame

    def check(self, budget: TokenBudget, max_new_tokens: int) -> int:
        """Tokens needed with ``max_new_tokens``; ``ContextBudgetError`` unless they fit."""
        return budget.check(self.frames, self.prompt_tokens, max_new_tokens, self.fixed_visual, self.pruned)

    def frames_that_fit(self, budget: TokenBudget, max_new_tokens: int) -> int:
        return budget.frames_that_fit(self.prompt_tokens, max_new_tokens, self.fixed_visual)


def conversation_cost(processor: Any, family: Family, turns: Sequence[Turn],
                      template: ChatTemplateName = "auto", pruning: VideoPruning = VideoPruning()) -> ConversationCost:
    """Check a conversation (it ends with a user turn, the family takes its media, no text holds markup:
    ``InvalidQuestionError``/``UnsupportedMediaError``) and count it with the family's processor, its videos' tokens
    as ``pruning`` keeps them (``VideoTokenBudgetError`` for a budget below a frame)."""
    if not turns or turns[-1].role != "user":
        raise InvalidQuestionError("the conversation must end with a user message")
    turns = tuple(Turn(t.role, t.text, tuple(as_media_list(t.media)) if len(t.media) else ()) for t in turns)
    media = [m for t in turns for m in t.media]
    family.check_media([media_kind(m) for m in media])
    for turn in turns:
        check_user_text(processor, turn.text)
    prompt = build_conversation(processor, turns, template)
    return ConversationCost(turns, prompt, count_prompt_tokens(processor, prompt),
                            tuple(media_tokens(family, processor, media, pruning)), family.tokens_per_frame(processor),
                            family.video_tokens(processor, 0) if VIDEO in family.media else 0)
