"""Caption every video under an S3 prefix (or a local directory) with Ray Data; resumable, nothing lost.

    python -m jobs.caption --input s3://bucket/videos/ --output s3://bucket/captions/ [--config caption.yaml] [--frames 32]
        [--prompt "Describe the video in detail."] [--model embedded] [--endpoint-url http://127.0.0.1:9000]
        [--batch-size 4] [--concurrency 1] [--decode-workers 1] [--num-gpus 0]
    ray job submit --working-dir . -- python -m jobs.caption --input s3://... --output s3://...

Pipeline (Ray Data streaming executor): list objects (boto3, recursive, video extensions) -> skip those whose
(key, ETag) already has a row in the output -> decode + sample frames in an actor pool of CPU decoders
(isolated, time-limited) -> caption in an actor pool of model replicas -> Parquet shards under
``<output>/shards/`` -> ``<output>/_manifest.json`` with counts and throughput.

Exactly once: a rerun reads every readable shard and skips (key, ETag) pairs already present, so a job killed
part-way (even with SIGKILL) and rerun captions each remaining object once. A shard half-written at the kill
is unreadable Parquet (no footer) and is ignored, so its objects are redone; if a worker finished a shard
after its driver died, the same (key, ETag) may appear twice on disk, and ``final_view`` keeps one row per
pair (an ``ok`` row over an ``error`` row, then the newest). Reading the output through ``final_view`` (or
``python -m jobs.caption --output ... --show``) therefore gives every input exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from video_llava.job_cli import add_config_flags, config_from_flags
from video_llava.storage import (
    Location,
    StorageError,
    is_video_key,
    list_objects,
    pyarrow_filesystem,
)

DEFAULT_PROMPT = "Describe the video in detail."


class CaptionConfig(BaseModel):
    """Validated once at the start; never mutated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: str = Field(..., description="s3://bucket/prefix/ or a local directory")
    output: str = Field(..., description="s3://bucket/prefix/ or a local directory")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto)")
    model: str = "embedded"
    frames: int = Field(32, ge=1, le=56)
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = Field(64, ge=1, le=1024)
    batch_size: int = Field(4, ge=1, description="videos per generate call")
    concurrency: int = Field(1, ge=1, description="model replicas (actors)")
    num_gpus: float = Field(0, ge=0, description="GPUs per model replica")
    decode_workers: int = Field(1, ge=1, description="decoder actors (1 CPU each)")
    decode_timeout_s: float = Field(120, gt=0)
    decode_resource: str | None = Field(None, description="custom resource each decoder actor takes one unit of "
                                        "(cluster.yaml's CPU nodes advertise 'decode'); keeps decoding off GPU nodes")
    model_resource: str | None = Field(None, description="custom resource each model actor takes one unit of "
                                       "(cluster.yaml's GPU nodes advertise 'model'); --num-gpus places them too")
    retry_errors: bool = Field(False, description="caption again objects whose earlier row is an error")
    num_cpus: int | None = Field(None, description="CPUs of a local Ray started by this job (ignored on a cluster)")


def _shards_dir(output: Location) -> str:
    return output.join("shards")


