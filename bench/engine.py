"""The continuous-batching engine in one process: throughput and time to first token vs one request at a time.

    python -m bench.engine [--json] [--quick] [--concurrency 32] [--new-tokens 64]
    python -m bench.engine --video-prune-rates 0 0.5 0.75 [--json]     (the video token budget alone)

The embedded default (or ``--model``), answers forced to ``--new-tokens`` (EOS ignored, in this bench only), questions
of mixed lengths about distinct clips of 16 and 32 frames, half of them streamed. Side by side in one run, on the
same prepared requests: ``Engine(max_running=c)`` with all requests arriving at once and spread over time, the same
engine limited to one sequence, and a plain loop of transformers' ``generate`` one request at a time. TTFT is
measured on the streamed half. Also the burst with the videos preprocessed ahead in a thread of their own (as the
service runs it), and the ceiling: vision + prefill alone for the same requests (``engine_speedup_ceiling``: the
most that batching the decode steps can give one-at-a-time, since every request's vision pass and prefill remain).

``--video-prune-rates``: the same requests with each share of their video tokens pruned (``model.pruning``), side by
side: vision + prefill alone (prefill tokens/s and seconds a request), and the engine's burst at ``--concurrency``
(requests/s, TTFT), each rate's against rate 0's.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

from bench.machine import describe_machine
from video_llava.data.synthetic_video import COLORS, DIRECTIONS, SHAPES, MovingShape, render_frames

QUESTIONS = ["What color is the shape?", "Which way does the shape move? Answer in one word.",
             "Describe the video in detail: every shape, its color, where it starts and where it goes.", "What moves?"]


def clip(i: int, frames: int = 32):
    """The ``i``-th distinct 160x120 clip of one moving shape."""
    colors, directions = list(COLORS), list(DIRECTIONS)
    shape = MovingShape(SHAPES[i % 3], colors[i % len(colors)], directions[i % 4], start=(0.1 + 0.01 * i, 0.5))
    return render_frames([shape], num_frames=frames, fps=12, width=160, height=120)


def make_requests(model, n: int, new_tokens: int) -> list:
    return [model.prepare(clip(i, 16 if i % 2 else 32), QUESTIONS[i % len(QUESTIONS)], new_tokens) for i in range(n)]


def run_engine(engine, prepared: list, params, spread_s: float) -> dict:
    """Submit every request (evenly over ``spread_s``), half streamed; wall time and time to first token."""
    from video_llava.engine import Failed, Finished, TextPiece

    n = len(prepared)
    first: list[float | None] = [None] * n
    submitted = [0.0] * n
    done = threading.Semaphore(0)
    failures: list[BaseException] = []

    def emit(i):
        def on(event):
            if first[i] is None and isinstance(event, (TextPiece, Finished)) and i % 2 == 0:  # streamed ones
                first[i] = time.perf_counter() - submitted[i]
            if isinstance(event, Failed):
                failures.append(event.error)
            if not isinstance(event, TextPiece):
                done.release()
        return on

    start = time.perf_counter()
    for i, p in enumerate(prepared):
        if spread_s:
            time.sleep(max(0.0, start + spread_s * i / n - time.perf_counter()))
        submitted[i] = time.perf_counter()
        engine.submit(p, params, emit(i), stream=i % 2 == 0)
    for _ in prepared:
        done.acquire()
    wall = time.perf_counter() - start
    if failures:
        raise failures[0]
    ttft = sorted(t for t in first if t is not None)
    return {"wall_s": round(wall, 3), "requests_per_s": round(n / wall, 3),
            "ttft_p50_s": round(ttft[len(ttft) // 2], 4), "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))], 4),
            "most_running": max(engine.recent_running() or [0])}


def ceiling_videos_per_s(model, prepared: list) -> float:
    """Requests per second of vision + prefill alone (what no schedule can beat), after one warm-up."""
    import torch

    def prefill(p):
        embeds, mask, _, _ = model.embedder([p])
        with torch.inference_mode():
            model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    prefill(prepared[0])
    start = time.perf_counter()
    for p in prepared:
        prefill(p)
    return len(prepared) / (time.perf_counter() - start)


def host_sampler_step(logits, params, generators) -> list[int]:
    """The sampler the engine had before (kept here as the baseline): each sampled row moved to the host, its whole
    vocabulary sorted for top-p and drawn with its own generator, and each row's logprobs taken alone."""
    import torch

    chosen = logits.argmax(-1).tolist()
    for i, (p, generator) in enumerate(zip(params, generators)):
        row = logits[i].float().cpu() / p.temperature
        ordered, index = row.sort(descending=True)
        probs = ordered.softmax(-1)
        ordered = ordered.masked_fill(probs.cumsum(-1) - probs >= p.top_p, float("-inf"))
        row = torch.full_like(row, float("-inf")).scatter(0, index, ordered)
        chosen[i] = int(torch.multinomial(row.softmax(-1), 1, generator=generator))
        logprobs = logits[i].float().log_softmax(-1)
        float(logprobs[chosen[i]]), logprobs.topk(p.top_logprobs)
    return chosen


