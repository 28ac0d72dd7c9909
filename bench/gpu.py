"""The GPU path of LLaVA-NeXT-Video-7B's shape, random weights: vision ms/frame, prefill and decode tokens/s,
and videos/s with Serve-style batching vs one request at a time, at 16/32/56 frames.

    python -m bench.gpu                    # 7B shape on the GPU (bf16; flash-attn 2 when installed, else sdpa)
    python -m bench.gpu --shape tiny       # the embedded default's shape: a CPU smoke run
    python -m bench.gpu --json             # ... then one JSON object of the figures as the last line

For each frame count: the vision tower (CLIP + stride-2 pooling + projector) on one video; a prefill of one
prompt (frames x 144 visual tokens + text); decoding ``--new-tokens`` tokens (forced, the weights are random);
then ``--batch`` videos answered one at a time (vision + generate each) and as one batch (one vision call, one
left-aligned generate of the same lengths), side by side. ``batched_speedup`` = batched videos/s over
sequential videos/s. RoPE is scaled for each frame count by LLaVA-NeXT's rule.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.machine import describe_machine
from bench.shapes import PER_FRAME, SHAPES, build_model, pick_runtime, prompt_ids, video_batch, video_features

TEXT_TOKENS = 40  # system prompt + question around the video


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 3) -> tuple[float, object]:
    """Median seconds of ``repeat`` calls after one warm-up, and the last result."""
    import statistics

    result = fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def embeds_for(model, ids, feats):
    """Token embeddings with the video features in place of the ``<video>`` tokens (what ``forward`` does)."""
    embeds = model.get_input_embeddings()(ids)
    mask = (ids == model.config.video_token_index).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, feats.to(embeds.dtype))


def bench_frames(model, frames: int, batch: int, new_tokens: int, device: str, dtype, repeat: int) -> dict:
    import torch

    vocab = model.config.text_config.vocab_size
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.inference_mode():
        one = video_batch(1, frames, device, dtype)
        vision_s, feats = timed(lambda: video_features(model, one), device, repeat)
        ids = prompt_ids(1, frames, TEXT_TOKENS, device, vocab)
        embeds = embeds_for(model, ids, feats)
        prefill_s, _ = timed(lambda: model(inputs_embeds=embeds, logits_to_keep=1), device, repeat)
        generate_s, _ = timed(lambda: model.generate(inputs_embeds=embeds, **gen), device, repeat)
        first_s, _ = timed(lambda: model.generate(inputs_embeds=embeds, max_new_tokens=1, do_sample=False), device, repeat)

        many = video_batch(batch, frames, device, dtype)
        ids_b = prompt_ids(batch, frames, TEXT_TOKENS, device, vocab)

        def sequential():
            for i in range(batch):
                f = video_features(model, many[i:i + 1])
                model.generate(inputs_embeds=embeds_for(model, ids_b[i:i + 1], f), **gen)

        def batched():
            f = video_features(model, many)
            model.generate(inputs_embeds=embeds_for(model, ids_b, f), **gen)

        seq_s, _ = timed(sequential, device, max(1, repeat // 2))
        bat_s, _ = timed(batched, device, max(1, repeat // 2))
    prompt_tokens = ids.shape[1]
    return {
        "frames": frames,
        "prompt_tokens": prompt_tokens,
        "rope_factor": float((getattr(model.config.text_config, "rope_parameters", None) or {}).get("factor", 1.0)),
        "vision_ms_per_frame": round(1000 * vision_s / frames, 3),
        "prefill_tokens_per_s": round(prompt_tokens / prefill_s, 1),
        # tokens after the first over the time they added: prefill and generate's set-up cancel out
        "decode_tokens_per_s": round((new_tokens - 1) / max(generate_s - first_s, 1e-9), 1),
        "sequential_videos_per_s": round(batch / seq_s, 3),
        "batched_videos_per_s": round(batch / bat_s, 3),
        "batched_speedup": round(seq_s / bat_s, 2),
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 56])
    parser.add_argument("--batch", type=int, default=8, help="videos per batch in the batched-vs-sequential run")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    device, dtype, attn = pick_runtime(args.device)
    if args.shape == "7b" and not device.startswith("cuda"):
        print("note: the 7B shape on a CPU takes hours; use --shape tiny for a smoke run", file=sys.stderr)
    start = time.perf_counter()
    rows = []
    for frames in args.frames:  # a model per frame count: RoPE scaling depends on the frames it must fit
        model = build_model(args.shape, frames, device, dtype, attn)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        row = bench_frames(model, frames, args.batch, args.new_tokens, device, dtype, args.repeat)
        if device.startswith("cuda"):
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows.append(row)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(f"frames {frames:>3} ({row['prompt_tokens']} tokens): vision {row['vision_ms_per_frame']} ms/frame, "
              f"prefill {row['prefill_tokens_per_s']} tok/s, decode {row['decode_tokens_per_s']} tok/s, "
              f"videos/s one-at-a-time {row['sequential_videos_per_s']} vs batched({args.batch}) "
              f"{row['batched_videos_per_s']} = {row['batched_speedup']}x", flush=True)
    figures = {
        "bench": "gpu",
        "shape": args.shape,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "attention": attn,
        "tokens_per_frame": PER_FRAME,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "rows": rows,
        "wall_s": round(time.perf_counter() - start, 1),
        "machine": describe_machine(("torch", "transformers", "flash-attn")),
    }
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
