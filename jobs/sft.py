"""Supervised fine-tuning of LLaVA-NeXT-Video on LLaVA-style video QA records, with Ray Train.

    python -m jobs.sft --data data/synthetic --output runs --name sft [--max-steps 200] [--batch-size 8]
    ray job submit --working-dir . -- python -m jobs.sft --data /shared/data/synthetic --output /shared/runs --name sft

Records are read with Ray Data and split across workers. Loss only on answer tokens; vision tower frozen,
projector + LLM trained (or, with ``--lora-rank N``, PEFT LoRA adapters on the LLM's attention projections
plus the projector); DDP over ``--num-workers`` workers (1 CPU worker here, N GPUs on a cluster). Checkpoints every ``--checkpoint-every`` steps under
``<output>/<name>``; rerunning with the same ``--output``/``--name`` resumes from the latest one. The final
model is saved with ``save_pretrained`` to ``<output>/<name>/model``; ``<output>/<name>/metrics.jsonl`` logs
step and loss as training goes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field

from video_llava.job_cli import run_job
from video_llava.train_run import TrainRunConfig, fit


class SFTConfig(TrainRunConfig):
    data: Path = Field(..., description="dataset directory with train.jsonl (video and/or image records) and the media")
    name: str = "sft"
    model: str = Field("embedded", description="starting checkpoint: a directory, a hub id, 'embedded' or 'embedded-init'")
    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    train_vision_tower: bool = Field(False, description="also train the vision tower (for a tower that is not pretrained, like the embedded model's)")
    lora_rank: int = Field(0, ge=0, description="LoRA rank on the LLM's attention projections (PEFT); 0 trains the full LLM")


def train_loop(config: dict) -> None:
    """Runs on each Ray Train worker: its shard of the records, sampled in seeded random batches."""
    import random

    import numpy as np
    import ray.train

    from video_llava.feedback import flatten_record, load_media
    from video_llava.model import resolve_source
    from video_llava.prompts import build_prompt
    from video_llava.settings import ModelSettings
    from video_llava.train_run import (
        MetricsLog,
        load_for_training,
        prepare_training,
        report,
        setup_worker,
    )
    from video_llava.training import collate, sft_example

    cfg = SFTConfig.model_validate(config)
    setup_worker(cfg)
    model, processor, state, base = load_for_training(resolve_source(ModelSettings(model=cfg.model)), cfg.lora_rank,
                                                 freeze_vision=not cfg.train_vision_tower)
    model, optimizer, start_step = prepare_training(model, state, cfg.lr)

    rank = ray.train.get_context().get_world_rank()
    records = sorted(ray.train.get_dataset_shard("train").iter_rows(), key=lambda r: str(r["id"]))
    media_cache: dict[str, np.ndarray] = {}

    def example(record: dict) -> dict:
        """A video record, or an image record (``image`` instead of ``video``): both may share a batch."""
        row = flatten_record(record, cfg.data.resolve())
        key = row["video"] or row["image"]
        if key not in media_cache:
            media_cache[key] = load_media(row["video"], row["image"], cfg.frames)
        prompt = build_prompt(processor, row["question"])
        if row["image"]:
            return sft_example(processor, prompt, row["reference"], image=media_cache[key][0])
        return sft_example(processor, prompt, row["reference"], media_cache[key])

    log = MetricsLog(cfg.output.resolve() / cfg.name / "metrics.jsonl", rank)
    device = ray.train.torch.get_device()
    for step in range(start_step + 1, cfg.max_steps + 1):
        # Seeded by step: a resumed run draws the same batches as an uninterrupted one.
        drawn = random.Random(f"{cfg.seed}-{rank}-{step}").sample(records, min(cfg.batch_size, len(records)))
        batch = collate([example(r) for r in drawn],
                        processor.tokenizer.pad_token_id)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metrics = {"step": step, "loss": float(loss.detach())}
        log.write(metrics)
        save = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
        report(metrics, model, processor, optimizer, base, save)


def main(cfg: SFTConfig):
    import ray

    records = cfg.data / "train.jsonl"
    if not records.is_file():
        raise FileNotFoundError(f"no train.jsonl in {cfg.data} (make one with python -m jobs.make_synthetic)")
    if not ray.is_initialized():
        ray.init()
    result, final = fit(train_loop, cfg, datasets={"train": ray.data.read_json(str(records.resolve())).materialize()})
    print(f"sft: finished at step {result.metrics.get('step')} loss {result.metrics.get('loss'):.4f}; model in {final}")
    return result


def cli(argv: list[str] | None = None) -> int:
    return run_job(SFTConfig, main, "python -m jobs.sft", __doc__, argv, expected=(FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(cli())
