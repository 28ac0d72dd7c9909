"""Direct preference optimisation (DPO) of LLaVA-NeXT-Video on AI-feedback pairs, with Ray Train.

    python -m jobs.dpo --preferences data/prefs --model runs/sft/model --output runs --name dpo
        [--beta 0.1] [--lr 5e-7] [--epochs 3] [--batch-size 8]
    ray job submit --working-dir . -- python -m jobs.dpo --preferences /shared/prefs --model /shared/runs/sft/model ...

The policy starts from ``--model`` (the SFT checkpoint) and a frozen copy of it is the reference. Pairs are the
``status == "pair"`` rows of ``jobs.make_preferences``, read with Ray Data and split across workers. Defaults
are LLaVA-NeXT-Video-7B-DPO's (beta 0.1, lr 5e-7, 3 epochs, vision tower and projector frozen). Checkpoints
every ``--checkpoint-every`` steps; rerunning with the same ``--output``/``--name`` resumes. ``metrics.jsonl``
logs loss, the chosen-minus-rejected log-ratio margin and reward accuracy per step. ``--strategy fsdp`` shards the
policy with FSDP2 across ``--num-workers`` (docs/settings.md); the reference stays whole (scored once per pair).

Why not TRL's ``DPOTrainer``: its collator builds image inputs only (``pixel_values_videos`` needs a collator
subclass), it drives HF ``Trainer`` rather than our Ray Train loop, and it reloads the reference model from a
saved config. The loss itself is three lines (``video_llava.train.objectives.dpo_loss``), so the job shares the SFT
job's data, checkpoint and resume code instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field

from video_llava.job_cli import run_job
from video_llava.ray_runtime import ensure_ray
from video_llava.train.run import TrainRunConfig, fit


class DPOConfig(TrainRunConfig):
    preferences: Path = Field(..., description="output directory of jobs.make_preferences")
    name: str = "dpo"
    model: str = Field(..., description="the SFT checkpoint: policy start and frozen reference")
    beta: float = Field(0.1, gt=0)
    lr: float = Field(5e-7, gt=0)
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (default: all epochs)")
    batch_size: int = Field(8, ge=1, description="pairs per micro-batch per worker (a step takes --grad-accum of them)")
    train_projector: bool = Field(False, description="also train the projector (the 7B-DPO recipe froze it)")


def train_loop(config: dict) -> None:
    """Runs on each Ray Train worker: epochs over its shard of the pairs in a seeded order per epoch."""
    import gc
    import math
    import random
    import time

    import ray.train
    import torch

    from video_llava.model.loading import load_checkpoint
    from video_llava.train.examples import ExampleMaker, collate
    from video_llava.train.objectives import answer_logprobs, dpo_loss
    from video_llava.train.run import start_worker, worker_rows
    from video_llava.train.step import chunks

    cfg = DPOConfig.model_validate(config)
    run = start_worker(cfg, cfg.model, cfg.lr, freeze_projector=not cfg.train_projector)
    reference, _ = load_checkpoint(run.source)  # the same family's class as the policy
    reference = reference.to(run.device).eval().requires_grad_(False)
    pairs = worker_rows()
    if not pairs:
        raise ValueError("this worker got no preference pairs")
    per_step = cfg.batch_size * cfg.grad_accum  # pairs a step takes, batch_size at a time
    per_epoch = math.ceil(len(pairs) / per_step)
    total = min(cfg.max_steps or per_epoch * cfg.epochs, per_epoch * cfg.epochs)
    make_example = ExampleMaker(run.processor, cfg.frames)

    def pairs_of(step: int) -> list[dict]:
        """The pairs of ``step``: epoch by epoch in a seeded order (the same order again on resume)."""
        epoch, position = divmod(step - 1, per_epoch)
        order = list(range(len(pairs)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        return [pairs[k] for k in order[position * per_step:(position + 1) * per_step]]

    def batch_of(part: list[dict]) -> dict:
        rows = [make_example(p, p[k]) for p in part for k in ("chosen", "rejected")]  # c, r, c, r, ...
        return {k: v.to(run.device) for k, v in collate(rows, run.processor.tokenizer.pad_token_id).items()}

    # The reference is frozen: every pair the run will take is scored once, up front, in the micro-batches training
    # takes it in; then the reference's memory goes (a 7B reference is 14 GB in bf16 on every worker otherwise).
    started, ref_cache = time.perf_counter(), {}
    with torch.no_grad():
        for step in range(run.start_step + 1, total + 1):
            for part in chunks(pairs_of(step), cfg.batch_size):
                if any(p["id"] not in ref_cache for p in part):
                    for p, scores in zip(part, answer_logprobs(reference, batch_of(part)).view(-1, 2).tolist()):
                        ref_cache[p["id"]] = tuple(scores)
    del reference
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    if ray.train.get_context().get_world_rank() == 0:
        print(f"dpo: the reference scored {len(ref_cache)} pairs on this worker in {time.perf_counter() - started:.1f} s; "
              "its memory freed", flush=True)

    def loss_of(part: list[dict]):
        """The DPO loss of a micro-batch of pairs (its margins and accuracies kept for the step's metrics)."""
        batch = batch_of(part)
        ref = torch.tensor([ref_cache[p["id"]] for p in part], device=run.device)
        policy = answer_logprobs(run.model, batch).view(-1, 2)
        loss, margin, accuracy = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], cfg.beta)
        seen.append((margin.detach().float(), accuracy.detach().float()))
        return loss

    for step in range(run.start_step + 1, total + 1):
        epoch = (step - 1) // per_epoch
        step_pairs = pairs_of(step)
        seen: list = []
        loss = run.step([(part, len(part) / len(step_pairs)) for part in chunks(step_pairs, cfg.batch_size)],
                        loss_of, cfg.precision)
        margin, accuracy = (torch.cat(values) for values in zip(*seen))
        metrics = {"step": step, "epoch": epoch + 1, "loss": loss,
                   "margin": float(margin.mean()), "reward_accuracy": float(accuracy.mean())}
        run.end_step(metrics, save=step % cfg.checkpoint_every == 0 or step == total, total_steps=total,
                     samples=len(step_pairs))


