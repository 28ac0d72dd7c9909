"""What a question becomes on its way through a model: a ``PreparedQuestion`` (its media, rendered prompt and token
counts, checked once) and an ``Answer`` (its text and counts, ``TokenLogprob`` per token when asked). Plain data,
shared by the model (``qa_model``) and the engine that generates for it."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from video_llava.model.media_embeds import medium_key


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: the text it adds to the answer, its log-probability under the model, its own bytes, and
    the most likely alternatives at its position (spelled the same way)."""

    token: str
    logprob: float
    bytes: bytes = b""
    top: tuple["TokenLogprob", ...] = ()


@dataclass(frozen=True)
class Answer:
    """One generated answer with the token counts that produced it."""

    text: str
    num_frames: int
    visual_tokens: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (max_new_tokens reached)
    generate_s: float
    vision_cached: bool = False  # the vision tower was skipped: features came from the cache
    vision_s: float = 0.0  # time in the vision tower + projector for this question's media
    num_images: int = 0
    logprobs: tuple[TokenLogprob, ...] | None = None  # asked for: one per generated token (its end of sequence too)


@dataclass(frozen=True)
class PreparedQuestion:
    """A conversation about its media that fits the token budget, with its prompt rendered (once)."""

    media: tuple[np.ndarray, ...]  # images (H, W, 3) and videos (N, H, W, 3) uint8, in conversation order
    media_tokens: tuple[int, ...]  # visual tokens of each medium, as the family's processor expands it
    prompt: str  # one placeholder per medium
    prompt_tokens: int  # text tokens of the prompt, placeholders excluded
    visual_tokens: int
    max_new_tokens: int

    @property
    def num_frames(self) -> int:
        return sum(m.shape[0] for m in self.media if m.ndim == 4)

    @functools.cached_property
    def media_keys(self) -> tuple[str, ...]:
        """Each medium's content key, hashed once for the feature and prefix caches."""
        return tuple(medium_key(m) for m in self.media)

    @property
    def num_images(self) -> int:
        return sum(1 for m in self.media if m.ndim == 3)
