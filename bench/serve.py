"""The REST service under load: batching on vs off, and a repeat question with vs without the caches.

    python -m bench.serve [--json] [--quick]

Everything runs in one process tree on this machine, side by side in one run: Ray (2 CPUs), Serve on
127.0.0.1, the embedded default model. For each configuration the app is deployed, measured at concurrency
1, 8 and 32 with distinct videos (so no cache helps), and deleted. Reported: throughput (videos/s), p50/p99
latency, and mean time per stage (decode, queue, vision, generate) from the service's own timings.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import time

from bench.machine import describe_machine
from video_llava.data.synthetic_video import COLORS, DIRECTIONS, SHAPES, MovingShape, render_frames, video_bytes
from video_llava.ray_runtime import free_port, start_local_ray

FRAMES = 16
NEW_TOKENS = 16


def make_clips(n: int) -> list[bytes]:
    clips = []
    colors, directions = list(COLORS), list(DIRECTIONS)
    for i in range(n):
        shape = MovingShape(SHAPES[i % 3], colors[i % len(colors)], directions[i % 4], start=(0.1 + 0.01 * i, 0.5))
        clips.append(video_bytes(render_frames([shape], num_frames=36, fps=12, width=160, height=120), fps=12))
    return clips


def app_args(batch_size: int, caches: bool) -> dict:
    return {
        "model": {"max_new_tokens": NEW_TOKENS, "feature_cache_mb": 256 if caches else 0},
        "batching": {"max_batch_size": batch_size},
        "deployment": {"num_cpus": 1, "ingress_num_cpus": 0.5, "max_ongoing_requests": 64, "max_queued_requests": -1,
                       "decode_cache_mb": 512 if caches else 0},
    }


def ask(url: str, clip: bytes, question: str) -> dict:
    import httpx

    start = time.perf_counter()
    response = httpx.post(url, files={"video": ("clip.mp4", clip, "video/mp4")},
                          data={"question": question, "num_frames": str(FRAMES)}, timeout=600)
    response.raise_for_status()
    body = response.json()
    body["latency_s"] = time.perf_counter() - start
    return body


def load(url: str, clips: list[bytes], concurrency: int, requests: int) -> dict:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: ask(url, clips[i % len(clips)], f"What moves in clip {i}?"), range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(r["latency_s"] for r in results)
    stage = {k: statistics.mean(r["timings"][k] for r in results) for k in ("decode_s", "queue_s", "vision_s", "generate_s")}
    return {
        "concurrency": concurrency,
        "requests": requests,
        "videos_per_s": round(requests / wall, 3),
        "p50_s": round(latencies[len(latencies) // 2], 3),
        "p99_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3),
        "mean_stage_s": {k: round(v, 4) for k, v in stage.items()},
    }


def repeat_latency(url: str, clips: list[bytes], repeats: int) -> float:
    """Median latency of a second question about a video that was just asked about (a fresh video each time)."""
    seconds = []
    for clip in clips[:repeats]:
        ask(url, clip, "What color is the shape?")
        seconds.append(ask(url, clip, "Which way does it move?")["latency_s"])
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 8 only, fewer requests")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

    from video_llava.serve.app import build_app
    from video_llava.serve.config import ServeArgs

    machine = describe_machine(("ray", "torch", "transformers"))
    print(f"machine: {machine['cpu']} x{machine['cpus']}; ray {machine['ray']}, torch {machine['torch']}")
    levels = [1, 8] if args.quick else [1, 8, 32]
    clips = make_clips(64)
    start_local_ray(num_cpus=2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/video/qa"
    figures: dict = {"bench": "serve", "machine": machine, "frames": FRAMES, "max_new_tokens": NEW_TOKENS}
    try:
        runs = {}
        for name, batch in (("batched", 8), ("unbatched", 1)):
            serve.run(build_app(ServeArgs.model_validate(app_args(batch, caches=False))), name="bench", route_prefix="/", blocking=False)
            ask(url, clips[0], "warm-up")
            runs[name] = []
            for c in levels:
                requests = max(8, 2 * c) if args.quick else max(16, 3 * c)
                row = load(url, clips, c, requests)
                runs[name].append(row)
                print(f"{name:>9} c={c:<3} {row['videos_per_s']:>7.2f} videos/s  p50 {row['p50_s']:.2f}s  p99 {row['p99_s']:.2f}s  "
                      f"stages {row['mean_stage_s']}", flush=True)
            serve.delete("bench")
        figures["runs"] = runs
        top = levels[-1]
        speedup = runs["batched"][-1]["videos_per_s"] / runs["unbatched"][-1]["videos_per_s"]
        figures[f"batching_speedup_c{top}"] = round(speedup, 2)
        figures["single_replica_videos_per_s"] = max(r["videos_per_s"] for r in runs["batched"])
        print(f"batching speedup at concurrency {top}: {speedup:.2f}x; one replica sustains "
              f"{figures['single_replica_videos_per_s']} videos/s ({FRAMES} frames, {NEW_TOKENS} new tokens)")

        repeats = 3 if args.quick else 5
        latency = {}
        for name, caches in (("with_cache", True), ("without_cache", False)):
            serve.run(build_app(ServeArgs.model_validate(app_args(8, caches=caches))), name="bench", route_prefix="/", blocking=False)
            ask(url, clips[-1], "warm-up")
            fresh = clips[8:] if caches else clips[8 + repeats:]  # clips this app has not seen
            latency[name] = repeat_latency(url, fresh, repeats)
            serve.delete("bench")
        ratio = latency["with_cache"] / latency["without_cache"]
        figures["repeat_question_latency_s"] = {k: round(v, 3) for k, v in latency.items()}
        figures["repeat_question_latency_ratio"] = round(ratio, 3)
        print(f"repeat question latency: {latency['with_cache']:.3f}s with cache vs {latency['without_cache']:.3f}s "
              f"without ({ratio:.2f}x)")
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
