"""Evaluate a checkpoint on a held-out split: QA accuracy and the judge's mean reward (1-5), per question type.

    python -m jobs.eval --data data/synthetic --model runs/dpo/model [--split test] [--json-out eval.json]
    ray job submit --working-dir . -- python -m jobs.eval --data /shared/data --model /shared/runs/dpo/model

One greedy answer per question (Ray Data, an actor pool of model replicas), scored by the judge
(``--judge caption`` offline, or ``--judge openai --judge-url ...``). An answer is correct when the first
possible answer of its question type it names is the reference (so "red, not blue" counts as red); records
without a ``qa_type`` are correct when every word of the reference appears. ``--binding`` asks, for every clip
of two or more shapes, each shape's colour and each colour's shape, and breaks the figures down by the clip's
shape types (``by_shapes``: a model that cannot tell circles from squares fails only their clips). Accuracies come
with Wilson's 95% interval; ``correct_option_probability`` is the mean probability the model gives the right answer
among its question type's possible ones (each scored teacher-forced), with a 95% bootstrap interval: a figure that
moves before accuracy does.

``--task describe`` asks each synthetic clip for a detailed description and scores it against the clip's exact
specification, not a judge (``feedback.description``, CHAIR-style): ``hallucination_rate`` (the share of named
shapes, colours, counts and directions the clip lacks), ``recall`` (the share of the clip's it names),
``binding_error_rate`` (colour-shape pairs it lacks) and ``descriptions_with_hallucination``, each with a 95%
bootstrap interval. ``--baseline earlier.json`` (an earlier ``--json-out``) compares the two checkpoints on the same
questions: paired bootstrap intervals of each difference and, for questions, McNemar's exact test. Prints a table
and, last, one JSON line of the figures.

Published benchmarks, from the files their authors publish (``data.benchmarks``):

    python -m jobs.eval --benchmark videomme --bench-file videomme/test.parquet --media-root videomme/data --frames 32
    python -m jobs.eval --benchmark mmbench --bench-file MMBench_DEV_EN.tsv     # or MMBench_DEV_CN.tsv
    python -m jobs.eval --benchmark mmmu --bench-file MMMU/Art/validation.parquet [--format open --judge openai ...]
    python -m jobs.eval --benchmark mvbench --bench-file MVBench/json --media-root MVBench/video/star

``--format mc`` (the default) asks each multiple-choice item with its lettered options and reads the letter back as
lmms-eval does (``feedback.choices``); ``--format open`` asks the open items and scores them with the judge and the
reference's words. Accuracy per category (the file's task type, subject or category) with Wilson's 95% interval;
answers without a letter and rows whose media failed count as wrong, and are counted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from typing import Literal

from pydantic import Field, model_validator

from video_llava.data.benchmarks import BenchmarkName
from video_llava.feedback.description import DescriptionScore, describe_figures, score_description
from video_llava.feedback.intervals import mcnemar, paired_ratio_difference
from video_llava.feedback.judges import JudgeError, check_judge
from video_llava.feedback.pipeline import GenerationConfig, build_pipeline
from video_llava.feedback.scoring import binding_by_shapes, clips_all_right, is_correct, score
from video_llava.job_cli import absolute_paths, run_job
from video_llava.ray_runtime import ensure_ray


class NothingToAsk(ValueError):
    """The split has no question of the kind asked for."""


class EvalConfig(GenerationConfig):
    data: Path | None = Field(None, description="dataset directory with <split>.jsonl (--format synthetic)")
    format: Literal["synthetic", "mc", "open"] | None = Field(
        None, description="synthetic: the records of --data (the default without --benchmark); mc: a benchmark's "
        "multiple-choice items, read back by option letter (the default with --benchmark); open: its open-ended "
        "items, scored by the judge and by the reference's words")
    benchmark: BenchmarkName | None = Field(None, description="mmbench (MMBench, MMBench-CN), mmmu, videomme or "
                                            "mvbench: --bench-file in the shape the benchmark publishes")
    bench_file: Path | None = Field(None, description="the benchmark's .tsv/.parquet (MMBench, MMMU, Video-MME) or "
                                    "MVBench's task .json or directory of them")
    media_root: Path | None = Field(None, description="where the benchmark's videos (or image paths) are (default: "
                                    "beside --bench-file)")
    split: str = "test"
    json_out: Path | None = Field(None, description="also write the figures (and every answer) to this JSON file")
    binding: bool = Field(False, description="instead of each record's question, ask the colour of every shape and the "
                          "shape of every colour of clips with two or more shapes (make_synthetic records): whether the "
                          "model ties colours to the right shapes; adds the fraction of clips with every answer right")
    baseline: Path | None = Field(None, description="an earlier --json-out of the same split and task: the two "
                                  "checkpoints compared on the questions both answered (paired bootstrap intervals of "
                                  "the differences; McNemar's exact test for right/wrong answers)")

    @model_validator(mode="after")
    def _one_task(self):
        if self.binding and self.task != "qa":
            raise ValueError("--binding asks questions: it goes with --task qa")
        if self.benchmark is None:
            if self.data is None or self.format not in (None, "synthetic"):
                raise ValueError("give --data (the synthetic records), or --benchmark with --bench-file for "
                                 "--format mc|open")
        elif self.bench_file is None or self.format == "synthetic" or self.binding or self.task != "qa":
            raise ValueError("--benchmark takes --bench-file and --format mc or open (no --binding, --task qa)")
        return self


def main(cfg: EvalConfig) -> dict:
    if cfg.benchmark is not None:
        return benchmark_main(cfg)
    records = cfg.data / f"{cfg.split}.jsonl"
    if not records.is_file():
        raise FileNotFoundError(f"no {cfg.split}.jsonl in {cfg.data}")
    baseline = read_baseline(cfg.baseline, cfg.task) if cfg.baseline else None
    check_judge(cfg)
    cfg = absolute_paths(cfg)  # actors may run in other directories (or on other nodes)
    cfg = cfg.with_task_defaults()
    ensure_ray(cfg.num_cpus)
    rows = sorted(build_pipeline(cfg, records, samples=1, temperature=0.0, binding=cfg.binding,
                                 describe=cfg.task == "describe", option_probs=cfg.task == "qa").take_all(),
                  key=lambda r: r["id"])
    if not rows:
        why = {"describe": " (--task describe needs make_synthetic records, with shapes)",
               "binding": " (--binding needs make_synthetic records with two or more shapes)"}
        raise NothingToAsk(f"no questions to ask in {records}" + why.get("binding" if cfg.binding else cfg.task, ""))
    answers = [{k: r[k] for k in ("id", "question", "reference", "qa_type", "candidates", "scores", "reasons", "error",
                                  "spec", "correct_option_prob") if k in r} for r in rows]
    result = {"model": cfg.model, "split": cfg.split, "task": cfg.task, "judge": cfg.judge, "frames": cfg.frames,
              "video_pruning_rate": cfg.video_pruning_rate}
    if cfg.task == "describe":
        result |= describe_result(answers)
    else:
        result |= qa_result(rows, cfg.binding)
    if baseline is not None:
        result["paired"] = {"baseline": str(cfg.baseline), **compare(answers, baseline, cfg.task)}
        print_paired(result["paired"])
    return finish(cfg, result, answers)


def finish(cfg: EvalConfig, result: dict, answers: list[dict]) -> dict:
    """--json-out (the figures and every answer) and the figures as the last line."""
    if cfg.json_out:
        cfg.json_out.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_out.write_text(json.dumps({**result, "answers": answers}, indent=1, default=list))
    print(json.dumps(result))
    return result


def benchmark_main(cfg: EvalConfig) -> dict:
    """A published benchmark's items of the asked format answered greedily; multiple choice read back by letter
    (``feedback.choices``), open answers judged; accuracy per category with 95% intervals."""
    from video_llava.data.benchmarks import BenchmarkItem, read_benchmark
    from video_llava.feedback.choices import choice_figures, extract_letter

    fmt = cfg.format or "mc"
    items = read_benchmark(cfg.benchmark, cfg.bench_file, cfg.media_root)
    asked = [item for item in items if item.format == fmt]
    if not asked:
        raise NothingToAsk(f"no {fmt} items in {cfg.bench_file} (all {len(items)} are of the other format)")
    task = f"{cfg.benchmark}-{fmt}"
    baseline = read_baseline(cfg.baseline, task) if cfg.baseline else None
    if fmt == "open":
        check_judge(cfg)
    cfg = absolute_paths(cfg)
    ensure_ray(cfg.num_cpus)
    rows = sorted(build_pipeline(cfg, None, samples=1, temperature=0.0, rows=[i.to_row() for i in asked],
                                 judge=fmt == "open").take_all(), key=lambda r: r["id"])
    answers = []
    for row in rows:
        item = BenchmarkItem.from_row(row)
        answer = {"id": item.id, "question": row["question"], "reference": item.answer, "qa_type": item.category,
                  "candidates": list(row["candidates"]), "error": row["error"], **item.extra}
        if fmt == "mc":
            answer["said"] = extract_letter(row["candidates"][0], item.options) if row["candidates"] else ""
            answer["right"] = answer["said"] == item.answer
        else:
            answer |= {"scores": list(row["scores"]), "reasons": list(row["reasons"])}
            answer["right"] = bool(row["candidates"]) and is_correct(row["candidates"][0], item.answer, "")
        answers.append(answer)
    figures = choice_figures(rows) if fmt == "mc" else score(rows)
    print(f"{cfg.benchmark} ({fmt}): {len(asked)} items" + (f", {len(items) - len(asked)} of the other format left out"
                                                             if len(asked) < len(items) else ""))
    print(f"{'category':<28} {'n':>5} {'accuracy':>9} {'95% interval':>15} {'no letter' if fmt == 'mc' else 'reward':>9}")
    for name, f in figures.items():
        interval = "{:.3f}-{:.3f}".format(*f["accuracy_interval"]) if f.get("accuracy_interval") else "-"
        last = f["unparsed"] if fmt == "mc" else (f["mean_reward"] if f["mean_reward"] is not None else "-")
        print(f"{name[:28]:<28} {f['n']:>5} {f['accuracy']:>9} {interval:>15} {last:>9}")
    result = {"model": cfg.model, "task": task, "benchmark": cfg.benchmark, "format": fmt,
              "file": str(cfg.bench_file), "frames": cfg.frames, "video_pruning_rate": cfg.video_pruning_rate,
              "left_out": len(items) - len(asked), **figures}
    if baseline is not None:
        result["paired"] = {"baseline": str(cfg.baseline), **compare(answers, baseline, task)}
        print_paired(result["paired"])
    return finish(cfg, result, answers)


def qa_result(rows: list[dict], binding: bool) -> dict:
    """Accuracy (95% interval) and judge reward per question type, printed as a table; ``binding``'s figures."""
    figures = score(rows)
    by_shapes = {}
    if binding:
        figures["clips_all_right"] = clips_all_right(rows)
        by_shapes = binding_by_shapes(rows)
    print(f"{'type':<10} {'n':>5} {'accuracy':>9} {'95% interval':>15} {'reward':>7} {'p(right option)':>16}")
    for name, f in figures.items():
        interval = "-" if not f.get("accuracy_interval") else "{:.3f}-{:.3f}".format(*f["accuracy_interval"])
        reward = f["mean_reward"] if f["mean_reward"] is not None else "-"
        option = f.get("correct_option_probability", {}).get("value")
        print(f"{name:<10} {f['n']:>5} {f['accuracy']:>9} {interval:>15} {reward:>7} "
              f"{option if option is not None else '-':>16}")
    for shapes, group in by_shapes.items():
        print(f"{shapes}: " + ", ".join(f"{name} {f['accuracy']} (n={f['n']})" for name, f in group.items()))
    return {**figures, "by_shapes": by_shapes} if by_shapes else figures


