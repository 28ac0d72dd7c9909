"""The token embeddings ``generate`` receives: each medium's projected vision features spliced in place of its
expanded ``<image>``/``<video>`` tokens, with the features of media seen before taken from a content-keyed cache.

This is what the family's ``...ForConditionalGeneration.forward`` does; doing it here lets the vision features be
cached, so a second question about a video skips the vision tower (``generate(inputs_embeds=...)`` is transformers'
documented path for this). Each family computes features exactly as its ``forward`` does (tested token-identical).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
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


VISION_BATCH_FRAMES = 256  # frames through the vision tower in one call at most (CLIP-L 336 px: ~1.2 GB bf16 at its MLP)
VISION_BATCH_IMAGES = 32  # images in one call at most (AnyRes: up to 5 tiles each, so about as many tiles as frames)


@dataclass
class MediaFeatures:
    """One question's projected vision features as they are spliced: its images' (together), its videos'."""

    images: Any | None
    videos: list[Any]
    cached: bool  # all of them came from the feature cache
    vision_s: float  # its share of the seconds in the vision tower + projector


def medium_key(medium: np.ndarray) -> str:
    """A content key of one image or video: its kind, shape and pixels."""
    return content_key(media_kind(medium), str(medium.shape), memoryview(np.ascontiguousarray(medium)).cast("B"))


def media_keys(question: Embeddable) -> tuple[str, ...]:
    """Each medium's key; a question that keeps them (``PreparedQuestion.media_keys``) hashes its pixels once."""
    keys = getattr(question, "media_keys", None)
    return tuple(keys) if keys is not None else tuple(medium_key(m) for m in question.media)


