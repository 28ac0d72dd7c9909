"""LLaVA-NeXT-Video models of a named shape with random weights, and inputs of the right geometry, for benchmarks.

``7b``: LLaVA-NeXT-Video-7B's shape (Vicuna-7B: hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32064;
CLIP ViT-L/14 at 336 px: hidden 1024, 24 layers). ``tiny``: the embedded default's shape, for CPU smoke runs.
Random weights time the same kernels as trained ones; the answers are meaningless, so generation is forced to a
fixed length (``min_new_tokens``).
"""

from __future__ import annotations

from video_llava.model.budget import BASE_CONTEXT, rope_factor_for_frames, tokens_per_frame
from video_llava.model.loading import resolve_runtime

SHAPES = {
    "7b": dict(vocab=32064, hidden=4096, layers=32, heads=32, kv_heads=32, mlp=11008,
               v_hidden=1024, v_layers=24, v_heads=16, v_mlp=4096),
    "tiny": dict(vocab=1024, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128,
                 v_hidden=32, v_layers=2, v_heads=2, v_mlp=64),
}
VIDEO_TOKEN = 5  # any id that is not a text token we generate; the model only needs it to mark video positions
PER_FRAME = tokens_per_frame(336, 14, 2)


def pick_runtime(device: str | None = None):
    """(device, dtype, attention) the way the service picks them (``model.loading.resolve_runtime``)."""
    runtime = resolve_runtime(device or "auto")
    return runtime.device, runtime.dtype, runtime.attn_implementation


def build_model(shape: str, max_frames: int, device: str, dtype, attn: str):
    """A random-weight ``LlavaNextVideoForConditionalGeneration`` with RoPE scaled for ``max_frames``."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    s = SHAPES[shape]
    factor = rope_factor_for_frames(max_frames, PER_FRAME)
    text = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                       max_position_embeddings=BASE_CONTEXT,
                       rope_parameters={"rope_type": "linear", "factor": float(factor), "rope_theta": 10000.0},
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(hidden_size=s["v_hidden"], intermediate_size=s["v_mlp"], num_hidden_layers=s["v_layers"],
                              num_attention_heads=s["v_heads"], image_size=336, patch_size=14)
    config = LlavaNextVideoConfig(vision_config=vision, text_config=text, video_token_index=VIDEO_TOKEN,
                                  image_token_index=VIDEO_TOKEN + 1, spatial_pool_mode="average", spatial_pool_stride=2,
                                  vision_feature_select_strategy="default", vision_feature_layer=-2)
    with torch.device(device):
        model = LlavaNextVideoForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=dtype)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model.eval()


def video_batch(batch: int, frames: int, device: str, dtype):
    """Random pixels ``(batch, frames, 3, 336, 336)`` (what the video processor hands the model)."""
    import torch

    return torch.randn(batch, frames, 3, 336, 336, device=device, dtype=dtype)


def video_features(model, pixels):
    """Pooled, projected features ``(batch, frames*144, hidden)`` across transformers versions."""
    out = model.get_video_features(pixels)  # positional: the keyword was renamed across 5.x releases
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        import torch

        feats = torch.stack(list(feats))
    return feats.reshape(pixels.shape[0], -1, feats.shape[-1])


def prompt_ids(batch: int, frames: int, text_tokens: int, device: str, vocab: int, answer: int = 0, seed: int = 0):
    """Token ids ``[bos, text, <video> x frames*144, text, answer]`` of the right length for the model."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(10, vocab, (batch, text_tokens // 2), generator=gen)
    tail = torch.randint(10, vocab, (batch, text_tokens - text_tokens // 2 + answer), generator=gen)
    video = torch.full((batch, frames * PER_FRAME), VIDEO_TOKEN)
    bos = torch.ones((batch, 1), dtype=torch.long)
    return torch.cat([bos, head, video, tail], dim=1).to(device)