def read_pairs(preferences: Path):
    """The ``pair`` rows of a preferences output as a Ray Dataset."""
    import ray

    shards = preferences / "shards"
    if not shards.is_dir() or not any(shards.glob("*.json")):
        raise FileNotFoundError(f"no preference shards in {shards} (make them with python -m jobs.make_preferences)")
    ds = ray.data.read_json(str(shards.resolve())).filter(lambda row: row["status"] == "pair")
    ds = ds.select_columns(["id", "video", "image", "question", "chosen", "rejected"]).materialize()
    if ds.count() == 0:
        raise ValueError(f"{preferences} has no preference pairs (every question tied or failed; see its summary.json)")
    return ds


def main(cfg: DPOConfig):
    if cfg.dry_run:  # each pair is two sequences; the reference is whole on every worker
        from video_llava.train.memory_plan import plan_run

        print(plan_run(cfg, cfg.model, train_projector=cfg.train_projector, sequences_per_example=2,
                       reference=True).describe())
        return None
    ensure_ray()
    pairs = read_pairs(cfg.preferences)
    print(f"dpo: {pairs.count()} pairs, beta {cfg.beta}, lr {cfg.lr}, {cfg.epochs} epochs from {cfg.model}", flush=True)
    result, final = fit(train_loop, cfg, datasets={"train": pairs})
    m = result.metrics
    print(f"dpo: finished at step {m.get('step')} loss {m.get('loss'):.4f} margin {m.get('margin'):.3f}; model in {final}")
    return result


def cli(argv: list[str] | None = None) -> int:
    return run_job(DPOConfig, main, "python -m jobs.dpo", __doc__, argv, expected=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(cli())
