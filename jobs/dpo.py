"""Direct preference optimisation (DPO) of LLaVA-NeXT-Video on AI-feedback pairs, with Ray Train.

    python -m jobs.dpo --preferences data/prefs --model runs/sft/model --output runs --name dpo
        [--beta 0.1] [--lr 5e-7] [--epochs 3] [--batch-size 8] [--loss sigmoid|ipo|robust] [--rpo-alpha 0]
        [--eval-fraction 0.1 --eval-every 25]
    ray job submit --working-dir . -- python -m jobs.dpo --preferences /shared/prefs --model /shared/runs/sft/model ...

The policy starts from ``--model`` (the SFT checkpoint) and a frozen copy of it is the reference. Pairs are the
``status == "pair"`` rows of ``jobs.make_preferences``, read with Ray Data and shared among the workers by rank.
Defaults are LLaVA-NeXT-Video-7B-DPO's (beta 0.1, lr 5e-7, 3 epochs, vision tower and projector frozen) with the
optimiser settings of the LLaVA family's DPO scripts and TRL (10% warmup, cosine decay, no weight decay, gradients
clipped to norm 1). ``--loss``, ``--label-smoothing`` and ``--rpo-alpha`` are TRL's (``train.objectives``).
``--eval-fraction`` holds pairs out of training and scores them every ``--eval-every`` steps. Checkpoints every
``--checkpoint-every`` steps; rerunning with the same ``--output``/``--name`` resumes. ``metrics.jsonl`` (and
TensorBoard under ``<output>/<name>/tensorboard``; ``--report-to`` adds MLflow or W&B) logs per step what TRL
logs: loss, ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected`` (both falling: probability leaks to other answers), ``nll_loss`` with RPO, ``grad_norm``, ``lr``,
and the same under ``eval/`` for the held-out pairs. ``--strategy fsdp`` shards the policy with FSDP2 across
``--num-workers`` (docs/settings.md); the reference stays whole (scored once per pair, then freed).

Why not TRL's ``DPOTrainer``: its collator builds image inputs only (``pixel_values_videos`` needs a collator
subclass), it drives HF ``Trainer`` rather than our Ray Train loop, and it reloads the reference model from a
saved config. Its losses are a few lines each (``video_llava.train.objectives``), so the job shares the SFT job's
data, checkpoint and resume code instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field, model_validator

from video_llava.data.splits import held_out
from video_llava.job_cli import run_job
from video_llava.ray_runtime import ensure_ray
from video_llava.train.objectives import PreferenceLossType, PreferenceObjective
from video_llava.train.parts import Part
from video_llava.train.run import TrainRunConfig, fit
from video_llava.train.schedule import Schedule


class DPOConfig(TrainRunConfig):
    preferences: Path = Field(..., description="output directory of jobs.make_preferences")
    name: str = "dpo"
    model: str = Field(..., description="the SFT checkpoint: policy start and frozen reference")
    beta: float = Field(0.1, gt=0)
    lr: float = Field(5e-7, gt=0)
    lr_schedule: Schedule = Field("cosine", description="after the warmup: constant, linear or cosine decay")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="the share of the steps the learning rate warms up over")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the gradients' global norm to this (0: no clipping)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (default: all epochs)")
    batch_size: int = Field(8, ge=1, description="pairs per micro-batch per worker (a step takes --grad-accum of them)")
    train: tuple[Part, ...] = Field(("llm",), description="the parts that train, comma-separated: vision, projector, "
                                    "llm (the 7B-DPO recipe trains the LLM alone)")
    loss: PreferenceLossType = Field("sigmoid", description="sigmoid (DPO), ipo, or robust (DPO unbiased under "
                                     "--label-smoothing label noise)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="the chance a pair's label is wrong: conservative "
                                   "DPO with --loss sigmoid, the robust loss's noise rate with --loss robust")
    rpo_alpha: float = Field(0.0, ge=0, description="weight of the chosen answer's per-token NLL added to the loss "
                             "(RPO; TRL's rpo_alpha): 0 leaves it out")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="the share of the pairs held out of training (picked by "
                                 "a hash of their id, so the same pairs on every run) and scored every --eval-every "
                                 "steps and at the end: eval/rewards/accuracies, eval/rewards/margins, eval/logps/...")
    eval_every: int = Field(25, ge=1, description="steps between evaluations of the held-out pairs")

    @model_validator(mode="after")
    def _loss_takes_smoothing(self):
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("--label-smoothing applies to --loss sigmoid or robust, not ipo")
        return self

    def objective(self) -> PreferenceObjective:
        return PreferenceObjective(self.beta, self.loss, self.label_smoothing, self.rpo_alpha)


def train_loop(config: dict) -> None:
    """Runs on each Ray Train worker: epochs over its share of the pairs in a seeded order per epoch, and the
    held-out pairs scored every ``eval_every`` steps."""
    import gc
    import math
    import random
    import time

    import ray.train
    import torch

    from video_llava.model.loading import load_checkpoint
    from video_llava.train.examples import ExampleMaker, collate
    from video_llava.train.objectives import PairScores, answer_lengths, answer_logprobs, summarize_pairs
    from video_llava.train.run import start_worker, worker_rows
    from video_llava.train.step import autocast, chunks

    cfg = DPOConfig.model_validate(config)
    objective = cfg.objective()
    run = start_worker(cfg, cfg.model)
    reference, _ = load_checkpoint(run.source)  # the same family's class as the policy
    reference = reference.to(run.device).eval().requires_grad_(False)
    pairs = worker_rows()
    eval_pairs = worker_rows("eval") if cfg.eval_fraction else []
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

    # The reference is frozen: every pair the run will take (and every held-out one) is scored once, up front, in the
    # micro-batches training takes it in; then the reference's memory goes (a 7B reference is 14 GB in bf16 on every
    # worker otherwise).
    started, ref_cache = time.perf_counter(), {}
    parts = [part for step in range(run.start_step + 1, total + 1) for part in chunks(pairs_of(step), cfg.batch_size)]
    with torch.no_grad(), autocast(cfg.precision, run.device):
        for part in parts + chunks(eval_pairs, cfg.batch_size):
            if any(p["id"] not in ref_cache for p in part):
                for p, scores in zip(part, answer_logprobs(reference, batch_of(part)).view(-1, 2).tolist()):
                    ref_cache[p["id"]] = tuple(scores)
    del reference
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    if run.rank == 0:
        print(f"dpo: the reference scored {len(ref_cache)} pairs on this worker in {time.perf_counter() - started:.1f} s; "
              "its memory freed", flush=True)

    def scores_of(part: list[dict]) -> PairScores:
        batch = batch_of(part)
        return PairScores(policy=answer_logprobs(run.model, batch).view(-1, 2),
                          reference=torch.tensor([ref_cache[p["id"]] for p in part], device=run.device),
                          lengths=answer_lengths(batch).view(-1, 2))

    def loss_of(part: list[dict]):
        """The objective of a micro-batch of pairs (its per-pair figures kept for the step's metrics)."""
        loss, figures = objective(scores_of(part))
        seen.append(figures)
        return loss

    def evaluate() -> dict[str, float]:
        """The held-out pairs' figures under the policy now, over every worker's share (each pair once)."""
        run.model.eval()
        mine = {}
        with torch.no_grad(), autocast(cfg.precision, run.device):
            for part in chunks(eval_pairs, cfg.batch_size):  # every worker as many micro-batches (FSDP's collectives)
                _, figures = objective(scores_of(part))
                for k, p in enumerate(part):
                    mine[p["id"]] = {name: values[k:k + 1].cpu() for name, values in figures.items()}
        run.model.train()
        everyone = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, mine)
        unique = {pair: figures for share in everyone for pair, figures in share.items()}
        return {f"eval/{name}": value for name, value in summarize_pairs(list(unique.values())).items()} | {
            "eval/pairs": len(unique)}

    for step in range(run.start_step + 1, total + 1):
        epoch = (step - 1) // per_epoch
        step_pairs = pairs_of(step)
        seen: list = []
        done = run.step(step, total, [(part, len(part) / len(step_pairs)) for part in chunks(step_pairs, cfg.batch_size)],
                        loss_of)
        metrics = {"step": step, "epoch": epoch + 1, **summarize_pairs(seen), "loss": done.loss,
                   "grad_norm": done.grad_norm, "lr": done.lr}
        if eval_pairs and (step % cfg.eval_every == 0 or step == total):
            metrics |= evaluate()
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


