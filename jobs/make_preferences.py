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

``--task describe`` asks each make_synthetic clip for a detailed description instead (64 new tokens unless given)
and judges the samples against the clip's exact specification (``--judge spec``, the default there; see
``feedback.judges.SpecJudge``): a pair sets a faithful description (nothing the clip lacks) against one that names
what the clip does not hold, the feedback LLaVA-Hound's DPO gained from. The rows keep the specification (``spec``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from pydantic import Field

from video_llava.feedback.judges import JudgeError, check_judge
from video_llava.feedback.pipeline import GenerationConfig, build_pipeline, read_preferences, summarize
from video_llava.job_cli import absolute_paths, run_job
from video_llava.ray_runtime import ensure_ray


class PreferenceConfig(GenerationConfig):
    output: Path = Field(..., description="directory for shards/ and summary.json")
    split: str = "train"
    samples: int = Field(4, ge=2, le=32, description="answers sampled per question")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    min_margin: int = Field(1, ge=1, le=4, description="best score minus worst score needed for a pair")
    overwrite: bool = Field(False, description="replace an existing output")


def main(cfg: PreferenceConfig) -> dict:
    records = cfg.data / f"{cfg.split}.jsonl"
    if not records.is_file():
        raise FileNotFoundError(f"no {cfg.split}.jsonl in {cfg.data} (make one with python -m jobs.make_synthetic)")
    check_judge(cfg)  # before any sampling (a missing key would make every record an error row) or overwriting
    shards = cfg.output / "shards"
    if shards.exists():
        if not cfg.overwrite:
            raise FileExistsError(f"{shards} exists; pass --overwrite to replace it")
        shutil.rmtree(shards)
    start = time.perf_counter()
    cfg = absolute_paths(cfg).with_task_defaults(judge="spec")  # actors may run in other directories (or nodes)
    ensure_ray(cfg.num_cpus)
    print(f"make_preferences: {cfg.samples} samples per question from {cfg.model}, task={cfg.task}, "
          f"judge={cfg.judge}", flush=True)
    build_pipeline(cfg, records, cfg.samples, cfg.temperature, cfg.top_p, cfg.min_margin,
                   describe=cfg.task == "describe").write_json(str(shards.resolve()))
    rows = read_preferences(cfg.output)
    summary = {**summarize(rows), "model": cfg.model, "task": cfg.task, "judge": cfg.judge, "samples": cfg.samples,
               "temperature": cfg.temperature, "top_p": cfg.top_p, "min_margin": cfg.min_margin,
               "wall_s": round(time.perf_counter() - start, 2)}
    (cfg.output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"make_preferences: {summary['pairs']} pairs from {summary['records']} questions "
          f"({summary['no_pair']} without a margin, {summary['errors']} errors); mean judge score "
          f"{summary['mean_score']}; written to {cfg.output}", flush=True)
    return summary


def cli(argv: list[str] | None = None) -> int:
    return run_job(PreferenceConfig, main, "python -m jobs.make_preferences", __doc__, argv, expected=(FileNotFoundError, FileExistsError, JudgeError))


if __name__ == "__main__":
    sys.exit(cli())
