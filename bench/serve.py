"""The REST service under load: the continuous-batching engine vs one sequence at a time vs a library loop, and a
repeat question with vs without the caches.

    python -m bench.serve [--json] [--quick]

Everything runs in one process tree on this machine, side by side in one run: Ray (2 CPUs), Serve on 127.0.0.1, the
embedded default model. Answers are forced to 64 new tokens (``batching.ignore_eos``, a bench-only setting), questions
are of mixed lengths about distinct clips (no cache helps) of 16 and 32 frames, half the requests are streamed (chat
with a ``data:`` URL; TTFT = first content chunk), half are uploads to ``/v1/video/qa``. The same load runs against the
service with the engine (``max_batch_size`` 32) and limited to one sequence (``max_batch_size`` 1), and the same
requests are answered by an in-process loop (decode, then ``generate`` one at a time, 64 tokens each).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import statistics
import time

from bench.machine import describe_machine
from video_llava.data.synthetic_video import COLORS, DIRECTIONS, SHAPES, MovingShape, render_frames, video_bytes
from video_llava.ray_runtime import free_port, start_local_ray

NEW_TOKENS = 64
QUESTIONS = ["What color is the shape?", "Which way does the shape move? Answer in one word.",
             "Describe the video in detail: every shape, its color, where it starts and where it goes.", "What moves?"]


def make_clips(n: int) -> list[bytes]:
    clips = []
    colors, directions = list(COLORS), list(DIRECTIONS)
    for i in range(n):
        shape = MovingShape(SHAPES[i % 3], colors[i % len(colors)], directions[i % 4], start=(0.1 + 0.01 * i, 0.5))
        clips.append(video_bytes(render_frames([shape], num_frames=36, fps=12, width=160, height=120), fps=12))
    return clips


def frames_of(i: int) -> int:
    return 16 if i % 4 < 2 else 32  # streamed and uploaded requests alike get both


def app_args(batch_size: int, caches: bool, new_tokens: int = NEW_TOKENS, ignore_eos: bool = True) -> dict:
    return {
        "model": {"max_new_tokens": new_tokens, "feature_cache_mb": 256 if caches else 0},
        "batching": {"max_batch_size": batch_size, "ignore_eos": ignore_eos, "prefix_cache_mb": 256 if caches else 0},
        "deployment": {"num_cpus": 1, "ingress_num_cpus": 0.5, "max_ongoing_requests": 64, "max_queued_requests": -1,
                       "decode_cache_mb": 512 if caches else 0},
    }


def ask(url: str, clip: bytes, question: str, frames: int = 16) -> dict:
    import httpx

    start = time.perf_counter()
    response = httpx.post(f"{url}/v1/video/qa", files={"video": ("clip.mp4", clip, "video/mp4")},
                          data={"question": question, "num_frames": str(frames)}, timeout=600)
    response.raise_for_status()
    body = response.json()
    body["latency_s"] = time.perf_counter() - start
    return body


def ask_streamed(url: str, clip: bytes, question: str, frames: int) -> dict:
    """A streamed chat request; its latency and time to the first content chunk."""
    import httpx

    data_url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url}},
                                                     {"type": "text", "text": question}]}],
            "num_frames": frames, "stream": True}
    start, first = time.perf_counter(), None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                first = time.perf_counter() - start
    latency = time.perf_counter() - start
    return {"latency_s": latency, "ttft_s": first if first is not None else latency}


def load(url: str, clips: list[bytes], concurrency: int, requests: int) -> dict:
    def one(i: int) -> dict:
        clip, question = clips[i % len(clips)], QUESTIONS[i % len(QUESTIONS)]
        return ask_streamed(url, clip, question, frames_of(i)) if i % 2 else ask(url, clip, question, frames_of(i))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(r["latency_s"] for r in results)
    ttft = sorted(r["ttft_s"] for r in results if "ttft_s" in r)
    pick = lambda xs, q: round(xs[min(len(xs) - 1, int(len(xs) * q))], 3)  # noqa: E731
    return {"concurrency": concurrency, "requests": requests, "videos_per_s": round(requests / wall, 3),
            "p50_s": pick(latencies, 0.5), "p99_s": pick(latencies, 0.99),
            "ttft_p50_s": pick(ttft, 0.5), "ttft_p99_s": pick(ttft, 0.99)}


def library_loop(clips: list[bytes], requests: int, new_tokens: int) -> float:
    """Requests per second of decode + transformers' generate, one request at a time, in this process."""
    import torch

    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings
    from video_llava.video.decode import DecodeOptions, sample_video

    model = VideoQAModel(ModelSettings(max_new_tokens=new_tokens, feature_cache_mb=0))
    start = None
    for i in range(-1, requests):  # -1: a warm-up
        if i == 0:
            start = time.perf_counter()
        video = sample_video(clips[max(i, 0) % len(clips)], DecodeOptions(num_frames=frames_of(max(i, 0))))
        embeds, mask, _, _ = model.embedder([model.prepare(video, QUESTIONS[max(i, 0) % len(QUESTIONS)], new_tokens)])
        with torch.inference_mode():
            model.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    return requests / (time.perf_counter() - start)


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
    parser.add_argument("--quick", action="store_true", help="concurrency 8, 8 requests")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

    from video_llava.serve.app import build_app
    from video_llava.serve.config import ServeArgs

    machine = describe_machine(("ray", "torch", "transformers"))
    print(f"machine: {machine['cpu']} x{machine['cpus']}; ray {machine['ray']}, torch {machine['torch']}")
    concurrency, requests = (8, 8) if args.quick else (32, 64)
    clips = make_clips(max(requests, 16))  # the cache runs below take clips 8 and on
    start_local_ray(num_cpus=2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    figures: dict = {"bench": "serve", "machine": machine, "frames": [16, 32], "max_new_tokens": NEW_TOKENS}
    try:
        runs = {}
        for name, batch in (("engine", 32), ("one_sequence", 1)):
            serve.run(build_app(ServeArgs.model_validate(app_args(batch, caches=False))), name="bench", route_prefix="/",
                      blocking=False)
            ask(base, clips[0], "warm-up")
            runs[name] = load(base, clips, concurrency, requests)
            print(f"{name:>12} c={concurrency}: {runs[name]}", flush=True)
            serve.delete("bench")
        figures["runs"] = runs
        library = library_loop(clips, max(8, requests // 4), NEW_TOKENS)
        figures["library_loop_videos_per_s"] = round(library, 3)
        engine = runs["engine"]["videos_per_s"]
        figures[f"engine_speedup_c{concurrency}"] = round(engine / runs["one_sequence"]["videos_per_s"], 2)
        figures["service_vs_library_loop"] = round(engine / library, 2)
        figures[f"ttft_p50_s_c{concurrency}"] = runs["engine"]["ttft_p50_s"]
        figures[f"ttft_p99_s_c{concurrency}"] = runs["engine"]["ttft_p99_s"]
        print(f"engine {figures[f'engine_speedup_c{concurrency}']}x one sequence at c={concurrency}; service "
              f"{figures['service_vs_library_loop']}x a library loop ({library:.2f} videos/s); TTFT p50 "
              f"{runs['engine']['ttft_p50_s']}s p99 {runs['engine']['ttft_p99_s']}s", flush=True)

        repeats = 3 if args.quick else 5
        latency = {}
        for name, caches in (("with_cache", True), ("without_cache", False)):
            natural = app_args(8, caches=caches, new_tokens=16, ignore_eos=False)  # answers end where the model ends them
            serve.run(build_app(ServeArgs.model_validate(natural)), name="bench", route_prefix="/", blocking=False)
            ask(base, clips[-1], "warm-up")
            fresh = clips[8:] if caches else clips[8 + repeats:]  # clips this app has not seen
            latency[name] = repeat_latency(base, fresh, repeats)
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
