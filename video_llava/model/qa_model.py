"""``VideoQAModel``: answer questions about videos with LLaVA-NeXT-Video, in batches or streamed.

A question is first ``prepare``d (the token-budget check and the prompt, once), then generated: ``generate`` runs
one batched ``generate`` for many prepared questions, ``stream`` yields one answer's text as it is produced.
``answer`` and ``stream_answer`` do both steps for library callers. The embeddings ``generate`` receives come from
``video_embeds.VideoEmbedder`` (vision features spliced in, cached by content).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, Union

import numpy as np

from video_llava.model.budget import TokenBudget
from video_llava.model.loading import load_model
from video_llava.model.prompts import build_prompt, check_user_text, count_prompt_tokens
from video_llava.model.settings import EMBEDDED, ModelSettings
from video_llava.model.video_embeds import VideoEmbedder
from video_llava.video.decode import SampledVideo

VideoArg = Union[np.ndarray, SampledVideo, Sequence[Union[np.ndarray, SampledVideo]]]


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
    vision_s: float = 0.0  # time in the vision tower + projector for this question's videos


@dataclass(frozen=True)
class PreparedQuestion:
    """A question about its videos that fits the token budget, with its prompt rendered (once)."""

    clips: tuple[np.ndarray, ...]  # each (N, H, W, 3) uint8, placed in order before the text
    prompt: str  # one ``<video>`` placeholder per clip
    prompt_tokens: int  # text tokens of the prompt, placeholders excluded
    visual_tokens: int
    max_new_tokens: int

    @property
    def num_frames(self) -> int:
        return sum(clip.shape[0] for clip in self.clips)


def as_frame_list(video: VideoArg) -> list[np.ndarray]:
    """One question's videos as a list of ``(N, H, W, 3)`` arrays."""
    if isinstance(video, SampledVideo) or (isinstance(video, np.ndarray) and video.ndim == 4):
        items = [video]
    else:
        items = list(video)
    clips = [v.frames if isinstance(v, SampledVideo) else np.asarray(v) for v in items]
    if not clips:
        raise ValueError("no video")
    for clip in clips:
        if clip.ndim != 4 or clip.shape[-1] != 3 or clip.shape[0] < 1:
            raise ValueError(f"expected frames of shape (N, H, W, 3), got {clip.shape}")
    return clips


