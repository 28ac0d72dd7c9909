"""Write questions and short reference answers from each record's caption with an LLM: the hop from
``jobs.make_records`` to ``jobs.make_preferences`` in the captions-to-DPO loop (LLaVA-Hound's question generation).

    python -m jobs.make_questions --data data/real --output data/real-qa --llm-url https://api.openai.com/v1 \\
        --llm-model gpt-4o-mini [--questions 3] [--concurrency 4] [--splits train,val]
    python -m jobs.make_questions ... --llm-url http://127.0.0.1:8000/v1 --llm-model <a name this service serves>
    ray job submit --working-dir . -- python -m jobs.make_questions --data /shared/data/real --output /shared/data/real-qa ...

Any OpenAI-compatible endpoint writes them, this service included; the key is read from ``$OPENAI_API_KEY`` (or
``--llm-api-key-env``). The reply is asked as JSON of a schema (``response_format``; ``--plain-text`` for an
endpoint without structured output). Ray Data calls the endpoint from ``--concurrency`` writers. For each split,
``<output>/<split>.jsonl`` holds one record per question (``id`` ``<record id>/q<k>``, the record's medium and
caption, the question under a media placeholder and its answer) and ``<output>/<split>.errors.jsonl`` each record
that got none, with the reason; nothing is dropped silently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from video_llava.feedback.endpoint import EndpointError
from video_llava.job_cli import absolute_paths, run_job
from video_llava.ray_runtime import ensure_ray


class MakeQuestionsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    data: Path = Field(..., description="directory with <split>.jsonl records that have a caption (jobs.make_records)")
    output: Path = Field(..., description="directory for the question records, one <split>.jsonl per split")
    splits: str = Field("train,val", description="the splits to write questions for, comma-separated")
    llm_url: str = Field(..., description="base URL of the OpenAI-compatible endpoint, ending in /v1")
    llm_model: str = Field("gpt-4o-mini", description="model name sent to the endpoint")
    llm_api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the endpoint's key")
    questions: int = Field(3, ge=1, le=10, description="questions per caption")
    concurrency: int = Field(4, ge=1, description="writers calling the endpoint at once")
    timeout_s: float = Field(120.0, gt=0)
    plain_text: bool = Field(False, description="ask for free text instead of JSON of a schema")
    limit: int | None = Field(None, ge=1, description="only the first N records of each split")
    overwrite: bool = Field(False, description="replace existing output files")
    num_cpus: int | None = Field(None, description="CPUs of a local Ray started by this job (ignored on a cluster)")


def write_split(cfg: MakeQuestionsConfig, split: str) -> dict:
    """One split's question records and error rows; its counts."""
    import ray

    from video_llava.data.records import load_records
    from video_llava.feedback.questions import QuestionWriter

    records = load_records(cfg.data / f"{split}.jsonl")[:cfg.limit]
    rows = []
    if records:
        plain = [{k: json.dumps(v) if k == "conversations" else v for k, v in r.items()
                  if k in ("id", "video", "image", "caption", "conversations")} for r in records]
        rows = ray.data.from_items(plain).flat_map(
            QuestionWriter, fn_constructor_kwargs=dict(
                url=cfg.llm_url, model=cfg.llm_model, key_env=cfg.llm_api_key_env, count=cfg.questions,
                timeout_s=cfg.timeout_s, structured=not cfg.plain_text),
            concurrency=cfg.concurrency, num_cpus=0).take_all()  # the writers wait on the endpoint
    rows.sort(key=lambda r: r["id"])
    written = [r for r in rows if not r["error"]]
    errors = [r for r in rows if r["error"]]
    with open(cfg.output / f"{split}.jsonl", "w") as out:
        for r in written:
            record = {"id": r["id"], "source": r["source"], "caption": r["caption"],
                      "conversations": json.loads(r["conversations"])}
            record |= {k: r[k] for k in ("video", "image") if r[k]}
            out.write(json.dumps(record) + "\n")
    with open(cfg.output / f"{split}.errors.jsonl", "w") as out:
        for r in errors:
            out.write(json.dumps({"id": r["id"], "error": r["error"]}) + "\n")
    for r in errors[:10]:
        print(f"make_questions: {split} record {r['id']!r}: {r['error']}", file=sys.stderr)
    return {"records": len(records), "questions": len(written), "errors": len(errors)}


def main(cfg: MakeQuestionsConfig) -> dict:
    from video_llava.feedback.endpoint import check_endpoint

    splits = [s.strip() for s in cfg.splits.split(",") if s.strip()]
    missing = [s for s in splits if not (cfg.data / f"{s}.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"no {', '.join(s + '.jsonl' for s in missing)} in {cfg.data} (jobs.make_records writes them)")
    taken = [cfg.output / f"{s}.jsonl" for s in splits if (cfg.output / f"{s}.jsonl").exists()]
    if taken and not cfg.overwrite:
        raise FileExistsError(f"{taken[0]} exists; pass --overwrite to replace it")
    check_endpoint(cfg.llm_url, cfg.llm_api_key_env, "question writer", "--llm-api-key-env", cfg.timeout_s)
    cfg = absolute_paths(cfg)
    cfg.output.mkdir(parents=True, exist_ok=True)
    ensure_ray(cfg.num_cpus)
    summary = {"data": str(cfg.data), "llm": f"{cfg.llm_model} at {cfg.llm_url}"}
    for split in splits:
        summary[split] = write_split(cfg, split)
        print(f"make_questions: {split}: {summary[split]['questions']} questions from {summary[split]['records']} "
              f"records, {summary[split]['errors']} without (see {split}.errors.jsonl)", file=sys.stderr)
    print(json.dumps(summary))
    return summary


def cli(argv: list[str] | None = None) -> int:
    return run_job(MakeQuestionsConfig, main, "python -m jobs.make_questions", __doc__, argv,
                   expected=(FileNotFoundError, FileExistsError, EndpointError))


if __name__ == "__main__":
    sys.exit(cli())