def description_scores(answers: list[dict]) -> dict[str, DescriptionScore]:
    """Each answered description's score against its clip's specification, by id."""
    return {a["id"]: score_description(a["candidates"][0], json.loads(a["spec"])) for a in answers
            if not a["error"] and a["candidates"]}


def describe_result(answers: list[dict]) -> dict:
    """The description figures (``feedback.description``) and the judge's mean reward, printed."""
    scores = description_scores(answers)
    figures = {**describe_figures(list(scores.values())), "errors": sum(1 for a in answers if a["error"])}
    rewards = [a["scores"][0] for a in answers if not a["error"] and a["scores"]]
    figures["mean_reward"] = round(sum(rewards) / len(rewards), 4) if rewards else None
    for name in ("hallucination_rate", "recall", "binding_error_rate", "descriptions_with_hallucination"):
        f = figures[name]
        print(f"{name:<32} {f['value']} (95% {f['low']}-{f['high']})" if f["value"] is not None else f"{name:<32} -")
    return figures


def read_baseline(path: Path, task: str) -> list[dict]:
    """The answers of an earlier ``--json-out``; ``ValueError`` when it is not one of the same task."""
    if not path.is_file():
        raise FileNotFoundError(f"no baseline file {path} (an earlier jobs.eval --json-out)")
    earlier = json.loads(path.read_text())
    if "answers" not in earlier or earlier.get("task", "qa") != task:
        raise ValueError(f"{path} is not a --json-out of jobs.eval --task {task}")
    return earlier["answers"]


