"""Tiny offline checkpoints of every family: random weights with a fixed seed, the family's real visual geometry
(input size, patch, grid, AnyRes pinpoints, token counts), small widths, and the project's tokenizer. Saved with
``save_pretrained`` so tests load them exactly as a user's checkpoint directory."""

from __future__ import annotations

import os
from pathlib import Path

from video_llava.model.prompts import CHATML_CHAT_TEMPLATE, LLAVA_HF_CHAT_TEMPLATE

TINY_FAMILIES = ("llava_next_video", "llava_onevision", "llava_next", "llava", "yi_vl")
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def build_tiny(family: str, dest: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny ``family`` checkpoint (one of ``TINY_FAMILIES``) to ``dest``."""
    import torch

    from video_llava.model.embedded import build_embedded, build_tokenizer

    dest = Path(dest)
    if family == "llava_next_video":
        return build_embedded(dest)  # the embedded default's untrained starting point
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(TINY_FAMILIES)}")
    tokenizer = build_tokenizer(1024)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    video_id = tokenizer.convert_tokens_to_ids("<video>")
    torch.manual_seed(seed)
    model, processor = _BUILDERS[family](tokenizer, ids, image_id, video_id)
    model.eval()
    # Unit-gain projector init, as the embedded default: random towers' features stay at the text embeddings' scale.
    with torch.no_grad():
        for module in model.model.multi_modal_projector.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
    for key, value in ids.items():
        setattr(model.generation_config, key, value)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest


def _llama(tokenizer, ids, positions: int = 4096):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=positions, tie_word_embeddings=False,
                       **_TEXT, **ids)


def _clip(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=image_size, patch_size=14, projection_dim=_VISION["hidden_size"], **_VISION)


def _onevision(tokenizer, ids, image_id, video_id):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    text = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=32768, tie_word_embeddings=False,
                       **_TEXT, **ids)
    vision = SiglipVisionConfig(image_size=384, patch_size=14, **_VISION)  # 27x27 = 729 patches, as the 0.5b-72b
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                  video_token_index=video_id, vision_feature_select_strategy="full",
                                  vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(), video_processor=LlavaOnevisionVideoProcessor(),
        tokenizer=tokenizer, chat_template=CHATML_CHAT_TEMPLATE, num_image_tokens=729,
        vision_feature_select_strategy="full",
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


def _next(tokenizer, ids, image_id, video_id):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    config = LlavaNextConfig(vision_config=_clip(336), text_config=_llama(tokenizer, ids), image_token_index=image_id,
                             vision_feature_select_strategy="default", vision_feature_layer=-2)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=LLAVA_HF_CHAT_TEMPLATE, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return LlavaNextForConditionalGeneration(config), processor


def _llava(tokenizer, ids, image_id, video_id, image_size: int = 336, yi: bool = False):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from video_llava.model.families.yi_vl import yi_vl_model_class

    config = LlavaConfig(vision_config=_clip(image_size), text_config=_llama(tokenizer, ids), image_token_index=image_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         image_seq_length=(image_size // 14) ** 2)
    if yi:
        config.projector_type = "yi_vl"
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size=size, crop_size=crop), tokenizer=tokenizer,
                               chat_template=LLAVA_HF_CHAT_TEMPLATE, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    model_class = yi_vl_model_class() if yi else LlavaForConditionalGeneration
    return model_class(config), processor


def _yi_vl(tokenizer, ids, image_id, video_id):
    return _llava(tokenizer, ids, image_id, video_id, image_size=448, yi=True)  # 32x32 = 1024 tokens per image


_BUILDERS = {"llava_onevision": _onevision, "llava_next": _next, "llava": _llava, "yi_vl": _yi_vl}
