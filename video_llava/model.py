"""Load LLaVA-NeXT-Video through transformers' own classes and answer questions about videos in batches."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np

from video_llava.budget import TokenBudget, rope_factor_for_frames, tokens_per_frame
from video_llava.cache import LRUCache, content_key
from video_llava.embedded import embedded_path
from video_llava.prompts import build_prompt, count_prompt_tokens
from video_llava.settings import EMBEDDED, EMBEDDED_INIT, ModelSettings
from video_llava.video import SampledVideo

log = logging.getLogger(__name__)

LLAVA_NEXT_VIDEO_TYPE = "llava_next_video"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to change."""


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


def declared_rope_factor(text_config: Any) -> float | None:
    """The linear RoPE factor a checkpoint declares, whatever shape its config has.

    Handles a proper ``rope_parameters``/``rope_scaling`` block and the loose ``factor``/``type`` keys that
    ``llava-hf/LLaVA-NeXT-Video-7B-hf``'s config.json carries in ``text_config`` (which transformers would
    otherwise ignore, silently running unscaled).
    """
    for name in ("rope_parameters", "rope_scaling"):
        block = getattr(text_config, name, None)
        if isinstance(block, dict):
            kind = block.get("rope_type", block.get("type"))
            if kind == "linear" and block.get("factor"):
                return float(block["factor"])
    loose_type = getattr(text_config, "type", None)
    loose_factor = getattr(text_config, "factor", None)
    if loose_type == "linear" and loose_factor:
        return float(loose_factor)
    return None


def apply_rope_scaling(text_config: Any, factor: float) -> None:
    """Set linear RoPE scaling ``factor`` (1.0 = none) on ``text_config`` and drop loose legacy keys."""
    current = getattr(text_config, "rope_parameters", None) or {}
    theta = current.get("rope_theta") or getattr(text_config, "rope_theta", None) or 10000.0
    if factor > 1.0:
        text_config.rope_parameters = {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}
    else:
        text_config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    for loose in ("type", "factor"):
        if hasattr(text_config, loose):
            try:
                delattr(text_config, loose)
            except AttributeError:
                pass


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device={setting!r} but no CUDA GPU is visible; use device='cpu' or 'auto'")
    return setting


def resolve_dtype(setting: str, device: str):
    import torch

    if setting == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, setting)


def resolve_attention(setting: str, device: str) -> str:
    if setting != "auto":
        if setting == "flash_attention_2" and not _flash_attn_available():
            raise ModelLoadError("attn_implementation='flash_attention_2' needs the gpu extra: pip install '.[gpu]'")
        return setting
    if device.startswith("cuda") and _flash_attn_available():
        return "flash_attention_2"
    return "sdpa"


def _flash_attn_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def resolve_source(settings: ModelSettings) -> str:
    """A local directory or hub id for ``settings.model``; 'embedded' resolves to the tiny default (the trained one
    shipped in the package), 'embedded-init' to its untrained, deterministic starting point (what training starts from)."""
    if settings.model == EMBEDDED:
        return str(embedded_path())
    if settings.model == EMBEDDED_INIT:
        return str(embedded_path(packaged=False))
    path = Path(settings.model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} exists but has no config.json: not a transformers checkpoint directory")
        return str(path)
    return settings.model


def _offline(settings: ModelSettings) -> bool:
    return settings.local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


@dataclass
class ResolvedConfig:
    """A checkpoint's config with our settings applied, and the numbers derived from it."""

    config: Any
    per_frame: int
    base_context: int
    rope_factor: float
    declared_factor: float | None

    @property
    def budget_context(self) -> int:
        return int(self.base_context * self.rope_factor)


