"""Batch captioning: the Ray Data pipeline vs a plain sequential loop over the same bucket, in one run.

    python -m bench.caption [--videos 24] [--decode-workers 1 2] [--batches-in-flight 1 2] [--json]

A moto S3 server on 127.0.0.1 holds the videos (distinct clips, 320x240, 3 s). The sequential loop reads,
decodes (decord, in process) and captions one video at a time with the same model and settings. The pipeline
runs ``jobs.caption`` once per decode-worker count and batches-in-flight count (Ray started with decode workers
+ 1 logical CPUs). All include model loading. Reported: videos/s, the pipeline/sequential ratio, and for each
decode-worker count the ratio of each batches-in-flight count to the first (its model actor captioning several
Ray Data batches at once, in one running batch).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.machine import describe_machine
from video_llava.data.synthetic_video import COLORS, DIRECTIONS, SHAPES, MovingShape, render_frames, video_bytes
from video_llava.ray_runtime import free_port, start_local_ray

FRAMES = 16
NEW_TOKENS = 64  # the job's default; the embedded default's captions end (EOS) after about 17
PROMPT = "Describe the video in detail."


def fill_bucket(client, n: int) -> None:
    colors, directions = list(COLORS), list(DIRECTIONS)
    client.create_bucket(Bucket="bench")
    for i in range(n):
        shape = MovingShape(SHAPES[i % 3], colors[i % len(colors)], directions[i % 4], start=(0.1 + 0.02 * i, 0.5))
        data = video_bytes(render_frames([shape], num_frames=36, fps=12, width=320, height=240), fps=12)
        client.put_object(Bucket="bench", Key=f"videos/clip{i:03d}.mp4", Body=data)


def sequential(client, endpoint: str) -> float:
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings
    from video_llava.video.decode import DecodeOptions, sample_video

    start = time.perf_counter()
    model = VideoQAModel(ModelSettings(num_frames=FRAMES, max_new_tokens=NEW_TOKENS))
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="bench", Prefix="videos/")["Contents"]]
    for key in keys:
        data = client.get_object(Bucket="bench", Key=key)["Body"].read()
        video = sample_video(data, DecodeOptions(num_frames=FRAMES, short_side=model.frame_short_side))
        model.answer([video], [PROMPT])
    return len(keys) / (time.perf_counter() - start)


def pipeline(endpoint: str, decode_workers: int, n: int, flight: int = 1) -> float:
    import ray

    from jobs.caption import CaptionConfig, main

    start_local_ray(num_cpus=decode_workers + 1)
    try:
        cfg = CaptionConfig(input="s3://bench/videos/", output=f"s3://bench/out-{decode_workers}-{time.time_ns()}/",
                            endpoint_url=endpoint, frames=FRAMES, max_new_tokens=NEW_TOKENS, batch_size=4,
                            batches_in_flight=flight, decode_workers=decode_workers)
        start = time.perf_counter()
        manifest = main(cfg)
        assert manifest["ok"] == n, manifest
        return n / (time.perf_counter() - start)
    finally:
        ray.shutdown()


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--decode-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches-in-flight", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3
    from moto.server import ThreadedMotoServer

    machine = describe_machine(("ray", "torch", "decord"))
    print(f"machine: {machine['cpu']} x{machine['cpus']}; {args.videos} videos, {FRAMES} frames, {NEW_TOKENS} new tokens")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        fill_bucket(client, args.videos)
        seq = sequential(client, endpoint)
        print(f"sequential loop:              {seq:.3f} videos/s", flush=True)
        rows = []
        for workers in args.decode_workers:
            first = None
            for flight in args.batches_in_flight:
                rate = pipeline(endpoint, workers, args.videos, flight)
                first = first or rate
                rows.append({"decode_workers": workers, "batches_in_flight": flight, "videos_per_s": round(rate, 3),
                             "vs_sequential": round(rate / seq, 2), "vs_first_in_flight": round(rate / first, 2)})
                print(f"ray data, {workers} decode worker(s), {flight} batch(es) in flight: {rate:.3f} videos/s  "
                      f"({rate / seq:.2f}x sequential, {rate / first:.2f}x {args.batches_in_flight[0]} in flight)",
                      flush=True)
    finally:
        server.stop()
    figures = {"bench": "caption", "machine": machine, "videos": args.videos, "frames": FRAMES,
               "sequential_videos_per_s": round(seq, 3), "pipeline": rows,
               "best_pipeline_over_sequential": max(r["vs_sequential"] for r in rows)}
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main_bench()
