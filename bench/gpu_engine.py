"""The continuous-batching engine on a GPU: a 7B-shaped LLaVA-NeXT-Video checkpoint (random weights) through
``VideoQAModel`` and ``Engine``, against its own ceiling and against one request at a time (issue 20's GPU bench).

    python -m bench.gpu_engine [--shape 7b|tiny] [--frames 32] [--requests 32] [--decode-modes dynamic compiled]
                               [--json]

For 32 and 256 new tokens (EOS ignored), ``--requests`` distinct videos arrive spread over time: videos/s, TTFT
p50/p99 and decode tokens/s per sequence. In the same run, the ceiling: vision + prefill alone, back to back, for
the same requests (no decoding); and a quarter of the requests answered one at a time at 256 tokens. Targets: at 32
tokens >= 0.8 of the ceiling; at 256 tokens >= 3x one at a time. Also how far the features of video preprocessing
on the device (the engine's path) are from the CPU's. The engine runs as the service does (media made ready ahead);
each of ``--decode-modes`` after the first adds, at the largest token count, a burst in that mode after a warm-up
burst (``compiled``: its shapes compile there), with the share of answers token-identical to the first mode's.
The engine's KV budget is what fits in 70% of the GPU memory free after loading (``kv_budget``), as a service would
set ``max_batch_tokens``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.engine import ceiling_videos_per_s, run_engine
from bench.gpu_service import write_checkpoint
from bench.machine import describe_machine
from bench.shapes import SHAPES


def preprocessing_check(model, frames) -> dict:
    """One video's features with the processor on the model's device (the engine's path) vs on the CPU (the
    processor's default): on a GPU the resize kernels differ, so the features are close, not equal."""
    import torch

    with torch.inference_mode():
        ours = model.family.video_features(model.model, model.processor, [frames])[0].float()
        pixels = model.processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]
        out = model.model.get_video_features(pixel_values_videos=pixels.to(model.model.device, model.model.dtype),
                                             return_dict=True).pooler_output[0]
        cpu = out.reshape(-1, out.shape[-1]).float()
    diff = float((ours - cpu).abs().max())
    return {"max_abs_diff": round(diff, 6), "relative_to_max": round(diff / max(float(cpu.abs().max()), 1e-12), 6)}


def kv_budget(model, share: float = 0.7) -> int:
    """KV positions that fit in ``share`` of the GPU memory free after loading (the engine's ``max_tokens``, as
    ``batching.max_batch_tokens: auto`` sizes it): 32 rows of 32-frame 7B prompts would need about 87 GB, more than an
    H100 has. 1 << 20 off a GPU."""
    import torch

    from video_llava.engine.budget import auto_max_tokens

    return auto_max_tokens(model.model, share) if torch.cuda.is_available() else 1 << 20


def other_mode(model, mode: str, prepared: list, params, requests: int, reference: list, budget: int,
               attention: str = "gather") -> dict:
    """A burst with ``mode`` decode steps, after a warm-up burst (compiling its shapes); the share of the first 8
    answers token-identical to ``reference`` (the first mode's: bf16 kernels may differ in the last bits)."""
    from video_llava.engine import Engine

    engine = Engine(model, max_running=requests, max_tokens=budget, preprocess_ahead=8, decode_mode=mode,
                    attention=attention)
    try:
        start = time.perf_counter()
        run_engine(engine, prepared, params, 0.0)
        warm_up_s = time.perf_counter() - start
        burst = run_engine(engine, prepared, params, 0.0)
        answers = engine.generate(prepared[:8], params)
    finally:
        engine.close()
    same = sum(a.text == b.text for a, b in zip(answers, reference))
    return {"burst": burst, "warm_up_s": round(warm_up_s, 1), "same_tokens": f"{same}/{len(reference)}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--decode-modes", nargs="+", default=["dynamic"], choices=["dynamic", "static", "compiled"])
    parser.add_argument("--attentions", nargs="+", default=["gather"], choices=["gather", "flex"],
                        help="the paged KV read by gathering each row's blocks, and/or by FlexAttention over the pool")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import numpy as np
    import torch

    from video_llava.engine import Engine, SamplingParams
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    figures: dict = {"bench": "gpu_engine", "shape": args.shape, "frames": args.frames, "requests": args.requests,
                     "machine": describe_machine(("torch", "transformers", "flash-attn"))}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(args.shape, args.frames, Path(tmp) / "ckpt")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model = VideoQAModel(ModelSettings(model=str(path), num_frames=args.frames, max_frames=args.frames,
                                           feature_cache_mb=0, max_new_tokens=max(args.tokens)))
        rng = np.random.default_rng(0)
        videos = [rng.integers(0, 255, (args.frames, 240, 320, 3), dtype=np.uint8) for _ in range(args.requests)]
        described = model.describe()
        budget = kv_budget(model)
        figures.update(device=described.get("device"), dtype=described.get("dtype"), kv_budget_positions=budget,
                       attention=described.get("attn_implementation"),
                       device_preprocessing=preprocessing_check(model, videos[0]))
        print(f"device vs CPU preprocessing: {figures['device_preprocessing']}", flush=True)
        for new in args.tokens:
            prepared = [model.prepare(v, "What happens in the video?", new) for v in videos]
            params = SamplingParams(new, ignore_eos=True)
            ceiling = ceiling_videos_per_s(model, prepared)
            engine = Engine(model, max_running=args.requests, max_tokens=budget, preprocess_ahead=8,
                            decode_mode=args.decode_modes[0])
            try:
                run_engine(engine, prepared[:2], params, 0.0)  # warm-up
                burst = run_engine(engine, prepared, params, 0.0)
                spread = run_engine(engine, prepared, params, burst["wall_s"] / 2)
                more = (len(args.decode_modes) > 1 or len(args.attentions) > 1) and new == max(args.tokens)
                reference = engine.generate(prepared[:8], params) if more else []
            finally:
                engine.close()
            row = {"ceiling_videos_per_s": round(ceiling, 3), "burst": burst, "spread": spread,
                   "of_ceiling": round(burst["requests_per_s"] / ceiling, 2),
                   "decode_tokens_per_s_per_sequence": round(new / burst["wall_s"], 1)}
            if new == max(args.tokens):
                alone = Engine(model, max_running=1)
                try:
                    few = prepared[: max(2, args.requests // 4)]
                    one = run_engine(alone, few, params, 0.0)
                finally:
                    alone.close()
                row["one_at_a_time_videos_per_s"] = one["requests_per_s"]
                row["vs_one_at_a_time"] = round(burst["requests_per_s"] / one["requests_per_s"], 2)
                for mode in args.decode_modes[1:]:
                    row[f"decode_{mode}"] = other_mode(model, mode, prepared, params, args.requests, reference, budget)
                for attention in [a for a in args.attentions if a != "gather"]:
                    row[f"attention_{attention}"] = other_mode(model, "dynamic", prepared, params, args.requests,
                                                              reference, budget, attention)
            figures[f"new_tokens_{new}"] = row
            print(f"{new} new tokens: {row}", flush=True)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
