"""Supervised fine-tuning of LLaVA-NeXT-Video on LLaVA-style video QA records, with Ray Train.

    python -m jobs.sft --data data/synthetic --output runs --name sft [--max-steps 200] [--batch-size 8]
    python -m jobs.sft --records llava_v1_5_mix665k.json --media-root s3://bucket/images --on-bad-record skip ...
    ray job submit --working-dir . -- python -m jobs.sft --data /shared/data/synthetic --output /shared/runs --name sft

Records come from ``<data>/train.jsonl`` or ``--records`` (LLaVA's released ``.json`` arrays or ``.jsonl``: video,
image, several images with their placeholders anywhere in the human turns, or text-only records;
``data.record_files``), are checked on the driver (bad ones reported by index and reason, fatal or skipped), and
every worker takes its share by rank. Every gpt turn of a record's conversation is trained on. Loss only on answer tokens; vision tower frozen,
projector + LLM trained (or, with ``--lora-rank N``, PEFT LoRA adapters on the LLM's attention projections
plus the projector); DDP over ``--num-workers`` workers (1 CPU worker here, N GPUs on a cluster), or with
``--strategy fsdp`` FSDP2 (weights, gradients and optimizer state sharded across the workers, sharded checkpoints);
``--precision bf16``, ``--gradient-checkpointing`` and ``--grad-accum N`` (N micro-batches of ``--batch-size`` a
step) for large models; ``--warmup-ratio``, ``--lr-schedule linear|cosine`` (or ``--decay-from``), ``--max-grad-norm``
and ``--weight-decay`` as in transformers' Trainer. Checkpoints every ``--checkpoint-every`` steps under
``<output>/<name>``; rerunning with the same ``--output``/``--name`` resumes from the latest one. The final
model is saved with ``save_pretrained`` to ``<output>/<name>/model``; ``<output>/<name>/metrics.jsonl`` logs
step and loss as training goes. ``--frame-counts 4,8,16,32`` varies the frames per step (at a constant
frames x batch), so a model trained on short clips also answers when serving samples more frames.
``--video-prune-rates 0,0.25,0.5,0.75`` trains each video example with one of these shares of its video tokens
pruned by the rule serving applies (``model.pruning``, ``train.pruned``), so the model answers well under a video
token budget.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from video_llava.data.record_files import BadRecordsError, OnBadRecord
from video_llava.job_cli import run_job
from video_llava.model.settings import MAX_FRAMES
from video_llava.ray_runtime import ensure_ray
from video_llava.train.run import TrainRunConfig, fit


class SFTConfig(TrainRunConfig):
    data: Path | None = Field(None, description="dataset directory with train.jsonl and the media (make_synthetic's "
                              "layout); or give --records")
    records: str | None = Field(None, description="a records file as LLaVA releases them: a .json array or .jsonl, "
                                "local or s3:// (video, image, several images, or text-only records)")
    media_root: str | None = Field(None, description="directory or s3:// prefix the records' relative media paths are "
                                   "under (default: the records file's directory)")
    on_bad_record: OnBadRecord = Field("fail", description="a record that cannot be trained on (malformed, media "
                                       "missing or undecodable) stops the run (fail) or is reported and left out "
                                       "(skip); either way each is listed with its index and reason")
    name: str = "sft"
    model: str = Field("embedded", description="starting checkpoint: a directory, a hub id, 'embedded' or 'embedded-init'")
    max_steps: int | None = Field(None, ge=1, description="steps to train (default 200, or all of --epochs; with "
                                  "both, whichever ends first)")
    epochs: int | None = Field(None, ge=1, description="passes over the records, each in a seeded order (instead of "
                               "--max-steps' seeded draws)")
    batch_size: int = Field(8, ge=1)
    lora_rank: int = Field(0, ge=0, description="LoRA rank on the LLM's attention projections (PEFT); 0 trains the full LLM")

    @model_validator(mode="after")
    def _records_named(self):
        if (self.data is None) == (self.records is None):
            raise ValueError("give --data (a directory with train.jsonl) or --records (a .json/.jsonl file), not both")
        return self

    @property
    def records_uri(self) -> str:
        return self.records if self.records is not None else str(self.data.resolve() / "train.jsonl")

    @property
    def media_root_uri(self) -> str:
        """Where relative media paths point: --media-root, else the records file's directory."""
        if self.media_root is not None:
            return self.media_root if "://" in self.media_root else str(Path(self.media_root).resolve())
        return self.records_uri.rsplit("/", 1)[0] if "://" in self.records_uri else str(Path(self.records_uri).resolve().parent)

    @model_validator(mode="after")
    def _lora_adapts_the_llm(self):
        if self.lora_rank and "llm" not in self.train:
            raise ValueError("--lora-rank adapts the LLM: --train must include llm")
        return self
    frame_counts: tuple[int, ...] = Field((), description="e.g. 4,8,16,32: each step draws one of these frame counts "
                                          "(seeded by step) and takes batch-size x frames / count records, so a model "
                                          "trained on few frames also answers with the 16-56 that serving samples")

    video_prune_rates: tuple[float, ...] = Field((), description="e.g. 0,0.25,0.5,0.75: each video example is trained "
                                                 "with one of these shares of its video tokens pruned (drawn per "
                                                 "example), as a request with that video_pruning_rate is served")

    @field_validator("frame_counts", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return tuple(int(v) for v in value.split(",") if v.strip()) if isinstance(value, str) else value

    @field_validator("video_prune_rates", mode="before")
    @classmethod
    def _comma_separated_rates(cls, value):
        return tuple(float(v) for v in value.split(",") if v.strip()) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _rates_in_range(self):
        if any(not 0 <= rate < 1 for rate in self.video_prune_rates):
            raise ValueError(f"video prune rates must be in [0, 1), got {self.video_prune_rates}")
        if self.video_prune_rates and self.strategy == "fsdp":
            raise ValueError("--video-prune-rates runs the vision tower outside the model's forward, which FSDP's "
                             "sharded units do not allow yet: use --strategy ddp")
        return self

    @field_validator("frame_counts")
    @classmethod
    def _within_limits(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 1 <= n <= MAX_FRAMES for n in value):
            raise ValueError(f"frame counts must be 1-{MAX_FRAMES}, got {value}")
        return value

    def steps_of(self, records: int) -> list[tuple[int, int, int]]:
        """Each step's (epoch, first position in the epoch's order, records) under ``--epochs`` over ``records``
        records per worker: steps take ``step_shape``'s batch x ``--grad-accum`` records in order, the last of an epoch
        what is left; cut at ``--max-steps``."""
        steps: list[tuple[int, int, int]] = []
        for epoch in range(self.epochs or 0):
            position = 0
            while position < records and (self.max_steps is None or len(steps) < self.max_steps):
                take = min(self.step_shape(len(steps) + 1)[1] * self.grad_accum, records - position)
                steps.append((epoch, position, take))
                position += take
        return steps

    def step_shape(self, step: int) -> tuple[int, int]:
        """(frames, batch size) of a step: ``frames``/``batch_size``, or a seeded draw from ``frame_counts`` (the
        same on every worker, so DDP workers do equal work)."""
        if not self.frame_counts:
            return self.frames, self.batch_size
        import random

        count = random.Random(f"{self.seed}-{step}-frames").choice(self.frame_counts)
        return count, max(1, self.batch_size * self.frames // count)


def train_loop(config: dict) -> None:
    """Runs on each Ray Train worker: its shard of the records, sampled in seeded random batches."""
    import random

    from video_llava.data.record_files import BadRecordError, TrainingRecord
    from video_llava.model.families import family_of
    from video_llava.model.pruning import VideoPruning
    from video_llava.train.examples import (VIDEO_KEPT, ExampleMaker, answer_tokens, collate, conversation_example,
                                            pruned_example)
    from video_llava.train.pruned import pruned_video_inputs
    from video_llava.train.run import start_worker, worker_rows
    from video_llava.train.step import chunks

    cfg = SFTConfig.model_validate(config)
    run = start_worker(cfg, cfg.model, lora_rank=cfg.lora_rank)
    records = [TrainingRecord.from_row(row) for row in worker_rows()]
    make_example = ExampleMaker(run.processor, cfg.frames)
    unwrapped = run.model.module if hasattr(run.model, "module") else run.model
    per_frame = closing = 0
    if cfg.video_prune_rates:
        family = family_of(unwrapped.config)
        per_frame, closing = family.tokens_per_frame(run.processor), family.video_tokens(run.processor, 0)
    epochs = cfg.steps_of(len(records)) if cfg.epochs else None
    total = len(epochs) if epochs is not None else cfg.max_steps or 200

    def records_of(step: int, batch_size: int) -> list[dict]:
        """Under --epochs, the next records of the epoch's seeded order; else a seeded draw (a resumed run takes the
        same records as an uninterrupted one either way)."""
        if epochs is None:
            return random.Random(f"{cfg.seed}-{run.rank}-{step}").sample(
                records, min(batch_size * cfg.grad_accum, len(records)))
        epoch, position, take = epochs[step - 1]
        order = list(range(len(records)))
        random.Random(f"{cfg.seed}-{run.rank}-epoch-{epoch}").shuffle(order)
        return [records[k] for k in order[position:position + take]]

    unreadable: set[int] = set()  # records whose media failed (reported once)
    position = {r.index: k for k, r in enumerate(records)}  # where a record sits in this worker's list

    def example(record: TrainingRecord, frames: int, step: int) -> dict:
        """A record's example, every turn of its conversation trained on. A record whose media cannot be read fails
        the run naming it, or under --on-bad-record skip is reported and the next readable record of this worker's
        takes its place (the batch keeps its size, so every worker runs the same micro-batches). With
        --video-prune-rates, a video's tokens are pruned at a rate drawn for the record and step."""
        start = position[record.index]
        for k in range(len(records)):
            candidate = records[(start + k) % len(records)]
            if candidate.index in unreadable:
                continue
            try:
                media = make_example.record_media(candidate, frames)
            except Exception as e:  # whatever the decoder, PIL or S3 raised: this record's media are unreadable
                reason = f"record {candidate.index} (id {candidate.id!r}): its media could not be read: {e}"
                if cfg.on_bad_record == "fail":
                    raise BadRecordError(reason + " (--on-bad-record skip leaves such records out)") from e
                print(f"skipped {reason}", file=sys.stderr)
                unreadable.add(candidate.index)
                continue
            made = conversation_example(run.processor, candidate, media)
            if cfg.video_prune_rates and "pixel_values_videos" in made:
                rate = random.Random(f"{cfg.seed}-{step}-{candidate.index}-prune").choice(cfg.video_prune_rates)
                kept = VideoPruning(rate).kept(frames, per_frame) + closing
                made = pruned_example(made, run.processor.video_token_id, kept)
            return made
        raise BadRecordError("no record on this worker has readable media")

    def loss_of(batch: dict):
        batch = {k: v.to(run.device) for k, v in batch.items()}
        if VIDEO_KEPT in batch:
            batch = pruned_video_inputs(unwrapped, batch, run.processor.video_token_id, per_frame)
        return run.model(**batch).loss

    for step in range(run.start_step + 1, total + 1):
        frames, batch_size = cfg.step_shape(step)
        drawn = records_of(step, batch_size)
        parts = [collate([example(r, frames, step) for r in part], run.processor.tokenizer.pad_token_id)
                 for part in chunks(drawn, batch_size)]
        tokens = [answer_tokens(part) for part in parts]  # each micro-batch weighs as its share of answer tokens
        done = run.step(step, total, [(part, n / sum(tokens)) for part, n in zip(parts, tokens)], loss_of)
        metrics = {"step": step, "loss": done.loss, "frames": frames, "lr": done.lr, "grad_norm": done.grad_norm}
        if epochs is not None:
            metrics["epoch"] = epochs[step - 1][0] + 1
        if len(set(done.part_lrs.values())) > 1:  # parts at rates of their own
            metrics |= {f"lr/{part}": lr for part, lr in done.part_lrs.items()}
        run.end_step(metrics, save=step % cfg.checkpoint_every == 0 or step == total, total_steps=total,
                     samples=len(drawn))


def main(cfg: SFTConfig):
    import ray

    from video_llava.data.record_files import load_training_records

    if cfg.dry_run:
        from video_llava.train.memory_plan import plan_run

        print(plan_run(cfg, cfg.model, lora_rank=cfg.lora_rank).describe())
        return None
    if "://" not in cfg.records_uri and not Path(cfg.records_uri).is_file():
        hint = " (make one with python -m jobs.make_synthetic)" if cfg.data is not None else ""
        raise FileNotFoundError(f"no records file {cfg.records_uri}{hint}")
    report = cfg.output.resolve() / cfg.name / "bad_records.jsonl"
    records = load_training_records(cfg.records_uri, cfg.media_root_uri, cfg.on_bad_record, report=report)
    print(f"sft: {len(records)} records from {cfg.records_uri}, media under {cfg.media_root_uri}", file=sys.stderr)
    ensure_ray()
    result, final = fit(train_loop, cfg, datasets={"train": ray.data.from_items([r.to_row() for r in records])})
    print(f"sft: finished at step {result.metrics.get('step')} loss {result.metrics.get('loss'):.4f}; model in {final}")
    return result


def cli(argv: list[str] | None = None) -> int:
    return run_job(SFTConfig, main, "python -m jobs.sft", __doc__, argv, expected=(FileNotFoundError, BadRecordsError))


if __name__ == "__main__":
    sys.exit(cli())