def compare(answers: list[dict], baseline: list[dict], task: str) -> dict:
    """This checkpoint (a) against the baseline (b) on the questions both answered (same id and question)."""
    earlier = {(a["id"], a["question"]): a for a in baseline if not a["error"] and a["candidates"]}
    shared = [(a, earlier[(a["id"], a["question"])]) for a in answers
              if not a["error"] and a["candidates"] and (a["id"], a["question"]) in earlier]
    if not shared:
        raise NothingToAsk("the baseline answered none of these questions (another split or dataset?)")
    out: dict = {"n": len(shared)}
    if task == "describe":
        mine = description_scores([a for a, _ in shared])
        theirs = description_scores([b for _, b in shared])
        ids = list(mine)
        for name, num, den in (("hallucination_rate", "hallucinated", "named"), ("recall", "recalled", "facts"),
                               ("binding_error_rate", "wrong_pairs", "pairs")):
            out[f"{name}_difference"] = paired_ratio_difference(
                [getattr(mine[i], num) for i in ids], [getattr(mine[i], den) for i in ids],
                [getattr(theirs[i], num) for i in ids], [getattr(theirs[i], den) for i in ids])
        return out
    right_a = [right(a) for a, _ in shared]
    right_b = [right(b) for _, b in shared]
    out["accuracy_difference"] = paired_ratio_difference(right_a, [1] * len(shared), right_b, [1] * len(shared))
    out["mcnemar"] = mcnemar(right_a, right_b)
    return out


def right(answer: dict) -> bool:
    """Whether an answer of a --json-out is right: as scored then (benchmarks: the letter), else by ``is_correct``."""
    if "right" in answer:
        return bool(answer["right"])
    return is_correct(answer["candidates"][0], answer["reference"], answer["qa_type"])


def print_paired(paired: dict) -> None:
    print(f"against {paired['baseline']} on {paired['n']} shared questions (this minus baseline):")
    for name, f in paired.items():
        if name.endswith("_difference"):
            print(f"  {name:<32} {f['value']} (95% {f['low']}-{f['high']})" + (" *" if f["excludes_zero"] else ""))
    if "mcnemar" in paired:
        m = paired["mcnemar"]
        print(f"  McNemar: right here only {m['a_only']}, in the baseline only {m['b_only']}, p = {m['p_value']}")


def cli(argv: list[str] | None = None) -> int:
    return run_job(EvalConfig, main, "python -m jobs.eval", __doc__, argv, expected=(FileNotFoundError, ValueError, JudgeError))


if __name__ == "__main__":
    sys.exit(cli())