def split_pairs(pairs, fraction: float) -> dict:
    """``{"train": ..., "eval": ...}``: the pairs ``held_out`` keeps out of training at ``fraction`` (none at 0)."""
    if not fraction:
        return {"train": pairs}
    train = pairs.filter(lambda row: not held_out(row["id"], fraction)).materialize()
    evaluation = pairs.filter(lambda row: held_out(row["id"], fraction)).materialize()
    if evaluation.count() == 0 or train.count() == 0:
        raise ValueError(f"--eval-fraction {fraction} of {pairs.count()} pairs leaves {evaluation.count()} to evaluate "
                         f"and {train.count()} to train: both need some")
    return {"train": train, "eval": evaluation}


def main(cfg: DPOConfig):
    if cfg.dry_run:  # each pair is two sequences; the reference is whole on every worker
        from video_llava.train.memory_plan import plan_run

        print(plan_run(cfg, cfg.model, sequences_per_example=2, reference=True).describe())
        return None
    ensure_ray()
    datasets = split_pairs(read_pairs(cfg.preferences), cfg.eval_fraction)
    held = f" ({datasets['eval'].count()} held out)" if "eval" in datasets else ""
    print(f"dpo: {datasets['train'].count()} pairs{held}, {cfg.loss} loss, beta {cfg.beta}, lr {cfg.lr} "
          f"({cfg.lr_schedule}, warmup {cfg.warmup_ratio}), {cfg.epochs} epochs from {cfg.model}", flush=True)
    result, final = fit(train_loop, cfg, datasets=datasets)
    m = result.metrics
    print(f"dpo: finished at step {m.get('step')} loss {m.get('loss'):.4f} reward margin "
          f"{m.get('rewards/margins'):.4f}; model in {final}")
    return result


def cli(argv: list[str] | None = None) -> int:
    return run_job(DPOConfig, main, "python -m jobs.dpo", __doc__, argv, expected=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(cli())
