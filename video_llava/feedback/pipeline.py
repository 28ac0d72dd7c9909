"""The AI-feedback pipeline shared by ``jobs.make_preferences`` and ``jobs.eval``: records -> sampled answers ->
judged rows (Ray Data), its typed config, the binding questions of ``eval --binding``, and reading the output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from video_llava.data.records import flatten_record
from video_llava.feedback.judges import JudgeConfig
from video_llava.model.settings import MAX_FRAMES


class GenerationConfig(JudgeConfig):
    """What both AI-feedback jobs need: records, the model that answers, the judge, and the pools."""

    data: Path = Field(..., description="dataset directory with <split>.jsonl (LLaVA-style records with a caption)")
    model: str = Field("embedded", description="the model that answers: a checkpoint directory (e.g. runs/sft/model)")
    frames: int = Field(8, ge=1, le=MAX_FRAMES)
    video_pruning_rate: float = Field(0.0, ge=0.0, lt=1.0, description="share of each video's tokens dropped before "
                                      "the LLM (model.pruning)")
    max_new_tokens: int = Field(16, ge=1, le=512)
    limit: int | None = Field(None, ge=1, description="use only the first N records")
    batch_size: int = Field(4, ge=1)
    concurrency: int = Field(1, ge=1, description="model replicas (actors)")
    batches_in_flight: int = Field(
        2, ge=1, le=16, description="Ray Data batches each model actor answers at once, in threads of its own: their "
        "rows share the actor's running decode batch, so one batch's longest answer does not hold up the next")
    num_gpus: float = Field(0, ge=0, description="GPUs per model replica")
    judge_concurrency: int = Field(1, ge=1, description="judge actors (raise for a remote endpoint)")
    seed: int = 0
    num_cpus: int | None = Field(None, description="CPUs of a local Ray started by this job (ignored on a cluster)")
    task: Literal["qa", "describe"] = Field("qa", description="qa: each record's question; describe: a detailed "
                                            "description of each make_synthetic clip, scored against the clip's "
                                            "specification (--max-new-tokens 64 unless given)")

    @model_validator(mode="after")
    def _spec_judges_descriptions(self):
        if self.judge == "spec" and self.task != "describe":
            raise ValueError("--judge spec scores descriptions: it goes with --task describe")
        return self

    def with_task_defaults(self, judge: str | None = None) -> "GenerationConfig":
        """For ``--task describe``: 64 new tokens (a description of three shapes is about 30) and ``judge`` unless
        the flags named others."""
        if self.task != "describe":
            return self
        update: dict[str, Any] = {}
        if "max_new_tokens" not in self.model_fields_set:
            update["max_new_tokens"] = 64
        if judge and "judge" not in self.model_fields_set:
            update["judge"] = judge
        return self.model_copy(update=update)


def binding_rows(record: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """Rows that test colour-to-shape binding on a synthetic record (one with a ``shapes`` list) of two or more
    shapes: the colour of every shape and the shape of every colour, each asked on its own, with the clip's shape
    types in ``clip_shapes`` (e.g. ``circle+square``). Fewer than two shapes (or no ``shapes``, as in non-synthetic
    data) gives no rows: one shape's colour needs no binding."""
    from video_llava.data.synthetic_qa import ClipSpec, question_about
    from video_llava.data.synthetic_video import MovingShape

    described = record.get("shapes") or []
    if len(described) < 2:
        return []
    spec = ClipSpec(tuple(MovingShape(s["shape"], s["color"], s["direction"]) for s in described))
    base = {**flatten_record(record, root), "clip_shapes": "+".join(sorted(s.shape for s in spec.shapes))}
    rows = []
    for target in spec.shapes:
        for qa_type in ("color", "shape"):
            question, answer = question_about(spec, target, qa_type)
            key = target.shape if qa_type == "color" else target.color
            rows.append({**base, "id": f"{base['id']}/{qa_type}-{key}", "question": question, "reference": answer,
                         "qa_type": qa_type})
    return rows


