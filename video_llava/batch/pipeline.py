"""The caption pipeline (Ray Data) and its output: what is left to caption, the streaming pipeline of decoders
and model replicas, the manifest, and ``final_view``, the output read back as exactly one row per input.

Exactly once: a rerun reads every readable shard and skips (key, ETag) pairs already present, so a job killed
part-way (even with SIGKILL) and rerun captions each remaining object once. A shard half-written at the kill
is unreadable Parquet (no footer) and is ignored, so its objects are redone; if a worker finished a shard
after its driver died, the same (key, ETag) may appear twice on disk, and ``final_view`` keeps one row per
pair (an ``ok`` row over an ``error`` row, then the newest).
"""

from __future__ import annotations

import json
import os
import time

from pydantic import BaseModel, ConfigDict, Field

from video_llava.data.storage import (
    Location,
    StorageError,
    is_image_key,
    is_video_key,
    list_objects,
    pyarrow_filesystem,
)
from video_llava.model.settings import DEFAULT_FRAMES, MAX_FRAMES
from video_llava.ray_runtime import ensure_ray, require_resources

DEFAULT_PROMPT = "Describe the video in detail."


class CaptionConfig(BaseModel):
    """Validated once at the start; never mutated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: str = Field(..., description="s3://bucket/prefix/ or a local directory")
    output: str = Field(..., description="s3://bucket/prefix/ or a local directory")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto)")
    model: str = "embedded"
    frames: int = Field(DEFAULT_FRAMES, ge=1, le=MAX_FRAMES)
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = Field(64, ge=1, le=1024)
    video_pruning_rate: float = Field(0.0, ge=0.0, lt=1.0, description="share of each video's tokens dropped before "
                                      "the LLM (model.pruning: the first frame whole, then the tokens that changed most)")
    batch_size: int = Field(4, ge=1, description="videos per Ray Data batch, captioned together (continuous batching)")
    batches_in_flight: int = Field(
        2, ge=1, le=16, description="Ray Data batches each model actor captions at once, in threads of its own: their "
        "videos share the actor's running decode batch (batch_size x this many sequences), so one batch's longest "
        "caption no longer holds up the next batch's prefill")
    concurrency: int = Field(1, ge=1, description="model replicas (actors)")
    num_gpus: float = Field(0, ge=0, description="GPUs per model replica")
    decode_workers: int = Field(1, ge=1, description="decoder actors (1 CPU each)")
    decode_timeout_s: float = Field(120, gt=0)
    max_object_mb: float = Field(2048, gt=0, description="larger objects become error rows without being read")
    decode_memory_mb: int | None = Field(4096, ge=256, description="data memory a decode process may hold; past it "
                                         "the object is an error row and the process is replaced (None: unlimited)")
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
    return final_rows(read_output(cfg_output, endpoint_url))


def final_rows(table) -> list[dict]:
    """``final_view`` of a table ``read_output`` returned (``None``: no output, no rows)."""
    if table is None:
        return []
    best: dict[tuple[str, str], dict] = {}
    for row in table.to_pylist():
        pair = (row["key"], row["etag"])
        rank = (row["status"] == "ok", row["captioned_at"])
        if pair not in best or rank > (best[pair]["status"] == "ok", best[pair]["captioned_at"]):
            best[pair] = row
    return sorted(best.values(), key=lambda r: r["key"])


def setup_inputs(cfg: CaptionConfig) -> tuple[list[dict], dict]:
    """Objects still to caption, and listing counts. Fails fast on a bad bucket, prefix or credentials."""
    location = Location.parse(cfg.input)
    objects = list(list_objects(location, cfg.endpoint_url))
    videos = [o for o in objects if is_video_key(o.key)]
    images = [o for o in objects if is_image_key(o.key)]
    media = sorted(videos + images, key=lambda o: o.key)
    if not media:
        raise StorageError(
            f"no video objects under {cfg.input} ({len(objects)} objects listed; extensions looked for: mp4, mov, "
            "avi, webm, mkv, ..., and images: png, jpg, webp, ...)"
        )
    done = {(r["key"], r["etag"]) for r in final_view(cfg.output, cfg.endpoint_url)
            if r["status"] == "ok" or not cfg.retry_errors}
    todo = [{"key": o.key, "size": o.size, "etag": o.etag} for o in media if (o.key, o.etag) not in done]
    counts = {"objects_listed": len(objects), "video_objects": len(videos), "image_objects": len(images),
              "skipped_other": len(objects) - len(media), "already_done": len(media) - len(todo),
              "to_caption": len(todo)}
    return todo, counts


def build_pipeline(cfg: CaptionConfig, todo: list[dict]):
    import ray

    from video_llava.batch.steps import CaptionPredictor, DecodeStep
    from video_llava.model.loading import checkpoint_inputs
    from video_llava.model.settings import ModelSettings
    from video_llava.ray_runtime import model_actor_pool

    settings = {"model": cfg.model, "num_frames": cfg.frames, "max_frames": MAX_FRAMES, "max_new_tokens": cfg.max_new_tokens,
                "video_pruning_rate": cfg.video_pruning_rate}
    short_side = checkpoint_inputs(ModelSettings(**settings)).frame_short_side  # config and processor, no weights
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo), 4 * cfg.decode_workers * cfg.batch_size)))
    ds = ds.map_batches(
        DecodeStep,
        fn_constructor_kwargs={"input_uri": cfg.input, "num_frames": cfg.frames, "short_side": short_side,
                               "endpoint_url": cfg.endpoint_url,
                               "timeout_s": cfg.decode_timeout_s, "max_object_bytes": int(cfg.max_object_mb * 2**20),
                               "memory_mb": cfg.decode_memory_mb},
        batch_size=cfg.batch_size,
        concurrency=cfg.decode_workers,
        num_cpus=1,
        resources={cfg.decode_resource: 1} if cfg.decode_resource else None,
    )
    flight = cfg.batches_in_flight
    return ds.map_batches(
        CaptionPredictor,
        fn_constructor_kwargs={"settings": settings, "prompt": cfg.prompt, "batch_size": cfg.batch_size * flight},
        batch_size=cfg.batch_size,
        compute=model_actor_pool(cfg.concurrency, flight),
        num_gpus=cfg.num_gpus,
        num_cpus=0 if cfg.num_gpus else 1,
        resources={cfg.model_resource: 1} if cfg.model_resource else None,
    )


def write_manifest(cfg: CaptionConfig, manifest: dict) -> None:
    output = Location.parse(cfg.output)
    fs = pyarrow_filesystem(output, cfg.endpoint_url)
    if output.scheme == "file":
        os.makedirs(output.prefix, exist_ok=True)
    with fs.open_output_stream(output.join("_manifest.json")) as stream:
        stream.write(json.dumps(manifest, indent=2).encode())


def read_manifest(cfg_output: str, endpoint_url: str | None = None) -> dict | None:
    """The ``_manifest.json`` of a caption output (its input location, counts), or ``None`` if it has none yet."""
    output = Location.parse(cfg_output)
    fs = pyarrow_filesystem(output, endpoint_url)
    try:
        with fs.open_input_stream(output.join("_manifest.json")) as stream:
            return json.loads(stream.read())
    except (FileNotFoundError, OSError):
        return None


def needed_resources(cfg: CaptionConfig) -> tuple[dict[str, float], str]:
    """What one decoder and one model replica need, and the flags that asked for it."""
    needed = {"CPU": 1.0, "GPU": cfg.num_gpus}
    asked = [f"--num-gpus {cfg.num_gpus:g}"] if cfg.num_gpus else []
    for flag, resource in (("--decode-resource", cfg.decode_resource), ("--model-resource", cfg.model_resource)):
        if resource:
            needed[resource] = 1.0
            asked.append(f"{flag} {resource}")
    return needed, "the caption job" + (f" ({' '.join(asked)})" if asked else "")


def run_caption(cfg: CaptionConfig) -> dict:
    """Caption every video of ``cfg.input`` not yet in ``cfg.output``; returns the manifest it writes."""
    start = time.perf_counter()
    todo, counts = setup_inputs(cfg)
    print(f"caption: {counts['video_objects']} videos and {counts['image_objects']} images under {cfg.input} "
          f"({counts['already_done']} already done, {counts['to_caption']} to caption, {counts['skipped_other']} other "
          "objects skipped)", flush=True)
    if todo:
        ensure_ray(cfg.num_cpus)
        require_resources(*needed_resources(cfg))
        output = Location.parse(cfg.output)
        build_pipeline(cfg, todo).write_parquet(_shards_dir(output), filesystem=pyarrow_filesystem(output, cfg.endpoint_url))
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
    write_manifest(cfg, manifest)
    return manifest
