"""Supervised fine-tuning of LLaVA-NeXT-Video on LLaVA-style video QA records, with Ray Train.

    python -m jobs.sft --data data/synthetic --output runs --name sft [--max-steps 200] [--batch-size 8]
    ray job submit --working-dir . -- python -m jobs.sft --data /shared/data/synthetic --output /shared/runs --name sft

Loss only on answer tokens; vision tower frozen, projector + LLM trained; DDP over ``--num-workers`` workers
(1 CPU worker here, N GPUs on a cluster). Checkpoints every ``--checkpoint-every`` steps under
``<output>/<name>``; rerunning with the same ``--output``/``--name`` resumes from the latest one. The final
model is saved with ``save_pretrained`` to ``<output>/<name>/model``; ``<output>/<name>/metrics.jsonl`` logs
step and loss as training goes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from video_llava.job_cli import add_config_flags, config_from_flags


class SFTConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    data: Path = Field(..., description="dataset directory with train.jsonl and videos/")
    output: Path = Field(..., description="Ray Train storage directory")
    name: str = "sft"
    model: str = "embedded"
    frames: int = Field(8, ge=1, le=56)
    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    checkpoint_every: int = Field(50, ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    seed: int = 0


def train_loop(config: dict) -> None:
    """Runs on each Ray Train worker."""
    import random

    import numpy as np
    import ray.train
    import torch
    from ray.train import Checkpoint
    from transformers import LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor

    from video_llava.model import resolve_source
    from video_llava.prompts import build_prompt
    from video_llava.settings import ModelSettings
    from video_llava.training import collate, freeze_vision_tower, load_records, question_answer, sft_example
    from video_llava.video import DecodeOptions, sample_video

    cfg = SFTConfig.model_validate(config)
    torch.manual_seed(cfg.seed)
    checkpoint = ray.train.get_checkpoint()
    start_step = 0
    if checkpoint:
        with checkpoint.as_directory() as ckpt:
            source = str(Path(ckpt) / "model")
            state = torch.load(Path(ckpt) / "trainer.pt", weights_only=False)
            model = LlavaNextVideoForConditionalGeneration.from_pretrained(source)
            processor = LlavaNextVideoProcessor.from_pretrained(source)
            start_step = state["step"]
    else:
        source = resolve_source(ModelSettings(model=cfg.model))
        model = LlavaNextVideoForConditionalGeneration.from_pretrained(source)
        processor = LlavaNextVideoProcessor.from_pretrained(source)
        state = None
    freeze_vision_tower(model)
    model.train()
    model = ray.train.torch.prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    inner = model.module if hasattr(model, "module") else model

    records = load_records(cfg.data / "train.jsonl")
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    records = records[rank::world]
    order = random.Random(cfg.seed + rank)
    frames_cache: dict[str, np.ndarray] = {}

    def example(record: dict) -> dict:
        if record["video"] not in frames_cache:
            frames_cache[record["video"]] = sample_video(cfg.data / record["video"], DecodeOptions(num_frames=cfg.frames)).frames
        question, answer = question_answer(record)
        return sft_example(processor, build_prompt(processor, question), answer, frames_cache[record["video"]])

    log_path = cfg.output.resolve() / cfg.name / "metrics.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for step in range(start_step + 1, cfg.max_steps + 1):
        batch = collate([example(r) for r in order.sample(records, min(cfg.batch_size, len(records)))],
                        processor.tokenizer.pad_token_id)
        device = ray.train.torch.get_device()
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metrics = {"step": step, "loss": float(loss.detach())}
        if rank == 0:  # a plain log of progress next to the checkpoints, readable while the job runs
            with open(log_path, "a") as log:
                log.write(json.dumps(metrics) + "\n")
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    inner.save_pretrained(Path(tmp) / "model")
                    processor.save_pretrained(Path(tmp) / "model")
                    torch.save({"step": step, "optimizer": optimizer.state_dict()}, Path(tmp) / "trainer.pt")
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)
        else:
            ray.train.report(metrics)


def main(cfg: SFTConfig):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(cfg.output.resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    result = trainer.fit()
    final = cfg.output.resolve() / cfg.name / "model"
    with result.checkpoint.as_directory() as ckpt:
        import shutil

        shutil.copytree(Path(ckpt) / "model", final, dirs_exist_ok=True)
    print(f"sft: finished at step {result.metrics.get('step')} loss {result.metrics.get('loss'):.4f}; model in {final}")
    return result


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.sft", description=__doc__.splitlines()[0])
    add_config_flags(parser, SFTConfig)
    try:
        cfg = config_from_flags(SFTConfig, vars(parser.parse_args(argv)))
    except ValueError as exc:
        print(f"error: invalid arguments: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