def read_output(cfg_output: str, endpoint_url: str | None):
    """All readable rows of earlier runs as a pyarrow Table (unreadable, half-written shards are skipped)."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    output = Location.parse(cfg_output)
    fs = pyarrow_filesystem(output, endpoint_url)
    try:
        infos = fs.get_file_info(pafs.FileSelector(_shards_dir(output), allow_not_found=True, recursive=True))
    except OSError as exc:
        raise StorageError(f"cannot read the output location {cfg_output}: {exc}") from exc
    tables = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
            continue
        try:
            tables.append(pq.read_table(info.path, filesystem=fs))
        except (OSError, pa.ArrowInvalid):
            continue  # a shard cut short by a kill: its objects are not counted as done, so they are redone
    return pa.concat_tables(tables, promote_options="default") if tables else None


def final_view(cfg_output: str, endpoint_url: str | None = None) -> list[dict]:
    """One row per (key, ETag): ``ok`` preferred over ``error``, then the newest."""
    table = read_output(cfg_output, endpoint_url)
    if table is None:
        return []
    best: dict[tuple[str, str], dict] = {}
    for row in table.to_pylist():
        pair = (row["key"], row["etag"])
        rank = (row["status"] == "ok", row["captioned_at"])
        if pair not in best or rank > (best[pair]["status"] == "ok", best[pair]["captioned_at"]):
            best[pair] = row
    return sorted(best.values(), key=lambda r: r["key"])


def _setup_inputs(cfg: CaptionConfig) -> tuple[list[dict], dict]:
    """Objects still to caption, and listing counts. Fails fast on a bad bucket, prefix or credentials."""
    location = Location.parse(cfg.input)
    objects = list(list_objects(location, cfg.endpoint_url))
    videos = [o for o in objects if is_video_key(o.key)]
    if not videos:
        raise StorageError(
            f"no video objects under {cfg.input} ({len(objects)} objects listed; extensions looked for: mp4, mov, "
            "avi, webm, mkv, ...)"
        )
    done = {(r["key"], r["etag"]) for r in final_view(cfg.output, cfg.endpoint_url)
            if r["status"] == "ok" or not cfg.retry_errors}
    todo = [{"key": o.key, "size": o.size, "etag": o.etag} for o in videos if (o.key, o.etag) not in done]
    counts = {"objects_listed": len(objects), "video_objects": len(videos), "skipped_non_video": len(objects) - len(videos),
              "already_done": len(videos) - len(todo), "to_caption": len(todo)}
    return todo, counts


def _build_pipeline(cfg: CaptionConfig, todo: list[dict]):
    import ray

    from video_llava.captioning import CaptionPredictor, DecodeStep

    settings = {"model": cfg.model, "num_frames": min(cfg.frames, 56), "max_frames": 56, "max_new_tokens": cfg.max_new_tokens}
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo), 4 * cfg.decode_workers * cfg.batch_size)))
    ds = ds.map_batches(
        DecodeStep,
        fn_constructor_kwargs={"input_uri": cfg.input, "num_frames": cfg.frames, "endpoint_url": cfg.endpoint_url,
                               "timeout_s": cfg.decode_timeout_s},
        batch_size=cfg.batch_size,
        concurrency=cfg.decode_workers,
        num_cpus=1,
        resources={cfg.decode_resource: 1} if cfg.decode_resource else None,
    )
    return ds.map_batches(
        CaptionPredictor,
        fn_constructor_kwargs={"settings": settings, "prompt": cfg.prompt},
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        num_gpus=cfg.num_gpus,
        num_cpus=0 if cfg.num_gpus else 1,
        resources={cfg.model_resource: 1} if cfg.model_resource else None,
    )


def _write_manifest(cfg: CaptionConfig, manifest: dict) -> None:
    output = Location.parse(cfg.output)
    fs = pyarrow_filesystem(output, cfg.endpoint_url)
    if output.scheme == "file":
        os.makedirs(output.prefix, exist_ok=True)
    with fs.open_output_stream(output.join("_manifest.json")) as stream:
        stream.write(json.dumps(manifest, indent=2).encode())


def main(cfg: CaptionConfig) -> dict:
    import ray

    start = time.perf_counter()
    todo, counts = _setup_inputs(cfg)
    print(f"caption: {counts['video_objects']} videos under {cfg.input} ({counts['already_done']} already done, "
          f"{counts['to_caption']} to caption, {counts['skipped_non_video']} non-video objects skipped)", flush=True)
    if todo:
        if not ray.is_initialized():
            ray.init(num_cpus=cfg.num_cpus if not os.environ.get("RAY_ADDRESS") else None)
        output = Location.parse(cfg.output)
        _build_pipeline(cfg, todo).write_parquet(_shards_dir(output), filesystem=pyarrow_filesystem(output, cfg.endpoint_url))
    wall = time.perf_counter() - start
    rows = final_view(cfg.output, cfg.endpoint_url)
    listed = {(r["key"], r["etag"]) for r in rows}
    wanted = {(o["key"], o["etag"]) for o in todo}
    manifest = {
        "input": cfg.input,
        "output": cfg.output,
        "model": cfg.model,
        "prompt": cfg.prompt,
        "frames": cfg.frames,
        **counts,
        "captioned_this_run": len(wanted & listed),
        "missing": len(wanted - listed),
        "rows": len(rows),
        "ok": sum(r["status"] == "ok" for r in rows),
        "error": sum(r["status"] == "error" for r in rows),
        "wall_s": round(wall, 2),
        "videos_per_s": round(len(todo) / wall, 3) if todo else 0.0,
        "finished_at": time.time(),
    }
    _write_manifest(cfg, manifest)
    print(f"caption: done in {manifest['wall_s']} s: {manifest['captioned_this_run']} captioned this run "
          f"({manifest['videos_per_s']} videos/s); output has {manifest['rows']} rows, {manifest['ok']} ok, "
          f"{manifest['error']} errors, {manifest['missing']} missing", flush=True)
    return manifest


def _parse(argv: list[str] | None) -> tuple[CaptionConfig, bool]:
    parser = argparse.ArgumentParser(prog="python -m jobs.caption", description=__doc__.splitlines()[0])
    parser.add_argument("--show", action="store_true", help="print the final view of --output as JSON lines and exit")
    parser.add_argument("--config", default=None, help="YAML file of these options; command-line flags override it")
    add_config_flags(parser, CaptionConfig, required=False)  # --input/--output may come from --config
    args = vars(parser.parse_args(argv))
    show = args.pop("show")
    config_path = args.pop("config")
    base: dict[str, Any] = {}
    if config_path:
        import yaml

        with open(config_path) as f:
            base = {k.replace("-", "_"): v for k, v in (yaml.safe_load(f) or {}).items()}
    if show and not args["input"]:
        args["input"] = "-"  # --show reads only --output
    return config_from_flags(CaptionConfig, args, base), show


def cli(argv: list[str] | None = None) -> int:
    try:
        cfg, show = _parse(argv)
    except ValueError as exc:
        print(f"error: invalid arguments: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    try:
        if show:
            for row in final_view(cfg.output, cfg.endpoint_url):
                print(json.dumps(row))
            return 0
        manifest = main(cfg)
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if manifest["missing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(cli())
