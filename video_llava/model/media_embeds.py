"""The token embeddings ``generate`` receives: each medium's projected vision features spliced in place of its
expanded ``<image>``/``<video>`` tokens, with the features of media seen before taken from a content-keyed cache.

This is what the family's ``...ForConditionalGeneration.forward`` does; doing it here lets the vision features be
cached, so a second question about a video skips the vision tower (``generate(inputs_embeds=...)`` is transformers'
documented path for this). Each family computes features exactly as its ``forward`` does (tested token-identical).
"""

from __future__ import annotations

import re
import time
from typing import Any, Protocol, Sequence

import numpy as np

from video_llava.cache import LRUCache, content_key
from video_llava.model.families import Family
from video_llava.model.families.base import IMAGE, VIDEO, media_kind


class Embeddable(Protocol):
    """What an embedding needs of a question (``qa_model.PreparedQuestion`` is one)."""

    prompt: str  # one placeholder per medium
    media: tuple[np.ndarray, ...]  # images (H, W, 3) and videos (N, H, W, 3), in conversation order
    media_tokens: tuple[int, ...]  # visual tokens of each medium, in the same order


class MediaEmbedder:
    """Embeddings of prepared questions for one loaded model (its weights, processor and family)."""

    def __init__(self, model: Any, processor: Any, family: Family, feature_cache_mb: int):
        self.model, self.processor, self.tokenizer, self.family = model, processor, processor.tokenizer, family
        self.feature_cache = LRUCache(feature_cache_mb * 2**20, lambda t: t.numel() * t.element_size())
        self.vision_calls = 0  # media sets run through the vision tower (cache misses)
        self.tokens = {IMAGE: getattr(processor, "image_token", None), VIDEO: getattr(processor, "video_token", None)}
        self.token_ids = {IMAGE: getattr(processor, "image_token_id", None), VIDEO: getattr(processor, "video_token_id", None)}

    def _cached(self, key_parts: tuple, compute) -> tuple[Any, bool]:
        key = content_key(*key_parts) if self.feature_cache.max_bytes else None
        if key is not None:
            hit = self.feature_cache.get(key)
            if hit is not None:
                return hit, True
        import torch

        with torch.inference_mode():
            features = compute()
        self.vision_calls += 1
        if key is not None:
            self.feature_cache.put(key, features)
        return features, False

    def video_features(self, frames: np.ndarray) -> tuple[Any, bool]:
        """Features ``(tokens, hidden)`` of one video, and whether they were cached."""
        return self._cached((VIDEO, str(frames.shape), frames.tobytes()),
                            lambda: self.family.video_features(self.model, self.processor, frames))

    def image_features(self, images: Sequence[np.ndarray]) -> tuple[Any, bool]:
        """Features ``(tokens, hidden)`` of one conversation's images together, and whether they were cached."""
        parts = (IMAGE, *[str(m.shape) for m in images], *[m.tobytes() for m in images])
        return self._cached(parts, lambda: self.family.image_features(
            self.model, self.family.image_inputs(self.processor, images)))

    def expand(self, prepared: Embeddable) -> str:
        """The prompt with each placeholder repeated as many times as its medium has visual tokens."""
        kinds = [k for k in (IMAGE, VIDEO) if self.tokens[k]]
        pattern = "(" + "|".join(re.escape(self.tokens[k]) for k in kinds) + ")"
        pieces = re.split(pattern, prepared.prompt)
        queues = {k: [n for m, n in zip(prepared.media, prepared.media_tokens) if media_kind(m) == k] for k in kinds}
        out = []
        for piece in pieces:
            kind = next((k for k in kinds if piece == self.tokens[k]), None)
            if kind is None:
                out.append(piece)
                continue
            if not queues[kind]:
                raise ValueError(f"the prompt has more {self.tokens[kind]} placeholders than {kind}s")
            out.append(piece * queues[kind].pop(0))
        left = [k for k, q in queues.items() if q]
        if left:
            raise ValueError(f"the prompt has fewer placeholders than {' and '.join(left)}s")
        return "".join(out)

    def prompt_ids(self, prepared: Embeddable) -> list[int]:
        """The ids of one question's prompt with its placeholders expanded (what ``__call__`` embeds)."""
        return self.tokenizer(self.expand(prepared), add_special_tokens=True)["input_ids"]

    @property
    def visual_token_ids(self) -> set[int]:
        return {t for t in self.token_ids.values() if t is not None}

    def __call__(self, prepared: Sequence[Embeddable]):
        """(embeddings, attention mask, per question: whether all its features were cached, seconds in the
        vision tower) of a left-padded batch of prepared questions."""
        import torch

        batch = self.tokenizer([self.expand(p) for p in prepared], padding=True, return_tensors="pt",
                               add_special_tokens=True)
        ids = batch["input_ids"].to(self.model.device)
        mask = batch["attention_mask"].to(self.model.device)
        features: dict[str, list] = {IMAGE: [], VIDEO: []}
        cached, vision_s = [], []
        for p in prepared:
            start = time.perf_counter()
            images = [m for m in p.media if media_kind(m) == IMAGE]
            results = [self.image_features(images)] if images else []
            features[IMAGE] += [f for f, _ in results]
            videos = [self.video_features(m) for m in p.media if media_kind(m) == VIDEO]
            features[VIDEO] += [f for f, _ in videos]
            vision_s.append(time.perf_counter() - start)
            cached.append(all(hit for _, hit in results + videos))
        with torch.inference_mode():
            embeds = self.model.get_input_embeddings()(ids)
            for kind, found in features.items():
                if found:
                    positions = (ids == self.token_ids[kind]).unsqueeze(-1).expand_as(embeds)
                    embeds = embeds.masked_scatter(positions, torch.cat(found).to(embeds.device, embeds.dtype))
        return embeds, mask, cached, vision_s
