"""Make DPO preference pairs by AI feedback (LLaVA-Hound): sample answers, judge them, keep best vs worst.

    python -m jobs.make_preferences --data data/synthetic --model runs/sft/model --output data/prefs
        [--samples 4] [--temperature 1.0] [--top-p 0.95] [--min-margin 1] [--limit 1000]
        [--judge caption | --judge openai --judge-url https://api.openai.com/v1 --judge-model gpt-4o-mini]
    ray job submit --working-dir . -- python -m jobs.make_preferences --data /shared/data --model /shared/runs/sft/model ...

Pipeline (Ray Data): read ``<data>/<split>.jsonl`` -> an actor pool of model replicas samples ``--samples``
answers per question -> a pool of judges scores each answer 1-5 against the record's detailed caption, question
and reference answer -> JSON shards under ``<output>/shards/`` with every candidate, score and reason (for a
person to audit) and, where the best beats the worst by ``--min-margin``, ``chosen``/``rejected`` (status
``pair``) -> ``<output>/summary.json``. Rows whose video cannot be read or whose judge fails get status
``error`` and the reason; nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from pydantic import Field

from video_llava.job_cli import run_job
from video_llava.judges import JudgeConfig
from video_llava.train_run import absolute_paths


class GenerationConfig(JudgeConfig):
    """What both AI-feedback jobs need: records, the model that answers, the judge, and the pools."""

    data: Path = Field(..., description="dataset directory with <split>.jsonl (LLaVA-style records with a caption)")
    model: str = Field("embedded", description="the model that answers: a checkpoint directory (e.g. runs/sft/model)")
    frames: int = Field(8, ge=1, le=56)
    max_new_tokens: int = Field(16, ge=1, le=512)
    limit: int | None = Field(None, ge=1, description="use only the first N records")
    batch_size: int = Field(4, ge=1)
    concurrency: int = Field(1, ge=1, description="model replicas (actors)")
    num_gpus: float = Field(0, ge=0, description="GPUs per model replica")
    judge_concurrency: int = Field(1, ge=1, description="judge actors (raise for a remote endpoint)")
    seed: int = 0
    num_cpus: int | None = Field(None, description="CPUs of a local Ray started by this job (ignored on a cluster)")


class PreferenceConfig(GenerationConfig):
    output: Path = Field(..., description="directory for shards/ and summary.json")
    split: str = "train"
    samples: int = Field(4, ge=2, le=32, description="answers sampled per question")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    min_margin: int = Field(1, ge=1, le=4, description="best score minus worst score needed for a pair")
    overwrite: bool = Field(False, description="replace an existing output")


def read_preferences(output: Path) -> list[dict]:
    """Every row the job wrote (all statuses), sorted by id."""
    rows = []
    for shard in sorted((output / "shards").glob("*.json")):
        rows += [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["id"])


def build_pipeline(cfg: GenerationConfig, records_path: Path, samples: int, temperature: float, top_p: float = 1.0,
                   min_margin: int = 1, binding: bool = False):
    """records -> sampled answers -> (judged rows). Shared with ``jobs.eval`` (one greedy answer per question;
    ``binding``: the questions of ``feedback.binding_rows`` instead of each record's first)."""
    import ray

    from video_llava.feedback import (
        AnswerSampler,
        JudgeStep,
        binding_rows,
        flatten_record,
    )

    ds = ray.data.read_json(str(records_path))
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    if binding:
        ds = ds.flat_map(binding_rows, fn_kwargs={"root": cfg.data.resolve()}, num_cpus=0.25)
    else:
        ds = ds.map(flatten_record, fn_kwargs={"root": cfg.data.resolve()}, num_cpus=0.25)
    settings = {"model": cfg.model, "num_frames": cfg.frames, "max_frames": 56, "max_new_tokens": cfg.max_new_tokens}
    ds = ds.map_batches(
        AnswerSampler,
        fn_constructor_kwargs=dict(settings=settings, samples=samples,
                                   temperature=temperature, top_p=top_p, max_new_tokens=cfg.max_new_tokens,
                                   frames=cfg.frames, seed=cfg.seed),
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        num_gpus=cfg.num_gpus,
        num_cpus=0 if cfg.num_gpus else 1,
    )
    judge_config = JudgeConfig.model_validate(cfg.model_dump(include=set(JudgeConfig.model_fields))).model_dump()
    return ds.map_batches(JudgeStep, fn_constructor_kwargs=dict(judge_config=judge_config, min_margin=min_margin),
                          batch_size=cfg.batch_size, concurrency=cfg.judge_concurrency, num_cpus=0)  # waits on I/O or does string work


def summarize(rows: list[dict]) -> dict:
    scores = [s for r in rows for s in r.get("scores") or []]
    pairs = [r for r in rows if r["status"] == "pair"]
    return {
        "records": len(rows),
        "pairs": len(pairs),
        "no_pair": sum(r["status"] == "no_pair" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "candidates_judged": len(scores),
        "mean_score": round(sum(scores) / len(scores), 4) if scores else None,
        "score_histogram": {str(k): scores.count(k) for k in range(1, 6)},
        "mean_margin": round(sum(r["margin"] for r in pairs) / len(pairs), 4) if pairs else None,
    }


def main(cfg: PreferenceConfig) -> dict:
    import ray

    records = cfg.data / f"{cfg.split}.jsonl"
    if not records.is_file():
        raise FileNotFoundError(f"no {cfg.split}.jsonl in {cfg.data} (make one with python -m jobs.make_synthetic)")
    shards = cfg.output / "shards"
    if shards.exists():
        if not cfg.overwrite:
            raise FileExistsError(f"{shards} exists; pass --overwrite to replace it")
        shutil.rmtree(shards)
    start = time.perf_counter()
    cfg = absolute_paths(cfg)  # actors may run in other directories (or on other nodes)
    if not ray.is_initialized():
        ray.init(num_cpus=cfg.num_cpus if not os.environ.get("RAY_ADDRESS") else None)
    print(f"make_preferences: {cfg.samples} samples per question from {cfg.model}, judge={cfg.judge}", flush=True)
    build_pipeline(cfg, records, cfg.samples, cfg.temperature, cfg.top_p, cfg.min_margin).write_json(str(shards.resolve()))
    rows = read_preferences(cfg.output)
    summary = {**summarize(rows), "model": cfg.model, "judge": cfg.judge, "samples": cfg.samples,
               "temperature": cfg.temperature, "top_p": cfg.top_p, "min_margin": cfg.min_margin,
               "wall_s": round(time.perf_counter() - start, 2)}
    (cfg.output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"make_preferences: {summary['pairs']} pairs from {summary['records']} questions "
          f"({summary['no_pair']} without a margin, {summary['errors']} errors); mean judge score "
          f"{summary['mean_score']}; written to {cfg.output}", flush=True)
    return summary


def cli(argv: list[str] | None = None) -> int:
    return run_job(PreferenceConfig, main, "python -m jobs.make_preferences", __doc__, argv, expected=(FileNotFoundError, FileExistsError))


if __name__ == "__main__":
    sys.exit(cli())
