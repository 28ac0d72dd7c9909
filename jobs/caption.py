"""Caption every video under an S3 prefix (or a local directory) with Ray Data; resumable, nothing lost.

    python -m jobs.caption --input s3://bucket/videos/ --output s3://bucket/captions/ [--config caption.yaml] [--frames 32]
        [--prompt "Describe the video in detail."] [--model embedded] [--endpoint-url http://127.0.0.1:9000]
        [--batch-size 4] [--batches-in-flight 2] [--concurrency 1] [--decode-workers 1] [--num-gpus 0]
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
import sys
from typing import Any

from video_llava.batch.pipeline import CaptionConfig, final_rows, read_output, run_caption
from video_llava.data.storage import StorageError
from video_llava.job_cli import SubmittedJobError, add_config_flags, check_submitted_job, config_from_flags
from video_llava.ray_runtime import ClusterResourceError


def main(cfg: CaptionConfig) -> dict:
    """Caption what is left to caption and print the summary; returns the manifest."""
    manifest = run_caption(cfg)
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
        check_submitted_job(cfg)
        if show:
            table = read_output(cfg.output, cfg.endpoint_url)
            if table is None:
                raise StorageError(f"no caption output at {cfg.output}: it holds no readable shards/ (is the path right?)")
            for row in final_rows(table):
                print(json.dumps(row))
            return 0
        manifest = main(cfg)
    except (StorageError, SubmittedJobError, ClusterResourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if manifest["missing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(cli())
