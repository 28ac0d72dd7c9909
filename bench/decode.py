"""decord vs PyAV, and the cost of checking decord: time to sample 16/32/56 frames, side by side in one run.

    python -m bench.decode            # table
    python -m bench.decode --json     # table, then one JSON object of the figures as the last line
    python -m bench.decode --quick    # small videos only (smoke run)

For each video (short and long, several resolutions) and frame count, both backends decode the same file in
alternation, ``--repeat`` times; the median is kept. ``pyav/decord`` > 1 means decord is faster. ``check`` is
what ``sample_video``'s decord path does beyond bare decord (``VideoReader`` + ``get_batch`` of the same indices),
timed on its own (the difference of two decodes is lost in these machines' noise): the container probe (packet
times from the MP4 sample table, the rotation from its track matrix) over bare decord's time. ``demux probe`` is
the probe without the header's shortcuts: every packet demuxed and the first frame decoded, as before.
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
from video_llava.video.probe import probe_container

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


def time_probe(path: Path, use_header: bool = True, repeat: int = 9) -> float:
    """Median seconds of the container probe, the check's own work (decord's timestamps cost microseconds)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        probe_container(str(path), use_header=use_header)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_bare_decord(path: Path, frames: int, threads: int) -> float:
    """decord alone, as the decode path was before it was checked against the container."""
    import decord

    start = time.perf_counter()
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads)
    indices = np.rint(np.linspace(0, len(reader) - 1, min(frames, len(reader)))).astype(int).tolist()
    reader.get_batch(indices).asnumpy()
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
        print(f"{'video':<20} {'frames':>6} {'bare ms':>9} {'decord ms':>10} {'probe ms':>9} {'check':>7} "
              f"{'demux probe ms':>15} {'pyav ms':>10} {'pyav/decord':>12}")
        for name, path in videos:
            probe_s, demux_s = time_probe(path), time_probe(path, use_header=False)
            for n in args.frames:
                for backend in ("decord", "pyav"):  # warm-up: file cache, codec init
                    time_decode(path, n, backend, args.threads)
                time_bare_decord(path, n, args.threads)
                samples = {"bare": [], "decord": [], "pyav": []}
                for _ in range(args.repeat):
                    samples["bare"].append(time_bare_decord(path, n, args.threads))
                    for backend in ("decord", "pyav"):
                        samples[backend].append(time_decode(path, n, backend, args.threads))
                bare_s, decord_s, pyav_s = (statistics.median(samples[k]) for k in ("bare", "decord", "pyav"))
                ratio, check = pyav_s / decord_s, probe_s / bare_s
                rows.append({"video": name, "frames": n, "bare_decord_ms": round(bare_s * 1e3, 1),
                             "decord_ms": round(decord_s * 1e3, 1), "probe_ms": round(probe_s * 1e3, 2),
                             "check_overhead": round(check, 3), "demux_probe_ms": round(demux_s * 1e3, 2),
                             "pyav_ms": round(pyav_s * 1e3, 1), "pyav_over_decord": round(ratio, 2)})
                print(f"{name:<20} {n:>6} {bare_s * 1e3:>9.1f} {decord_s * 1e3:>10.1f} {probe_s * 1e3:>9.2f} "
                      f"{check:>+7.1%} {demux_s * 1e3:>15.2f} {pyav_s * 1e3:>10.1f} {ratio:>12.2f}", flush=True)
    ratios = [r["pyav_over_decord"] for r in rows]
    checks = [r["check_overhead"] for r in rows]
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
        "median_check_overhead": round(statistics.median(checks), 3),
        "max_check_overhead": max(checks),
    }
    print(f"median pyav/decord: {summary['median_pyav_over_decord']} (range {summary['min_pyav_over_decord']}-{summary['max_pyav_over_decord']})")
    print(f"decord checked against the container: the check adds median {summary['median_check_overhead']:+.1%} to "
          f"bare decord's time (max {summary['max_check_overhead']:+.1%})")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
