"""Training throughput: SFT and DPO samples/s and peak memory, for the embedded shape on CPU and the 7B shape on a GPU.

    python -m bench.train                    # tiny shape (the embedded default's), CPU, full fine-tuning
    python -m bench.train --shape 7b         # 7B shape, random weights, bf16, LoRA r=16 + gradient checkpointing
    python -m bench.train --json             # ... then one JSON object of the figures as the last line

Both steps are the jobs' own code paths (``video_llava.train.examples``): SFT = answer-only cross-entropy, backward,
AdamW; DPO = policy log-probs of chosen and rejected answers, frozen reference log-probs (a frozen copy, or
with LoRA the base with adapters disabled), ``dpo_loss``, backward, AdamW. Timed after one warm-up step;
samples/s counts SFT examples and DPO pairs. The vision tower is frozen, as in the jobs.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time

from bench.machine import describe_machine
from bench.shapes import SHAPES, build_model, pick_runtime, prompt_ids, video_batch
from video_llava.train.examples import IGNORE_INDEX
from video_llava.train.objectives import answer_logprobs, dpo_loss

ANSWER_TOKENS = 4


def make_batch(rows: int, frames: int, device: str, dtype, vocab: int, seed: int) -> dict:
    import torch

    ids = prompt_ids(rows, frames, 40, device, vocab, answer=ANSWER_TOKENS, seed=seed)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "pixel_values_videos": video_batch(rows, frames, device, dtype)}


def prepare(model, lora_rank: int, checkpointing: bool):
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        from video_llava.train.run import LORA_TARGETS

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=LORA_TARGETS))
    model.train()
    return model


def peak_memory_gib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # process peak RSS (KiB on Linux)


def run(kind: str, args, device: str, dtype, attn: str) -> dict:
    import torch

    model = build_model(args.shape, args.frames, device, dtype, attn)
    reference = None
    if kind == "dpo" and not args.lora_rank:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    model = prepare(model, args.lora_rank, args.checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vocab = SHAPES[args.shape]["vocab"]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step(seed: int) -> float:
        if kind == "sft":
            loss = model(**make_batch(args.batch, args.frames, device, dtype, vocab, seed)).loss
        else:
            batch = make_batch(2 * args.batch, args.frames, device, dtype, vocab, seed)  # chosen, rejected, ...
            with torch.no_grad():
                if reference is not None:
                    ref = answer_logprobs(reference, batch).view(-1, 2)
                else:
                    with model.disable_adapter():
                        ref = answer_logprobs(model, batch).view(-1, 2)
            policy = answer_logprobs(model, batch).view(-1, 2)
            loss, _, _ = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    step(0)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i + 1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {"job": kind, "samples_per_s": round(args.batch * args.steps / elapsed, 3),
              "step_s": round(elapsed / args.steps, 3), "peak_memory_gib": peak_memory_gib(device),
              "trainable_params": trainable}
    return result  # the model and optimizer go with this frame; main() empties the CUDA cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--frames", type=int, default=None, help="frames per video (default: 8 tiny, 16 7b)")
    parser.add_argument("--batch", type=int, default=None, help="SFT examples / DPO pairs per step (default: 8 tiny, 4 7b)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=None, help="default: 0 (full) tiny, 16 for 7b")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    big = args.shape == "7b"
    args.frames = args.frames or (16 if big else 8)
    args.batch = args.batch or (4 if big else 8)
    args.lora_rank = (16 if big else 0) if args.lora_rank is None else args.lora_rank
    args.checkpointing = big
    device, dtype, attn = pick_runtime(args.device)
    rows = []
    for kind in ("sft", "dpo"):
        row = run(kind, args, device, dtype, attn)
        rows.append(row)
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        print(f"{kind}: {row['samples_per_s']} samples/s ({row['step_s']} s/step, batch {args.batch}, {args.frames} frames), "
              f"peak memory {row['peak_memory_gib']} GiB, {row['trainable_params']:,} trainable parameters", flush=True)
    figures = {"bench": "train", "shape": args.shape, "device": device, "dtype": str(dtype).replace("torch.", ""),
               "attention": attn, "frames": args.frames, "batch": args.batch, "lora_rank": args.lora_rank,
               "gradient_checkpointing": args.checkpointing, "rows": rows,
               "dpo_over_sft_time": round(rows[1]["step_s"] / rows[0]["step_s"], 2),
               "machine": describe_machine(("torch", "transformers", "peft", "flash-attn"))}
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