class VideoQAModel:
    """LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration`` + ``LlavaNextVideoProcessor``) ready to answer."""

    def __init__(self, settings: ModelSettings | None = None):
        self.settings = settings or ModelSettings()
        loaded = load_model(self.settings)
        self.model, self.processor, self.source = loaded.model, loaded.processor, loaded.source
        self.device, self.dtype = loaded.runtime.device, loaded.runtime.dtype
        self.attn_implementation = loaded.runtime.attn_implementation
        resolved = loaded.resolved
        self.config, self.per_frame, self.rope_factor = resolved.config, resolved.per_frame, resolved.rope_factor
        self.declared_factor = resolved.declared_factor
        self.budget: TokenBudget = resolved.budget(self.settings.max_frames)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generate needs the prompts aligned on the right
        self.model_id = EMBEDDED if self.settings.model == EMBEDDED else self.settings.model
        self.embedder = VideoEmbedder(self.model, self.processor, self.per_frame, self.settings.feature_cache_mb)
        self.feature_cache = self.embedder.feature_cache

    @property
    def vision_calls(self) -> int:
        """Videos run through the vision tower (feature cache misses)."""
        return self.embedder.vision_calls

    # ---- prompt and budget ---------------------------------------------------------------------------------
    def prompt_for(self, question: str, num_videos: int = 1) -> str:
        return build_prompt(self.processor, question, self.settings.chat_template, num_videos)

    def count_prompt_tokens(self, question: str, num_videos: int = 1) -> int:
        """Text tokens of the full prompt, the ``<video>`` placeholders excluded."""
        return count_prompt_tokens(self.processor, self.prompt_for(question, num_videos))

    def check_request(self, num_frames: int, question: str, max_new_tokens: int | None = None, num_videos: int = 1) -> int:
        """Tokens the request needs; raises ``ContextBudgetError`` unless it fits (frames summed over its videos)."""
        new = max_new_tokens or self.settings.max_new_tokens
        return self.budget.check(num_frames, self.count_prompt_tokens(question, num_videos), new)

    def prepare(self, video: VideoArg, question: str, max_new_tokens: int | None = None) -> PreparedQuestion:
        """The question checked (``InvalidQuestionError`` for markup in it) and against the token budget
        (``ContextBudgetError`` if it does not fit), and rendered."""
        clips = tuple(as_frame_list(video))
        new_tokens = max_new_tokens or self.settings.max_new_tokens
        check_user_text(self.processor, question)
        prompt = self.prompt_for(question, len(clips))
        prompt_tokens = count_prompt_tokens(self.processor, prompt)
        frames = sum(clip.shape[0] for clip in clips)
        self.budget.check(frames, prompt_tokens, new_tokens)
        return PreparedQuestion(clips, prompt, prompt_tokens, frames * self.per_frame, new_tokens)

    # ---- generation ----------------------------------------------------------------------------------------
    def answer(self, videos: Sequence[VideoArg], questions: Sequence[str], max_new_tokens: int | None = None,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[Answer]:
        """Answer ``questions[i]`` about ``videos[i]`` (frames ``(N,H,W,3)`` uint8) with one batched ``generate``.

        ``videos[i]`` may also be a list of videos for one question (placed in order before the text). The whole
        batch is refused before any compute if one question does not fit. Prompts are left-padded; videos may have
        different frame counts. Vision features of frames seen before come from a content-keyed cache, so a second
        question about a video skips the vision tower.
        """
        if len(videos) != len(questions):
            raise ValueError(f"{len(videos)} videos but {len(questions)} questions")
        prepared = [self.prepare(v, q, max_new_tokens) for v, q in zip(videos, questions)]
        return self.generate(prepared, temperature, top_p, seed)

    def generate(self, prepared: Sequence[PreparedQuestion], temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> list[Answer]:
        """One batched ``generate`` for questions that share ``max_new_tokens``."""
        import torch

        lengths = {p.max_new_tokens for p in prepared}
        if len(lengths) != 1:
            raise ValueError(f"one generate takes one max_new_tokens, got {sorted(lengths)}")
        embeds, mask, cached, vision_s = self.embedder(prepared)
        if seed is not None:
            torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            # With inputs_embeds and no input_ids, generate returns only the new tokens.
            output = self.model.generate(inputs_embeds=embeds, attention_mask=mask,
                                         **self._generation_kwargs(lengths.pop(), temperature, top_p))
        elapsed = time.perf_counter() - start
        return [self._answer(p, row, elapsed, hit, seconds)
                for p, row, hit, seconds in zip(prepared, output.cpu().tolist(), cached, vision_s)]

    def stream_answer(self, video: VideoArg, question: str, max_new_tokens: int | None = None,
                      temperature: float = 0.0, top_p: float = 1.0) -> Iterator[str | Answer]:
        """Yield the answer's text as it is generated, then one final ``Answer`` with the counts."""
        return self.stream(self.prepare(video, question, max_new_tokens), temperature, top_p)

    def stream(self, prepared: PreparedQuestion, temperature: float = 0.0, top_p: float = 1.0) -> Iterator[str | Answer]:
        """Text pieces of one prepared question as generated, then its ``Answer``.

        ``generate`` runs in a thread feeding transformers' ``TextIteratorStreamer``; an error in it is raised here.
        """
        import threading

        import torch
        from transformers import TextIteratorStreamer

        embeds, mask, cached, vision_s = self.embedder([prepared])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=False, skip_special_tokens=True, timeout=600)
        gen = dict(self._generation_kwargs(prepared.max_new_tokens, temperature, top_p), streamer=streamer)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    result["output"] = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **gen)
            except BaseException as exc:  # surfaced to the caller below, after the streamer ends
                result["error"] = exc
                streamer.end()

        start = time.perf_counter()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        started = False
        for piece in streamer:
            piece = piece if started else piece.lstrip()  # as Answer.text: no leading space
            if piece:
                started = True
                yield piece
        worker.join()
        if "error" in result:
            raise result["error"]
        yield self._answer(prepared, result["output"][0].tolist(), time.perf_counter() - start, cached[0], vision_s[0])

    def _generation_kwargs(self, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
        gen: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if temperature > 0:
            gen.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return gen

    def _answer(self, prepared: PreparedQuestion, row: list[int], generate_s: float, cached: bool,
                vision_s: float) -> Answer:
        """The ``Answer`` of one generated row: text up to the first EOS, its token count and why it ended."""
        eos = self.model.generation_config.eos_token_id
        eos = set(eos) if isinstance(eos, (list, tuple)) else {eos if eos is not None else self.tokenizer.eos_token_id}
        stop_at = next((k for k, t in enumerate(row) if t in eos), None)
        kept = [t for t in (row if stop_at is None else row[:stop_at]) if t != self.tokenizer.pad_token_id]
        return Answer(
            text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
            num_frames=prepared.num_frames,
            visual_tokens=prepared.visual_tokens,
            prompt_tokens=prepared.prompt_tokens,
            completion_tokens=len(kept) + (0 if stop_at is None else 1),
            finish_reason="length" if stop_at is None else "stop",
            generate_s=generate_s,
            vision_cached=cached,
            vision_s=vision_s,
        )

    def describe(self) -> dict:
        """Settings as resolved at load time (JSON-ready)."""
        return {
            "model": self.model_id,
            "source": self.source,
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "attn_implementation": self.attn_implementation,
            "tokens_per_frame": self.per_frame,
            "spatial_pool": f"{self.config.spatial_pool_mode} stride {self.config.spatial_pool_stride}",
            "rope_scaling_factor": self.rope_factor,
            "declared_rope_factor": self.declared_factor,
            "context": self.budget.context,
            "max_frames": self.settings.max_frames,
        }
