"""The token embeddings ``generate`` receives: each video's projected vision features spliced in place of its
expanded ``<video>`` tokens, with the features of frames seen before taken from a content-keyed cache.

This is what ``LlavaNextVideoForConditionalGeneration`` does inside ``forward``; doing it here lets the vision
features be cached, so a second question about a video skips the vision tower (``generate(inputs_embeds=...)`` is
transformers' documented path for this).
"""

from __future__ import annotations

import time
from typing import Any, Protocol, Sequence

import numpy as np

from video_llava.cache import LRUCache, content_key


class Embeddable(Protocol):
    """What an embedding needs of a question (``qa_model.PreparedQuestion`` is one)."""

    prompt: str  # one ``<video>`` placeholder per clip
    clips: tuple[np.ndarray, ...]


class VideoEmbedder:
    """Embeddings of prepared questions for one loaded model (its weights, processor and visual tokens per frame)."""

    def __init__(self, model: Any, processor: Any, per_frame: int, feature_cache_mb: int):
        self.model, self.processor, self.tokenizer, self.per_frame = model, processor, processor.tokenizer, per_frame
        self.feature_cache = LRUCache(feature_cache_mb * 2**20, lambda t: t.numel() * t.element_size())
        self.vision_calls = 0  # videos run through the vision tower (cache misses)

    def video_features(self, frames: np.ndarray) -> tuple[Any, bool]:
        """Projected, pooled features ``(frames x 144, hidden)`` of one video, and whether they were cached."""
        import torch

        key = content_key(str(frames.shape), frames.tobytes()) if self.feature_cache.max_bytes else None
        if key is not None:
            hit = self.feature_cache.get(key)
            if hit is not None:
                return hit, True
        pixels = self.processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]
        with torch.inference_mode():
            # positional: the parameter was renamed (pixel_values -> pixel_values_videos) within transformers 5.x
            out = self.model.get_video_features(pixels.to(self.model.device, self.model.dtype))
        self.vision_calls += 1
        features = out.pooler_output[0]
        if key is not None:
            self.feature_cache.put(key, features)
        return features, False

    def __call__(self, prepared: Sequence[Embeddable]):
        """(embeddings, attention mask, per question: whether every video's features were cached, seconds in the
        vision tower) of a left-padded batch of prepared questions."""
        import torch

        token = self.processor.video_token
        prompts = []
        for p in prepared:
            pieces = p.prompt.split(token)  # one more piece than placeholders; expand each in order
            expanded = pieces[0]
            for clip, rest in zip(p.clips, pieces[1:]):
                expanded += token * (clip.shape[0] * self.per_frame) + rest
            prompts.append(expanded)
        batch = self.tokenizer(prompts, padding=True, return_tensors="pt")
        ids = batch["input_ids"].to(self.model.device)
        mask = batch["attention_mask"].to(self.model.device)
        features, cached, vision_s = [], [], []
        for p in prepared:
            start = time.perf_counter()
            results = [self.video_features(clip) for clip in p.clips]
            vision_s.append(time.perf_counter() - start)
            features += [f for f, _ in results]
            cached.append(all(hit for _, hit in results))
        with torch.inference_mode():
            embeds = self.model.get_input_embeddings()(ids)
            video_positions = (ids == self.processor.video_token_id).unsqueeze(-1).expand_as(embeds)
            stacked = torch.cat(features).to(embeds.device, embeds.dtype)
            embeds = embeds.masked_scatter(video_positions, stacked)
        return embeds, mask, cached, vision_s