def sampler_figures(rows: int = 32, vocab: int = 152_064, steps: int = 5) -> dict:
    """The batched sampler against the host path it replaced: ``rows`` sampled rows (temperature 1, top-p 0.9,
    5 logprobs) over a ``vocab``-token vocabulary (OneVision's), median seconds a step, on the default device."""
    import statistics

    import torch

    from video_llava.engine import SamplingParams
    from video_llava.engine.sampler import RowDraw, sample

    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)).mul_(3).to(device)
    p = SamplingParams(64, temperature=1.0, top_p=0.9, logprobs=True, top_logprobs=5)
    generators = [torch.Generator().manual_seed(i) for i in range(rows)]

    def timed(step) -> float:
        times = []
        for k in range(steps + 1):
            start = time.perf_counter()
            step(k)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])  # the first warms up

    old = timed(lambda k: host_sampler_step(logits, [p] * rows, generators))
    new = timed(lambda k: sample(logits, [RowDraw(p, i, k) for i in range(rows)]))
    return {"sampler_rows": rows, "sampler_vocab": vocab, "sampler_device": device,
            "sampler_host_step_s": round(old, 4), "sampler_batched_step_s": round(new, 4),
            "sampler_speedup_b32_v152k": round(old / new, 1)}


def stall_figures(model, ahead: int, burst: int = 8) -> dict:
    """``itl_stall_ratio``: the longest gap between two tokens of a running stream (two of its decode steps) while
    ``burst`` new 32-frame requests arrive at once, until each has its first token, over the time one such request
    takes alone from submit to its first token (same engine, same run); features are never cached."""
    from video_llava.engine import Engine, Finished, SamplingParams, TextPiece

    engine = Engine(model, max_running=burst + 1, preprocess_ahead=ahead)
    try:
        def first_token(prepared) -> float:
            got = threading.Event()
            start = time.perf_counter()
            engine.submit(prepared, SamplingParams(1), lambda e: got.set() if isinstance(e, Finished) else None)
            got.wait(600)
            return time.perf_counter() - start

        first_token(model.prepare(clip(100), QUESTIONS[0], 1))  # warm-up
        alone = first_token(model.prepare(clip(101), QUESTIONS[0], 1))
        streaming = threading.Event()
        engine.submit(model.prepare(clip(102, 16), QUESTIONS[2], 4000), SamplingParams(4000, ignore_eos=True),
                      lambda e: streaming.set() if isinstance(e, TextPiece) else None)
        streaming.wait(600)
        time.sleep(0.2)
        start = time.perf_counter()
        results = engine.run([model.prepare(clip(200 + i), QUESTIONS[0], 1) for i in range(burst)], SamplingParams(1))
        end = time.perf_counter()
        assert all(isinstance(r, tuple) for r in results), results
        steps = [w.started for w in engine.recent_steps() if w.rows]  # the stream decodes in each of these
        window = [t for t in steps if start <= t <= end]
        times = [t for t in steps if t < start][-1:] + window + [next((t for t in steps if t > end), end)]
        stall = max(b - a for a, b in zip(times, times[1:]))
        return {"alone_ttft_s": round(alone, 4), "longest_gap_s": round(stall, 4),
                "burst_all_first_s": round(end - start, 4), "itl_stall_ratio": round(stall / alone, 3)}
    finally:
        engine.close()


