"""Turn a caption job's output into caption-bearing LLaVA records: the hop from ``jobs.caption`` to
``jobs.make_questions`` in the captions-to-DPO loop.

    python -m jobs.make_records --captions s3://bucket/captions/ --output data/real [--val-fraction 0.1]
    ray job submit --working-dir . -- python -m jobs.make_records --captions s3://bucket/captions/ --output /shared/data/real

Reads the caption output's final view (one row per object: ``jobs.caption --show``) and its manifest (where the
videos are), and writes ``<output>/train.jsonl`` and ``<output>/val.jsonl``: one record per captioned video or
image, its medium as a path or ``s3://`` URI, its caption as ``caption`` and as the answer to ``--prompt`` (so the
records also train detailed description). Which split a record goes to is a stable hash of its object key. Error
rows of the caption job are left out and counted; an output that exists is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from video_llava.data.storage import StorageError, is_image_key
from video_llava.job_cli import run_job


class MakeRecordsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    captions: str = Field(..., description="a jobs.caption --output: s3://bucket/prefix/ or a local directory")
    output: Path = Field(..., description="directory for train.jsonl and val.jsonl")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of the records held out as val.jsonl")
    prompt: str = Field("Describe the video in detail.", description="the question each caption answers")
    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, moto); AWS_ENDPOINT_URL works too")
    overwrite: bool = Field(False, description="replace existing train.jsonl/val.jsonl")


def media_uri(input_uri: str, key: str) -> str:
    """Where the caption job's object ``key`` is: ``s3://bucket/key`` (S3 keys are whole) or ``<input>/<key>``."""
    from video_llava.data.storage import Location

    location = Location.parse(input_uri)
    return f"s3://{location.bucket}/{key}" if location.scheme == "s3" else str(Path(location.prefix) / key)


def record_of(row: dict, input_uri: str, prompt: str) -> dict:
    """One ``ok`` caption row as a LLaVA record."""
    kind = "image" if is_image_key(row["key"]) else "video"
    return {"id": row["key"], kind: media_uri(input_uri, row["key"]), "caption": row["caption"],
            "conversations": [{"from": "human", "value": f"<{kind}>\n{prompt}"},
                              {"from": "gpt", "value": row["caption"]}]}


def main(cfg: MakeRecordsConfig) -> dict:
    from video_llava.batch.pipeline import final_view, read_manifest
    from video_llava.data.splits import held_out

    manifest = read_manifest(cfg.captions, cfg.endpoint_url)
    if manifest is None:
        raise FileNotFoundError(f"no _manifest.json under {cfg.captions}: run python -m jobs.caption --output there first")
    files = {split: cfg.output / f"{split}.jsonl" for split in ("train", "val")}
    if any(f.exists() for f in files.values()) and not cfg.overwrite:
        raise FileExistsError(f"{cfg.output} already has train.jsonl/val.jsonl; pass --overwrite to replace them")
    rows = final_view(cfg.captions, cfg.endpoint_url)
    ok = [r for r in rows if r["status"] == "ok" and r["caption"].strip()]
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for row in ok:
        splits["val" if held_out(row["key"], cfg.val_fraction) else "train"].append(
            record_of(row, manifest["input"], cfg.prompt))
    cfg.output.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        files[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"captions": cfg.captions, "input": manifest["input"], "rows": len(rows), "records": len(ok),
               "left_out": len(rows) - len(ok), "train": len(splits["train"]), "val": len(splits["val"])}
    print(f"make_records: {len(ok)} records ({summary['train']} train, {summary['val']} val) from {len(rows)} caption "
          f"rows of {cfg.captions}; {summary['left_out']} without a caption (errors) left out", file=sys.stderr)
    print(json.dumps(summary))
    return summary


def cli(argv: list[str] | None = None) -> int:
    return run_job(MakeRecordsConfig, main, "python -m jobs.make_records", __doc__, argv,
                   expected=(FileNotFoundError, FileExistsError, StorageError))


if __name__ == "__main__":
    sys.exit(cli())
