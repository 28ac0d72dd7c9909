"""Evaluate a checkpoint on a held-out split: QA accuracy and the judge's mean reward (1-5), per question type.

    python -m jobs.eval --data data/synthetic --model runs/dpo/model [--split test] [--json-out eval.json]
    ray job submit --working-dir . -- python -m jobs.eval --data /shared/data --model /shared/runs/dpo/model

One greedy answer per question (Ray Data, an actor pool of model replicas), scored by the judge
(``--judge caption`` offline, or ``--judge openai --judge-url ...``). An answer is correct when the first
possible answer of its question type it names is the reference (so "red, not blue" counts as red); records
without a ``qa_type`` are correct when every word of the reference appears. ``--binding`` asks, for every clip
of two or more shapes, each shape's colour and each colour's shape, and breaks the figures down by the clip's
shape types (``by_shapes``: a model that cannot tell circles from squares fails only their clips). Prints a table
and, last, one JSON line of the figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import Field

from video_llava.feedback.judges import JudgeError, check_judge
from video_llava.feedback.pipeline import GenerationConfig, build_pipeline
from video_llava.feedback.scoring import binding_by_shapes, clips_all_right, score
from video_llava.job_cli import absolute_paths, run_job
from video_llava.ray_runtime import ensure_ray


class NothingToAsk(ValueError):
    """The split has no question of the kind asked for."""


class EvalConfig(GenerationConfig):
    split: str = "test"
    json_out: Path | None = Field(None, description="also write the figures (and every answer) to this JSON file")
    binding: bool = Field(False, description="instead of each record's question, ask the colour of every shape and the "
                          "shape of every colour of clips with two or more shapes (make_synthetic records): whether the "
                          "model ties colours to the right shapes; adds the fraction of clips with every answer right")


def main(cfg: EvalConfig) -> dict:
    records = cfg.data / f"{cfg.split}.jsonl"
    if not records.is_file():
        raise FileNotFoundError(f"no {cfg.split}.jsonl in {cfg.data}")
    check_judge(cfg)
    cfg = absolute_paths(cfg)  # actors may run in other directories (or on other nodes)
    ensure_ray(cfg.num_cpus)
    rows = sorted(build_pipeline(cfg, records, samples=1, temperature=0.0, binding=cfg.binding).take_all(),
                  key=lambda r: r["id"])
    if not rows:
        raise NothingToAsk(f"no questions to ask in {records}" + (" (--binding needs make_synthetic records with two or "
                                                                "more shapes)" if cfg.binding else ""))
    figures = score(rows)
    by_shapes = {}
    if cfg.binding:
        figures["clips_all_right"] = clips_all_right(rows)
        by_shapes = binding_by_shapes(rows)
    result = {"model": cfg.model, "split": cfg.split, "judge": cfg.judge, "frames": cfg.frames, **figures}
    if by_shapes:
        result["by_shapes"] = by_shapes
    print(f"{'type':<10} {'n':>5} {'accuracy':>9} {'reward':>7}")
    for name, f in figures.items():
        print(f"{name:<10} {f['n']:>5} {f['accuracy']:>9} {f['mean_reward'] if f['mean_reward'] is not None else '-':>7}")
    for shapes, group in by_shapes.items():
        print(f"{shapes}: " + ", ".join(f"{name} {f['accuracy']} (n={f['n']})" for name, f in group.items()))
    if cfg.json_out:
        answers = [{k: r[k] for k in ("id", "question", "reference", "qa_type", "candidates", "scores", "reasons", "error")}
                   for r in rows]
        cfg.json_out.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_out.write_text(json.dumps({**result, "answers": answers}, indent=1, default=list))
    print(json.dumps(result))
    return result


def cli(argv: list[str] | None = None) -> int:
    return run_job(EvalConfig, main, "python -m jobs.eval", __doc__, argv, expected=(FileNotFoundError, NothingToAsk, JudgeError))


if __name__ == "__main__":
    sys.exit(cli())