def resolve_config(settings: ModelSettings, source: str | None = None) -> ResolvedConfig:
    """Load only the config (no weights) and apply pooling and RoPE scaling as ``settings`` say."""
    from transformers import AutoConfig

    source = source or resolve_source(settings)
    try:
        config = AutoConfig.from_pretrained(source, revision=settings.revision, local_files_only=_offline(settings))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model {settings.model!r}: {str(exc).splitlines()[0]} "
            "(give a local checkpoint directory, or a hub id that is cached or reachable)"
        ) from exc
    if config.model_type != LLAVA_NEXT_VIDEO_TYPE:
        raise ModelLoadError(
            f"{settings.model!r} is a {config.model_type!r} checkpoint; a LLaVA-NeXT-Video checkpoint "
            f"(model_type {LLAVA_NEXT_VIDEO_TYPE!r}) is needed"
        )
    if config.spatial_pool_stride != 2:
        raise ModelLoadError(
            f"checkpoint pools with stride {config.spatial_pool_stride}; only stride 2 gives the token count "
            "transformers' processor assumes (144 per frame at 336 px)"
        )
    if config.spatial_pool_mode in ("average", "max"):  # parameter-free modes; "conv" has weights, keep it
        config.spatial_pool_mode = settings.spatial_pool_mode
    declared = declared_rope_factor(config.text_config)
    per_frame = tokens_per_frame(config.vision_config.image_size, config.vision_config.patch_size, config.spatial_pool_stride)
    base_context = settings.base_context or int(config.text_config.max_position_embeddings)
    if settings.rope_scaling_factor is not None:
        factor = float(settings.rope_scaling_factor)
    else:
        factor = max(rope_factor_for_frames(settings.max_frames, per_frame, base_context), declared or 1.0)
    if declared and factor != declared:
        log.info("RoPE linear factor %.2f (checkpoint declares %.2f)", factor, declared)
    apply_rope_scaling(config.text_config, factor)
    return ResolvedConfig(config, per_frame, base_context, factor, declared)


VideoArg = Union[np.ndarray, SampledVideo, Sequence[Union[np.ndarray, SampledVideo]]]


def _as_frame_list(video: VideoArg, index: int) -> list[np.ndarray]:
    """One question's videos as a list of ``(N, H, W, 3)`` arrays."""
    if isinstance(video, SampledVideo) or (isinstance(video, np.ndarray) and video.ndim == 4):
        items = [video]
    else:
        items = list(video)
    clips = [v.frames if isinstance(v, SampledVideo) else np.asarray(v) for v in items]
    if not clips:
        raise ValueError(f"question {index}: no video")
    for clip in clips:
        if clip.ndim != 4 or clip.shape[-1] != 3 or clip.shape[0] < 1:
            raise ValueError(f"question {index}: expected frames of shape (N, H, W, 3), got {clip.shape}")
    return clips


def complete_processor(processor, config) -> None:
    """Fill in processor fields that older or hand-made processor configs leave out, from the model's config.

    ``patch_size``/``vision_feature_select_strategy`` size the visual-token placeholders; ``num_additional_image_tokens``
    is 1 for CLIP towers (the CLS token): left at 0, the processor expands ``<image>`` one token per image short
    and a forward with images fails with "Image features and image tokens do not match".
    """
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = config.vision_config.patch_size
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    if not getattr(processor, "num_additional_image_tokens", 0) and config.vision_config.model_type == "clip_vision_model":
        processor.num_additional_image_tokens = 1