def kv_mixed_figures(model) -> dict:
    """``kv_bytes_ratio_mixed``: the KV the running batch's buffers hold while one 32-frame video and 15 4-frame
    questions decode together (64 tokens each), over what their own tokens need."""
    from video_llava.engine import Engine, SamplingParams

    prepared = [model.prepare(clip(300), QUESTIONS[0], 64)] + \
        [model.prepare(clip(301 + i, 4), QUESTIONS[0], 64) for i in range(15)]
    engine = Engine(model, max_running=16)
    try:
        engine.run(prepared, SamplingParams(64, ignore_eos=True))
        held = engine.stats.kv_positions
    finally:
        engine.close()
    own = sum(p.prompt_tokens + p.visual_tokens + 64 for p in prepared)
    return {"kv_positions_held": held, "kv_positions_own": own, "kv_bytes_ratio_mixed": round(held / own, 2)}


def pruning_figures(model, rates: list[float], c: int, new_tokens: int) -> dict:
    """Per rate: the prompt tokens, vision + prefill alone, and the engine's burst of the same ``c`` requests."""
    from video_llava.engine import Engine, SamplingParams
    from video_llava.model.pruning import VideoPruning

    params = SamplingParams(new_tokens, ignore_eos=True)
    out: dict = {}
    for rate in rates:
        prepared = [model.prepare(clip(i, 16 if i % 2 else 32), QUESTIONS[i % len(QUESTIONS)], new_tokens,
                                  VideoPruning(rate)) for i in range(c)]
        tokens = sum(p.visual_tokens + p.prompt_tokens for p in prepared)
        ceiling = ceiling_videos_per_s(model, prepared)
        engine = Engine(model, max_running=c)
        try:
            burst = run_engine(engine, prepared, params, 0.0)
        finally:
            engine.close()
        out[str(rate)] = {"prompt_tokens": tokens, "prefill_tokens_per_s": round(tokens * ceiling / c, 1),
                          "vision_prefill_s_per_request": round(1 / ceiling, 4), **burst}
        print(f"rate {rate}: {out[str(rate)]}", flush=True)
    base = out[str(rates[0])]
    for figures in out.values():
        figures["requests_per_s_ratio"] = round(figures["requests_per_s"] / base["requests_per_s"], 2)
        figures["ttft_p50_ratio"] = round(figures["ttft_p50_s"] / base["ttft_p50_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="8 requests, 16 new tokens")
    parser.add_argument("--video-prune-rates", type=float, nargs="+", default=None,
                        help="only the video token budget: these rates side by side (the first is the baseline)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from video_llava.engine import Engine, SamplingParams
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    c, new_tokens = (8, 16) if args.quick else (args.concurrency, args.new_tokens)
    machine = describe_machine(("torch", "transformers"))
    machine["torch_threads"] = torch.get_num_threads()
    print(f"machine: {machine['cpu']} x{machine['cpus']} ({machine['torch_threads']} torch threads); "
          f"torch {machine['torch']}, transformers {machine['transformers']}", flush=True)
    model = VideoQAModel(ModelSettings(model=args.model, max_new_tokens=new_tokens, feature_cache_mb=0))
    if args.video_prune_rates:
        model.generate(make_requests(model, 1, new_tokens))  # warm-up
        figures = {"bench": "engine_pruning", "machine": machine, "model": args.model, "requests": c,
                   "new_tokens": new_tokens, "frames": [16, 32],
                   "rates": pruning_figures(model, args.video_prune_rates, c, new_tokens)}
        if args.json:
            print(json.dumps(figures))
        return
    prepared = make_requests(model, c, new_tokens)
    params = SamplingParams(new_tokens, ignore_eos=True)
    model.generate(prepared[:1])  # warm-up

    start = time.perf_counter()
    for p in prepared:  # the plain path: transformers' generate, one request at a time, as long as the engine's
        embeds, mask, _, _ = model.embedder([p])
        with torch.inference_mode():
            model.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    plain_s = time.perf_counter() - start
    figures: dict = {"bench": "engine", "machine": machine, "model": args.model, "requests": c,
                     "new_tokens": new_tokens, "frames": [16, 32]}
    figures.update(sampler_figures())
    for ahead in (0, 8):
        figures[f"stall_preprocess_ahead_{ahead}"] = stall_figures(model, ahead)
    figures["itl_stall_ratio"] = figures["stall_preprocess_ahead_0"]["itl_stall_ratio"]
    figures.update(kv_mixed_figures(model))
    print(f"stall: {figures['stall_preprocess_ahead_0']} (media in the loop), {figures['stall_preprocess_ahead_8']} "
          f"(made ahead); KV held {figures['kv_bytes_ratio_mixed']}x what the rows need", flush=True)
    print(f"sampler: {figures['sampler_batched_step_s']} s a step for 32 rows over 152k tokens, "
          f"{figures['sampler_speedup_b32_v152k']}x the host path ({figures['sampler_host_step_s']} s)", flush=True)
    ceiling = ceiling_videos_per_s(model, prepared)
    runs = {}
    large = {"max_num_batched_tokens": 4096, "max_num_vision_frames": 32}  # fewer, larger steps: more throughput,
    for name, running, spread, ahead, budgets in (  # longer stalls (itl_stall_ratio 0.76-1.2 at 2048/32 on 2 cores)
            ("engine_burst", c, 0.0, 0, {}), ("engine_burst_preprocess_ahead", c, 0.0, 8, {}),
            ("engine_burst_large_budgets", c, 0.0, 0, large), ("engine_spread", c, None, 0, {}),
            ("one_at_a_time", 1, 0.0, 0, {})):
        engine = Engine(model, max_running=running, preprocess_ahead=ahead, **budgets)
        try:
            if spread is None:  # arrivals over about half the burst's wall time
                spread = runs["engine_burst"]["wall_s"] / 2
            runs[name] = run_engine(engine, prepared, params, spread)
        finally:
            engine.close()
        print(f"{name:>14}: {runs[name]}", flush=True)
    tokens = c * new_tokens
    figures["runs"] = runs
    figures["engine_speedup"] = round(runs["one_at_a_time"]["wall_s"] / runs["engine_burst"]["wall_s"], 2)
    figures["engine_tokens_per_s"] = round(tokens / runs["engine_burst"]["wall_s"], 1)
    figures["engine_speedup_large_budgets"] = round(
        runs["one_at_a_time"]["wall_s"] / runs["engine_burst_large_budgets"]["wall_s"], 2)
    figures["engine_speedup_preprocess_ahead"] = round(
        runs["one_at_a_time"]["wall_s"] / runs["engine_burst_preprocess_ahead"]["wall_s"], 2)
    # the most any schedule of the decode steps can give: every request's vision pass and prefill still run
    figures["vision_prefill_only_s"] = round(c / ceiling, 3)
    figures["engine_speedup_ceiling"] = round(runs["one_at_a_time"]["wall_s"] * ceiling / c, 2)
    figures["plain_generate_loop_s"] = round(plain_s, 3)
    figures["engine_vs_plain_generate_loop"] = round(plain_s / runs["engine_burst"]["wall_s"], 2)
    figures["ttft_p50_spread_s"] = runs["engine_spread"]["ttft_p50_s"]
    figures["ttft_p99_spread_s"] = runs["engine_spread"]["ttft_p99_s"]
    print(f"engine {figures['engine_speedup']}x one-at-a-time at c={c} ({new_tokens} tokens each, "
          f"{figures['engine_tokens_per_s']} tokens/s); TTFT p50 {figures['ttft_p50_spread_s']}s, "
          f"p99 {figures['ttft_p99_spread_s']}s with spread arrivals; {figures['engine_speedup_preprocess_ahead']}x "
          f"preprocessing ahead; at most {figures['engine_speedup_ceiling']}x (vision + prefill alone take "
          f"{figures['vision_prefill_only_s']}s)", flush=True)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
