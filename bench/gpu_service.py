"""The service's own model path on a GPU: ``VideoQAModel`` loading a 7B-shaped checkpoint (random weights) from disk
with ``dtype``/``attn_implementation`` on ``auto``, answering a batch of videos vs one at a time.

    python -m bench.gpu_service [--shape 7b|tiny] [--frames 32] [--batch 8] [--json]

Where bench/gpu.py times the transformers model directly, this goes through what Serve replicas run:
``resolve_config`` (RoPE factor), dtype and attention selection, the vision-feature cache (off here: every
video is new), ``inputs_embeds`` generation, answer decoding. The checkpoint is the embedded default's tokenizer and
processor with the chosen shape's config and random weights, saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench.machine import describe_machine
from bench.service_path import one_at_a_time_vs_batched, service_path_args
from bench.shapes import SHAPES, build_model, pick_runtime


def write_checkpoint(shape: str, max_frames: int, dest: Path) -> Path:
    """A ``save_pretrained`` checkpoint of ``shape`` with the embedded default's processor (its tokenizer ids fit)."""
    from transformers import LlavaNextVideoProcessor

    from video_llava.model.embedded import embedded_path

    device, dtype, attn = pick_runtime()
    processor = LlavaNextVideoProcessor.from_pretrained(embedded_path(packaged=False))
    model = build_model(shape, max_frames, device, dtype, "sdpa")
    model.config.video_token_index = processor.video_token_id
    model.config.image_token_index = processor.image_token_id
    model.config.text_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    del model
    return dest


def main() -> None:
    import numpy as np
    import torch

    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    args = service_path_args(__doc__.splitlines()[0], SHAPES)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = write_checkpoint(args.shape, args.frames, Path(tmp) / "ckpt")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model = VideoQAModel(ModelSettings(model=str(path), num_frames=args.frames, max_frames=args.frames,
                                           feature_cache_mb=0, max_new_tokens=args.new_tokens))
        load_s = time.perf_counter() - start
        rng = np.random.default_rng(0)
        videos = [rng.integers(0, 255, (args.frames, 240, 320, 3), dtype=np.uint8) for _ in range(args.batch)]
        sequential, batched, answers = one_at_a_time_vs_batched(model, videos, "What happens in the video?")
        described = model.describe()
    figures = {
        "bench": "gpu_service", "shape": args.shape, "frames": args.frames, "batch": args.batch,
        "device": described.get("device"), "dtype": described.get("dtype"),
        "attention": described.get("attn_implementation"), "rope_factor": described.get("rope_scaling_factor"),
        "visual_tokens_per_video": answers[0].visual_tokens, "checkpoint_write_and_load_s": round(load_s, 1),
        "sequential_videos_per_s": round(args.batch / sequential, 3), "batched_videos_per_s": round(args.batch / batched, 3),
        "batched_speedup": round(sequential / batched, 2),
        "machine": describe_machine(("torch", "transformers", "flash-attn")),
    }
    print(f"{args.shape} via VideoQAModel on {figures['device']} ({figures['dtype']}, {figures['attention']}, RoPE x"
          f"{figures['rope_factor']}): {args.frames} frames, batch {args.batch}: one at a time "
          f"{figures['sequential_videos_per_s']} videos/s, batched {figures['batched_videos_per_s']} videos/s "
          f"({figures['batched_speedup']}x)", flush=True)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