class VideoQAModel:
    """LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration`` + ``LlavaNextVideoProcessor``) ready to answer."""

    def __init__(self, settings: ModelSettings | None = None):
        self.settings = settings or ModelSettings()
        self.source = resolve_source(self.settings)
        self.device = resolve_device(self.settings.device)
        self.dtype = resolve_dtype(self.settings.dtype, self.device)
        self.attn_implementation = resolve_attention(self.settings.attn_implementation, self.device)
        resolved = resolve_config(self.settings, self.source)
        self.config = resolved.config
        self.per_frame = resolved.per_frame
        self.base_context = resolved.base_context
        self.rope_factor = resolved.rope_factor
        self.declared_factor = resolved.declared_factor
        self.model, self.processor = self._load_weights()
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generate needs the prompts aligned on the right
        self.model_id = EMBEDDED if self.settings.model == EMBEDDED else self.settings.model
        self.feature_cache = LRUCache(self.settings.feature_cache_mb * 2**20, lambda t: t.numel() * t.element_size())
        self.vision_calls = 0  # frames batches run through the vision tower (cache misses)

    # ---- loading -------------------------------------------------------------------------------------------
    def _load_weights(self):
        from transformers import (
            LlavaNextVideoForConditionalGeneration,
            LlavaNextVideoProcessor,
        )

        kwargs = dict(revision=self.settings.revision, local_files_only=_offline(self.settings))
        try:
            processor = LlavaNextVideoProcessor.from_pretrained(self.source, **kwargs)
            model = LlavaNextVideoForConditionalGeneration.from_pretrained(
                self.source, config=self.config, dtype=self.dtype, attn_implementation=self.attn_implementation, **kwargs
            )
        except (OSError, ValueError, ImportError) as exc:
            raise ModelLoadError(f"cannot load weights of {self.settings.model!r}: {str(exc).splitlines()[0]}") from exc
        complete_processor(processor, self.config)
        model.to(self.device).eval()  # every call into it runs under torch.inference_mode(); grad mode is left alone
        return model, processor

    # ---- budget --------------------------------------------------------------------------------------------
    @property
    def budget(self) -> TokenBudget:
        return TokenBudget(context=int(self.base_context * self.rope_factor), per_frame=self.per_frame, max_frames=self.settings.max_frames)

    def prompt_for(self, question: str, num_videos: int = 1) -> str:
        return build_prompt(self.processor, question, self.settings.chat_template, num_videos)

    def count_prompt_tokens(self, question: str, num_videos: int = 1) -> int:
        """Text tokens of the full prompt, the ``<video>`` placeholders excluded."""
        return count_prompt_tokens(self.processor, question, self.settings.chat_template, num_videos)

    def check_request(self, num_frames: int, question: str, max_new_tokens: int | None = None, num_videos: int = 1) -> int:
        """Raise ``ContextBudgetError`` unless the request fits (``num_frames`` summed over its videos)."""
        new = max_new_tokens or self.settings.max_new_tokens
        return self.budget.check(num_frames, self.count_prompt_tokens(question, num_videos), new)

    # ---- generation ----------------------------------------------------------------------------------------
    def answer(
        self,
        videos: Sequence[VideoArg],
        questions: Sequence[str],
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Answer]:
        """Answer ``questions[i]`` about ``videos[i]`` (frames ``(N,H,W,3)`` uint8) with one batched ``generate``.

        ``videos[i]`` may also be a list of videos for one question (placed in order before the text).
        Prompts are left-padded; videos may have different frame counts. Vision features of frames seen
        before come from a content-keyed cache, so a second question about a video skips the vision tower.
        """
        if len(videos) != len(questions):
            raise ValueError(f"{len(videos)} videos but {len(questions)} questions")
        per_question = [_as_frame_list(v, i) for i, v in enumerate(videos)]
        new_tokens = max_new_tokens or self.settings.max_new_tokens
        prompt_counts = []
        for clips, q in zip(per_question, questions):  # refuse the whole batch before any compute if one does not fit
            n = self.count_prompt_tokens(q, len(clips))
            self.budget.check(sum(c.shape[0] for c in clips), n, new_tokens)
            prompt_counts.append(n)
        frames = [sum(c.shape[0] for c in clips) for clips in per_question]
        embeds, mask, cached, vision_s = self._inputs_embeds(per_question, questions)
        rows, elapsed = self._run_generate(embeds, mask, new_tokens, temperature, top_p, seed)
        answers = []
        for i, row in enumerate(rows):
            text, completion, reason = self._finish(row)
            answers.append(
                Answer(
                    text=text,
                    num_frames=frames[i],
                    visual_tokens=frames[i] * self.per_frame,
                    prompt_tokens=prompt_counts[i],
                    completion_tokens=completion,
                    finish_reason=reason,
                    generate_s=elapsed,
                    vision_cached=cached[i],
                    vision_s=vision_s[i],
                )
            )
        return answers

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
            out = self.model.get_video_features(pixels.to(self.device, self.dtype))
        self.vision_calls += 1
        features = out.pooler_output[0]
        if key is not None:
            self.feature_cache.put(key, features)
        return features, False

    def _inputs_embeds(self, videos: Sequence[list[np.ndarray]], questions: Sequence[str]):
        """Token embeddings with each video's features in place of its expanded ``<video>`` tokens.

        This is what ``LlavaNextVideoForConditionalGeneration`` does inside ``forward``; doing it here lets the
        vision features be cached (``generate(inputs_embeds=...)`` is transformers' documented path for this).
        """
        import torch

        token = self.processor.video_token
        prompts = []
        for clips, question in zip(videos, questions):
            prompt = self.prompt_for(question, len(clips))
            pieces = prompt.split(token)  # one more piece than placeholders; expand each in order
            expanded = pieces[0]
            for clip, rest in zip(clips, pieces[1:]):
                expanded += token * (clip.shape[0] * self.per_frame) + rest
            prompts.append(expanded)
        batch = self.tokenizer(prompts, padding=True, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        features, cached, vision_s = [], [], []
        for clips in videos:
            start = time.perf_counter()
            results = [self.video_features(clip) for clip in clips]
            vision_s.append(time.perf_counter() - start)
            features += [f for f, _ in results]
            cached.append(all(hit for _, hit in results))
        with torch.inference_mode():
            embeds = self.model.get_input_embeddings()(ids)
            video_positions = (ids == self.processor.video_token_id).unsqueeze(-1).expand_as(embeds)
            stacked = torch.cat(features).to(embeds.device, embeds.dtype)
            embeds = embeds.masked_scatter(video_positions, stacked)
        return embeds, mask, cached, vision_s

    def _generation_kwargs(self, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
        gen: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if temperature > 0:
            gen.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return gen

    def _run_generate(self, embeds, mask, max_new_tokens, temperature, top_p, seed):
        import torch

        if seed is not None:
            torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            # With inputs_embeds and no input_ids, generate returns only the new tokens.
            output = self.model.generate(
                inputs_embeds=embeds, attention_mask=mask, **self._generation_kwargs(max_new_tokens, temperature, top_p)
            )
        return output.cpu().tolist(), time.perf_counter() - start

    def _finish(self, row: list[int]) -> tuple[str, int, str]:
        """Text, completion token count and finish reason of one generated row."""
        eos = self._eos_ids()
        stop_at = next((k for k, t in enumerate(row) if t in eos), None)
        kept = row if stop_at is None else row[:stop_at]
        kept = [t for t in kept if t != self.tokenizer.pad_token_id]
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return text, len(kept) + (0 if stop_at is None else 1), "length" if stop_at is None else "stop"

    def stream_answer(
        self,
        video: VideoArg,
        question: str,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> Iterator[str | Answer]:
        """Yield the answer's text as it is generated, then one final ``Answer`` with the counts."""
        import threading

        import torch
        from transformers import TextIteratorStreamer

        clips = _as_frame_list(video, 0)
        total_frames = sum(c.shape[0] for c in clips)
        new_tokens = max_new_tokens or self.settings.max_new_tokens
        prompt_tokens = self.count_prompt_tokens(question, len(clips))
        self.budget.check(total_frames, prompt_tokens, new_tokens)
        embeds, mask, cached, vision_s = self._inputs_embeds([clips], [question])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=False, skip_special_tokens=True, timeout=600)
        gen = dict(self._generation_kwargs(new_tokens, temperature, top_p), streamer=streamer)
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
        pieces = []
        for piece in streamer:
            if piece:
                pieces.append(piece)
                yield piece
        worker.join()
        if "error" in result:
            raise result["error"]
        _, completion, reason = self._finish(result["output"][0].tolist())
        yield Answer(
            text="".join(pieces).strip(),
            num_frames=total_frames,
            visual_tokens=total_frames * self.per_frame,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            finish_reason=reason,
            generate_s=time.perf_counter() - start,
            vision_cached=cached[0],
            vision_s=vision_s[0],
        )

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, (list, tuple)) else {eos}

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