def describe_rows(record: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """The row that asks a synthetic record's clip for a detailed description (``DESCRIBE``), its caption the
    reference and its ``shapes`` (as JSON in ``spec``) what the description is scored against; none for a record
    without ``shapes`` (not make_synthetic's)."""
    from video_llava.data.synthetic_qa import CAPTION, DESCRIBE

    if not record.get("shapes"):
        return []
    base = flatten_record(record, root)
    return [{**base, "question": DESCRIBE, "reference": base["caption"], "qa_type": CAPTION,
             "spec": json.dumps([{k: s[k] for k in ("shape", "color", "direction")} for s in record["shapes"]])}]


def build_pipeline(cfg: GenerationConfig, records_path: Path | None, samples: int, temperature: float,
                   top_p: float = 1.0, min_margin: int = 1, binding: bool = False, describe: bool = False,
                   option_probs: bool = False, rows: list[dict[str, Any]] | None = None, judge: bool = True):
    """records -> sampled answers -> judged rows, as a lazy Ray Dataset. ``jobs.eval`` asks one greedy answer per
    question; ``binding``: the questions of ``binding_rows`` instead of each record's first; ``describe``: a
    detailed description of each clip (``describe_rows``); ``option_probs``: each closed-set question's probability
    of the right answer among the possible ones (``correct_option_prob``). ``rows``: flat rows to answer instead of
    records (a benchmark's items); ``judge=False`` leaves the answers unjudged (multiple choice is read by letter)."""
    import ray

    from video_llava.feedback.steps import AnswerSampler, JudgeStep
    from video_llava.ray_runtime import model_actor_pool, require_resources

    require_resources({"CPU": 0 if cfg.num_gpus else 1, "GPU": cfg.num_gpus}, f"--num-gpus {cfg.num_gpus:g}")

    if rows is not None:  # already the flat rows the sampler takes
        ds = ray.data.from_items(rows[:cfg.limit] if cfg.limit else rows)
    else:
        ds = ray.data.read_json(str(records_path))
        if cfg.limit:
            ds = ds.limit(cfg.limit)
        if binding or describe:
            ds = ds.flat_map(binding_rows if binding else describe_rows, fn_kwargs={"root": cfg.data.resolve()},
                             num_cpus=0.25)
        else:
            ds = ds.map(flatten_record, fn_kwargs={"root": cfg.data.resolve()}, num_cpus=0.25)
    settings = {"model": cfg.model, "num_frames": cfg.frames, "max_frames": MAX_FRAMES, "max_new_tokens": cfg.max_new_tokens,
                "video_pruning_rate": cfg.video_pruning_rate}
    ds = ds.map_batches(
        AnswerSampler,
        fn_constructor_kwargs=dict(settings=settings, samples=samples,
                                   temperature=temperature, top_p=top_p, max_new_tokens=cfg.max_new_tokens,
                                   frames=cfg.frames, seed=cfg.seed, batches_in_flight=cfg.batches_in_flight,
                                   option_probs=option_probs),
        batch_size=cfg.batch_size,
        compute=model_actor_pool(cfg.concurrency, cfg.batches_in_flight),
        num_gpus=cfg.num_gpus,
        num_cpus=0 if cfg.num_gpus else 1,
    )
    if not judge:
        return ds
    judge_config = JudgeConfig.model_validate(cfg.model_dump(include=set(JudgeConfig.model_fields))).model_dump()
    return ds.map_batches(JudgeStep, fn_constructor_kwargs=dict(judge_config=judge_config, min_margin=min_margin),
                          batch_size=cfg.batch_size, concurrency=cfg.judge_concurrency, num_cpus=0)  # waits on I/O or does string work


def read_preferences(output: Path) -> list[dict]:
    """Every row ``jobs.make_preferences`` wrote to ``output`` (all statuses), sorted by id."""
    rows = []
    for shard in sorted((output / "shards").glob("*.json")):
        rows += [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["id"])


def summarize(rows: list[dict]) -> dict:
    """Counts of a preferences output: pairs, ties, errors, the score histogram and the mean margin."""
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
