"""Training throughput: SFT and DPO samples/s and peak memory, for the embedded shape on CPU and the 7B shape on a GPU.

    python -m bench.train                    # tiny shape (the embedded default's), CPU, full fine-tuning
    python -m bench.train --shape 7b         # 7B shape, random weights, bf16, LoRA r=16 + gradient checkpointing
    python -m bench.train --json             # ... then one JSON object of the figures as the last line
    python -m bench.train --strategies ddp fsdp   # and SFT over two gloo workers per strategy, +- checkpointing

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


def _sharded_worker(rank: int, world: int, port: int, strategy: str, checkpointing: bool, args, out) -> None:
    """One of ``world`` workers (gloo) running SFT steps under ``strategy``; rank 0 puts its figures on ``out``."""
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = prepare(build_model(args.shape, args.frames, "cpu", torch.float32, "sdpa"), 0, checkpointing)
    if strategy == "fsdp":
        from video_llava.train.sharding import shard

        model = shard(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vocab = SHAPES[args.shape]["vocab"]

    def step(seed: int) -> None:
        loss = model(**make_batch(args.batch, args.frames, "cpu", torch.float32, vocab, seed * world + rank)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(0)
    dist.barrier()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i + 1)
    dist.barrier()
    elapsed = time.perf_counter() - start

    def local(t):  # a sharded parameter's own shard
        return t.to_local() if hasattr(t, "to_local") else t

    params = list(model.parameters())
    state = sum(local(t).numel() * local(t).element_size() for t in params)
    state += sum(local(p.grad).numel() * local(p.grad).element_size() for p in params if p.grad is not None)
    state += sum(local(v).numel() * local(v).element_size() for s in optimizer.state.values()
                 for k, v in s.items() if k != "step")
    if rank == 0:
        out.put({"strategy": strategy, "workers": world, "gradient_checkpointing": checkpointing,
                 "samples_per_s": round(world * args.batch * args.steps / elapsed, 3),
                 "state_mib_per_worker": round(state / 2**20, 2), "peak_rss_gib": _own_peak_rss_gib()})
    dist.destroy_process_group()


def _own_peak_rss_gib() -> float:
    """This process's peak resident memory since it started (VmHWM: unlike getrusage's, not carried over from the
    process that spawned it)."""
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return round(kib / 2**20, 3)


def sharded_rows(args) -> list[dict]:
    """SFT over two gloo worker processes per strategy, with and without gradient checkpointing (CPU)."""
    import socket

    import torch.multiprocessing as mp

    rows = []
    for strategy in args.strategies:
        for checkpointing in (False, True):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            out = mp.get_context("spawn").SimpleQueue()
            mp.spawn(_sharded_worker, args=(2, port, strategy, checkpointing, args, out), nprocs=2)
            rows.append(out.get())
            print(f"sft {strategy} x2{' +checkpointing' if checkpointing else ''}: {rows[-1]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--frames", type=int, default=None, help="frames per video (default: 8 tiny, 16 7b)")
    parser.add_argument("--batch", type=int, default=None, help="SFT examples / DPO pairs per step (default: 8 tiny, 4 7b)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=None, help="default: 0 (full) tiny, 16 for 7b")
    parser.add_argument("--device", default=None)
    parser.add_argument("--strategies", nargs="*", default=[], choices=["ddp", "fsdp"],
                        help="also SFT over two gloo worker processes (CPU) per strategy, with and without checkpointing")
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
    if args.strategies:
        figures["two_workers"] = sharded_rows(args)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