class MediaEmbedder:
    """Embeddings of prepared questions for one loaded model (its weights, processor and family)."""

    def __init__(self, model: Any, processor: Any, family: Family, feature_cache_mb: int):
        self.model, self.processor, self.tokenizer, self.family = model, processor, processor.tokenizer, family
        self.feature_cache = LRUCache(feature_cache_mb * 2**20, lambda t: t.numel() * t.element_size())
        self.vision_calls = 0  # media sets run through the vision tower (cache misses)
        self.tokens = {IMAGE: getattr(processor, "image_token", None), VIDEO: getattr(processor, "video_token", None)}
        self.token_ids = {IMAGE: getattr(processor, "image_token_id", None), VIDEO: getattr(processor, "video_token_id", None)}

    def features(self, prepared: Sequence[Embeddable]) -> list[MediaFeatures]:
        """Each question's vision features. The videos not in the cache, across all the questions, go through the
        vision tower together, one pass per frame shape and up to ``VISION_BATCH_FRAMES`` frames (a video seen
        twice, once); so do the questions' image sets, up to ``VISION_BATCH_IMAGES`` images a pass."""
        every = [media_keys(p) for p in prepared]  # hashed once: a question without cached keys hashes its pixels
        keys = [[k if media_kind(m) == VIDEO else None for m, k in zip(p.media, ks)] for p, ks in zip(prepared, every)]
        found: dict[str, Any] = {}
        missing: dict[str, np.ndarray] = {}
        for p, question_keys in zip(prepared, keys):
            for m, key in zip(p.media, question_keys):
                if key is not None and key not in found and key not in missing:
                    hit = self.feature_cache.get(key) if self.feature_cache.max_bytes else None
                    if hit is None:
                        missing[key] = m
                    else:
                        found[key] = hit
        seconds = self._run_videos(missing, found)
        images = self._run_images(prepared, every)
        out = []
        for p, question_keys, (image_features, images_cached, image_s) in zip(prepared, keys, images):
            videos = self.pruned(p, [found[k] for k in question_keys if k is not None])
            out.append(MediaFeatures(image_features, videos,
                                     images_cached and not any(k in missing for k in question_keys if k is not None),
                                     image_s + sum(seconds.get(k, 0.0) for k in set(question_keys))))
        return out

    def pruned(self, prepared: Embeddable, videos: Sequence[Any]) -> list[Any]:
        """Each of a question's video features (whole, as cached) cut to the tokens its prompt holds for it: the
        tokens ``model.pruning``'s rule keeps under the question's video token budget (none cut without one)."""
        from video_llava.model.pruning import prune_video

        lengths = [(m.shape[0], n) for m, n in zip(prepared.media, prepared.media_tokens) if media_kind(m) == VIDEO]
        per_frame = self.family.tokens_per_frame(self.processor) if lengths else 0
        return [f if f.shape[0] == n else prune_video(f, frames, per_frame, n) for f, (frames, n) in zip(videos, lengths)]

    # ---- pieces of videos, for a caller that spreads a vision pass over several steps ---------------------------
    @property
    def video_closing_tokens(self) -> int:
        """Tokens a video's features end with whatever its length (OneVision's newline; none for the others)."""
        return self.family.video_tokens(self.processor, 0)

    def cached_video(self, key: str) -> Any | None:
        return self.feature_cache.get(key) if self.feature_cache.max_bytes else None

    def finished_video(self, key: str, features: Any) -> None:
        """A video whose features were made piece by piece: counted as run through the tower, and cached."""
        self.vision_calls += 1
        if self.feature_cache.max_bytes:
            self.feature_cache.put(key, features)

    def video_pieces(self, pieces: Sequence[np.ndarray]) -> tuple[list[Any], float]:
        """The features of runs of consecutive frames (each a piece of a video), as ``video_features`` gives a whole
        video's (closing tokens included), and the seconds the pass took: one pass through the vision tower for
        the pieces of one shape. A video's features are its pieces' without their closing tokens, then those once
        (the vision tower and pooling read each frame alone: tested equal, bit for bit)."""
        import torch

        out: list[Any] = [None] * len(pieces)
        by_shape: dict[tuple, list[int]] = {}
        for i, piece in enumerate(pieces):
            by_shape.setdefault(piece.shape, []).append(i)
        start = time.perf_counter()
        for shaped in by_shape.values():
            with torch.inference_mode():
                features = self.family.video_features(self.model, self.processor, [pieces[i] for i in shaped])
            for i, f in zip(shaped, features):
                out[i] = f
        return out, time.perf_counter() - start

    def image_set(self, prepared: Embeddable) -> tuple[Any | None, bool, float]:
        """The features of one question's images (together; None without images), whether they came from the cache,
        and the seconds the pass took."""
        return self._run_images([prepared], [media_keys(prepared)])[0]

    def _run_images(self, prepared: Sequence[Embeddable], every: Sequence[tuple[str, ...]]
                    ) -> list[tuple[Any | None, bool, float]]:
        """Per question: the features of its images (together, in order; None without images), whether they came
        from the cache, its share of the seconds (``every``: each question's media keys). A question's image set is
        one cache entry (OneVision reads a message of several images differently from one image); the sets not
        cached share the vision passes."""
        import torch

        results: list[tuple[Any | None, bool, float]] = [(None, True, 0.0)] * len(prepared)
        sets: dict[str, tuple[list[np.ndarray], int, list[int]]] = {}  # key -> (images, tokens, questions)
        for i, (p, keys) in enumerate(zip(prepared, every)):
            mine = [(m, k, n) for m, k, n in zip(p.media, keys, p.media_tokens) if media_kind(m) == IMAGE]
            if not mine:
                continue
            key = content_key(IMAGE, *[k for _, k, _ in mine])
            hit = self.feature_cache.get(key) if self.feature_cache.max_bytes else None
            if hit is not None:
                results[i] = (hit, True, 0.0)
            elif key in sets:
                sets[key][2].append(i)
            else:
                sets[key] = ([m for m, _, _ in mine], sum(n for _, _, n in mine), [i])
        chunks: list[list[str]] = []
        for key, (images, _, _) in sets.items():
            if chunks and sum(len(sets[k][0]) for k in chunks[-1]) + len(images) <= VISION_BATCH_IMAGES:
                chunks[-1].append(key)
            else:
                chunks.append([key])
        for chunk in chunks:
            start = time.perf_counter()
            with torch.inference_mode():
                inputs = self.family.image_inputs(self.processor, [sets[k][0] for k in chunk], self.model.device)
                joined = self.family.image_features(self.model, inputs)
            lengths = [sets[k][1] for k in chunk]
            if joined.shape[0] != sum(lengths):
                raise RuntimeError(f"the vision tower gave {joined.shape[0]} image features where the processor "
                                   f"counts {sum(lengths)} image tokens")
            elapsed = time.perf_counter() - start
            self.vision_calls += len(chunk)
            in_chunk = sum(len(sets[k][0]) for k in chunk)
            for key, part in zip(chunk, torch.split(joined, lengths)):
                images, _, questions = sets[key]
                part = part.clone() if len(chunk) > 1 else part  # a view would keep the whole chunk cached
                if self.feature_cache.max_bytes:
                    self.feature_cache.put(key, part)
                for i in questions:
                    results[i] = (part, False, elapsed * len(images) / in_chunk / len(questions))
        return results

    def _run_videos(self, missing: dict[str, np.ndarray], found: dict[str, Any]) -> dict[str, float]:
        """Features of the ``missing`` videos into ``found`` (and the cache); each video's share of the seconds."""
        by_shape: dict[tuple, list[str]] = {}
        for key, frames in missing.items():
            by_shape.setdefault(frames.shape, []).append(key)
        seconds: dict[str, float] = {}
        for shape, shaped in by_shape.items():
            per_call = max(1, VISION_BATCH_FRAMES // shape[0])
            for i in range(0, len(shaped), per_call):
                chunk = shaped[i:i + per_call]
                features, elapsed = self.video_pieces([missing[k] for k in chunk])
                self.vision_calls += len(chunk)
                for key, f in zip(chunk, features):
                    found[key] = f
                    seconds[key] = elapsed / len(chunk)
                    if self.feature_cache.max_bytes:
                        self.feature_cache.put(key, f)
        return seconds

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

    def __call__(self, prepared: Sequence[Embeddable], features: Sequence[MediaFeatures] | None = None):
        """(embeddings, attention mask, per question: whether all its features were cached, seconds in the
        vision tower) of a left-padded batch of prepared questions; ``features``: theirs, if already computed."""

        features = self.features(prepared) if features is None else features
        batch = self.tokenizer([self.expand(p) for p in prepared], padding=True, return_tensors="pt",
                               add_special_tokens=True)
        embeds = self.splice(batch["input_ids"], features)
        return embeds, batch["attention_mask"].to(self.model.device), [f.cached for f in features], \
            [f.vision_s for f in features]

    def splice(self, ids: Any, features: Sequence[MediaFeatures]) -> Any:
        """The embeddings of prompt ids (rows x positions, placeholders expanded) with the features of each row's
        media in place of its visual tokens."""
        import torch

        ids = torch.as_tensor(ids, device=self.model.device)
        spliced = {IMAGE: [f.images for f in features if f.images is not None],
                   VIDEO: [v for f in features for v in f.videos]}
        with torch.inference_mode():
            embeds = self.model.get_input_embeddings()(ids)
            for kind, found in spliced.items():
                if found:
                    positions = (ids == self.token_ids[kind]).unsqueeze(-1).expand_as(embeds)
                    embeds = embeds.masked_scatter(positions, torch.cat(found).to(embeds.device, embeds.dtype))
        return embeds
