"""Another family on the service's model path: LLaVA-OneVision-7B's shape (random weights) saved as a checkpoint,
loaded by ``VideoQAModel`` with ``dtype``/``attn_implementation`` on ``auto``, answering a video and an image.

    python -m bench.gpu_families                 # 7B shape on the GPU (bf16)
    python -m bench.gpu_families --shape tiny    # a CPU smoke run
    python -m bench.gpu_families --json          # ... then one JSON object of the figures as the last line

Figures: vision ms per frame (SigLIP + projector + bilinear pooling, one video), prefill tokens/s (one forward over
a video's embeddings), an image's vision + prefill, and videos/s answering ``--batch`` videos one at a time and as
one batch. ``7b``: Qwen2-7B (hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944, vocab 152064) and SigLIP
so400m/14 at 384 px (hidden 1152, 27 layers, 16 heads, MLP 4304): 196 tokens per frame + 1 per video.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.machine import describe_machine
from bench.service_path import one_at_a_time_vs_batched, service_path_args

SHAPES = {
    "7b": dict(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4, mlp=18944,
               v_hidden=1152, v_layers=27, v_heads=16, v_mlp=4304),
    "tiny": dict(vocab=1024, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, v_hidden=32, v_layers=2, v_heads=2,
                 v_mlp=64),
}


def write_checkpoint(shape: str, dest: Path) -> Path:
    """A OneVision checkpoint of ``shape`` (random weights) with the tiny OneVision's processor and tokenizer."""
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from video_llava.model.families.tiny import build_tiny
    from video_llava.model.loading import load_processor, resolve_runtime

    tiny = build_tiny("llava_onevision", dest.parent / "tiny")
    base = LlavaOnevisionConfig.from_pretrained(tiny)
    s = SHAPES[shape]
    text = Qwen2Config(vocab_size=max(s["vocab"], base.text_config.vocab_size), hidden_size=s["hidden"],
                       intermediate_size=s["mlp"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["kv_heads"], max_position_embeddings=32768, tie_word_embeddings=False,
                       bos_token_id=base.text_config.bos_token_id, eos_token_id=base.text_config.eos_token_id,
                       pad_token_id=base.text_config.pad_token_id)
    vision = SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=s["v_hidden"], intermediate_size=s["v_mlp"],
                                num_hidden_layers=s["v_layers"], num_attention_heads=s["v_heads"])
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=base.image_token_index,
                                  video_token_index=base.video_token_index, vision_feature_select_strategy="full",
                                  vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    runtime = resolve_runtime()
    with torch.device(runtime.device):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=runtime.dtype)
    model.generation_config.eos_token_id = base.text_config.eos_token_id
    model.generation_config.pad_token_id = base.text_config.pad_token_id
    model.save_pretrained(dest)
    load_processor(str(tiny), base).save_pretrained(dest)
    del model
    return dest


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_s(fn, repeat: int = 3) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import numpy as np
    import torch

    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    args = service_path_args(__doc__.splitlines()[0], SHAPES)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = write_checkpoint(args.shape, Path(tmp) / "ckpt")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        qa = VideoQAModel(ModelSettings(model=str(path), num_frames=args.frames, max_frames=args.frames,
                                        feature_cache_mb=0, max_new_tokens=args.new_tokens))
        load_s = time.perf_counter() - start
        rng = np.random.default_rng(0)
        videos = [rng.integers(0, 255, (args.frames, 384, 384, 3), dtype=np.uint8) for _ in range(args.batch)]
        image = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        question = "What happens in the video?"
        vision_s = median_s(lambda: qa.family.video_features(qa.model, qa.processor, [videos[0]]))
        prepared = qa.prepare(videos[0], question)
        embeds, mask, _, _ = qa.embedder([prepared])
        with torch.inference_mode():
            prefill_s = median_s(lambda: qa.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                                                  logits_to_keep=1))
        image_prepared = qa.prepare(image, "What is in the image?")
        image_s = median_s(lambda: qa.generate([image_prepared]))
        sequential, batched, _ = one_at_a_time_vs_batched(qa, videos, question)
        described = qa.describe()
    figures = {
        "bench": "gpu_families", "family": described["family"], "shape": args.shape, "frames": args.frames,
        "batch": args.batch, "new_tokens": args.new_tokens, "device": described["device"], "dtype": described["dtype"],
        "attention": described["attn_implementation"], "rope_factor": described["rope_scaling_factor"],
        "visual_tokens_per_video": prepared.visual_tokens, "image_visual_tokens": image_prepared.visual_tokens,
        "checkpoint_write_and_load_s": round(load_s, 1),
        "vision_ms_per_frame": round(vision_s * 1e3 / args.frames, 2),
        "prefill_tokens_per_s": round((prepared.visual_tokens + prepared.prompt_tokens) / prefill_s),
        "image_answer_s": round(image_s, 3),
        "sequential_videos_per_s": round(args.batch / sequential, 3),
        "batched_videos_per_s": round(args.batch / batched, 3),
        "batched_speedup": round(sequential / batched, 2),
        "machine": describe_machine(("torch", "transformers", "flash-attn")),
    }
    print(f"{figures['family']} {args.shape} via VideoQAModel on {figures['device']} ({figures['dtype']}, "
          f"{figures['attention']}): vision {figures['vision_ms_per_frame']} ms/frame, prefill "
          f"{figures['prefill_tokens_per_s']} tokens/s, an image answered in {figures['image_answer_s']} s; "
          f"{args.frames} frames x {args.batch}: one at a time {figures['sequential_videos_per_s']} videos/s, batched "
          f"{figures['batched_videos_per_s']} videos/s ({figures['batched_speedup']}x)", flush=True)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
