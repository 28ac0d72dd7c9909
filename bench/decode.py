"""decord vs PyAV: time to sample 16/32/56 frames from the same videos, measured side by side in one run.

    python -m bench.decode            # table
    python -m bench.decode --json     # table, then one JSON object of the figures as the last line
    python -m bench.decode --quick    # small videos only (smoke run)

For each video (short and long, several resolutions) and frame count, both backends decode the same file in
alternation, ``--repeat`` times; the median is kept. ``pyav/decord`` > 1 means decord is faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.machine import describe_machine
from video_llava.data.synthetic_video import MovingShape, render_frames, write_video
from video_llava.video.decode import DecodeOptions, sample_video

SHAPES = [MovingShape("circle", "red", "right", start=(0.2, 0.4)), MovingShape("square", "blue", "down", start=(0.7, 0.2))]


def make_videos(root: Path, quick: bool, gop: int | None) -> list[tuple[str, Path]]:
    fps = 30
    specs = [("short 4s 320x240", 4, 320, 240), ("short 4s 1280x720", 4, 1280, 720)]
    if not quick:
        specs += [("long 60s 320x240", 60, 320, 240), ("long 30s 640x360", 30, 640, 360), ("long 30s 1280x720", 30, 1280, 720)]
    videos = []
    for name, seconds, width, height in specs:
        path = root / (name.replace(" ", "_") + ".mp4")
        # Render a 2 s loop and repeat it: the encoder still sees every frame, rendering stays cheap.
        loop = render_frames(SHAPES, num_frames=min(seconds, 2) * fps, fps=fps, width=width, height=height)
        reps = -(-seconds * fps // len(loop))
        frames = [f for _ in range(reps) for f in loop][: seconds * fps]
        write_video(path, np.stack(frames), fps=fps, fmt="mp4", gop=gop)
        videos.append((name, path))
    return videos


def time_decode(path: Path, frames: int, backend: str, threads: int) -> float:
    start = time.perf_counter()
    sample_video(path, DecodeOptions(num_frames=frames, backend=backend, threads=threads))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 56])
    parser.add_argument("--threads", type=int, default=1, help="decoder threads for both backends (0 = all cores)")
    parser.add_argument("--gop", type=int, default=30, help="keyframe interval of the test videos (30 = 1 s, phone-like; 0 = x264 default 250)")
    args = parser.parse_args()

    machine = describe_machine(("decord", "av", "numpy"))
    print(f"machine: {machine['cpu']} x{machine['cpus']}, {machine['platform']}; decord {machine['decord']}, av {machine['av']}")
    print(f"h264 at 30 fps, keyframe every {args.gop or 250} frames; {args.threads or 'all'} decoder thread(s); "
          f"median of {args.repeat} alternating runs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print("writing test videos ...", flush=True)
        videos = make_videos(Path(tmp), args.quick, args.gop or None)
        print(f"{'video':<20} {'frames':>6} {'decord ms':>10} {'pyav ms':>10} {'pyav/decord':>12}")
        for name, path in videos:
            for n in args.frames:
                for backend in ("decord", "pyav"):  # warm-up: file cache, codec init
                    time_decode(path, n, backend, args.threads)
                samples = {"decord": [], "pyav": []}
                for _ in range(args.repeat):
                    for backend in ("decord", "pyav"):
                        samples[backend].append(time_decode(path, n, backend, args.threads))
                decord_s, pyav_s = statistics.median(samples["decord"]), statistics.median(samples["pyav"])
                ratio = pyav_s / decord_s
                rows.append({"video": name, "frames": n, "decord_ms": round(decord_s * 1e3, 1), "pyav_ms": round(pyav_s * 1e3, 1), "pyav_over_decord": round(ratio, 2)})
                print(f"{name:<20} {n:>6} {decord_s * 1e3:>10.1f} {pyav_s * 1e3:>10.1f} {ratio:>12.2f}", flush=True)
    ratios = [r["pyav_over_decord"] for r in rows]
    summary = {
        "bench": "decode",
        "machine": machine,
        "repeat": args.repeat,
        "gop": args.gop or 250,
        "threads": args.threads,
        "rows": rows,
        "median_pyav_over_decord": round(statistics.median(ratios), 2),
        "min_pyav_over_decord": min(ratios),
        "max_pyav_over_decord": max(ratios),
    }
    print(f"median pyav/decord: {summary['median_pyav_over_decord']} (range {summary['min_pyav_over_decord']}-{summary['max_pyav_over_decord']})")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
