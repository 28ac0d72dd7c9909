"""Benchmarks stay runnable: a quick run ends with one JSON object of its figures (speed itself is not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_onevision_gpu_bench_runs_on_a_cpu_with_the_tiny_shape():
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_families", "--shape", "tiny", "--frames", "2", "--batch", "2",
         "--new-tokens", "2", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["family"] == "LLaVA-OneVision" and figures["rope_factor"] == 1.0
    assert figures["visual_tokens_per_video"] == 2 * 196 + 1
    assert figures["vision_ms_per_frame"] > 0 and figures["prefill_tokens_per_s"] > 0 and figures["batched_speedup"] > 0


def test_the_gpu_engine_bench_runs_on_a_cpu_with_the_tiny_shape():
    result = subprocess.run([sys.executable, "-m", "bench.gpu_engine", "--shape", "tiny", "--frames", "2", "--requests",
                             "4", "--tokens", "2", "4", "--decode-modes", "dynamic", "static", "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["new_tokens_2"]["ceiling_videos_per_s"] > 0 and figures["new_tokens_4"]["vs_one_at_a_time"] > 0
    assert figures["new_tokens_4"]["decode_static"]["same_tokens"] == "4/4"  # float32 on a CPU: identical
    assert figures["new_tokens_4"]["burst"]["most_running"] == 4
    assert figures["device_preprocessing"]["max_abs_diff"] == 0.0  # on a CPU the two paths are one


def test_the_engine_bench_quick_run_ends_with_its_figures_as_json():
    result = subprocess.run([sys.executable, "-m", "bench.engine", "--quick", "--json"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["runs"]["engine_burst"]["most_running"] > 1 and figures["runs"]["one_at_a_time"]["most_running"] == 1
    assert figures["engine_speedup"] > 0 and figures["ttft_p99_spread_s"] >= figures["ttft_p50_spread_s"] > 0
    assert figures["runs"]["engine_burst_preprocess_ahead"]["most_running"] > 1
    assert figures["engine_speedup_ceiling"] > 0 and figures["vision_prefill_only_s"] > 0


@pytest.mark.slow
def test_decode_bench_quick_run_ends_with_its_figures_as_json():
    result = subprocess.run(
        [sys.executable, "-m", "bench.decode", "--quick", "--repeat", "1", "--frames", "16", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "decode" and figures["machine"]["cpus"] >= 1
    assert {row["frames"] for row in figures["rows"]} == {16}
    assert all(row["decord_ms"] > 0 and row["pyav_ms"] > 0 for row in figures["rows"])


@pytest.mark.slow
def test_serve_bench_quick_run_reports_the_ratios_the_readme_quotes():
    result = subprocess.run(
        [sys.executable, "-m", "bench.serve", "--quick", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["engine_speedup_c8"] > 0 and figures["service_vs_library_loop"] > 0
    assert figures["repeat_question_latency_ratio"] > 0
    assert figures["ttft_p99_s_c8"] >= figures["ttft_p50_s_c8"] > 0


@pytest.mark.slow
def test_caption_bench_small_run_reports_both_rates():
    result = subprocess.run(
        [sys.executable, "-m", "bench.caption", "--videos", "4", "--decode-workers", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["sequential_videos_per_s"] > 0 and figures["pipeline"][0]["videos_per_s"] > 0


@pytest.mark.slow
def test_gpu_bench_runs_on_a_cpu_with_the_tiny_shape():
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--shape", "tiny", "--frames", "2", "--batch", "2", "--new-tokens", "3",
         "--repeat", "1", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "gpu" and figures["device"] == "cpu" and figures["tokens_per_frame"] == 144
    row = figures["rows"][0]
    assert row["frames"] == 2 and row["prompt_tokens"] > 2 * 144
    assert row["vision_ms_per_frame"] > 0 and row["batched_speedup"] > 0 and row["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_train_bench_reports_sft_and_dpo_throughput_and_memory():
    result = subprocess.run(
        [sys.executable, "-m", "bench.train", "--frames", "2", "--batch", "2", "--steps", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert [row["job"] for row in figures["rows"]] == ["sft", "dpo"]
    assert all(row["samples_per_s"] > 0 and row["peak_memory_gib"] > 0 for row in figures["rows"])


@pytest.mark.slow
def test_gpu_service_bench_runs_the_service_model_path_on_a_cpu():
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_service", "--shape", "tiny", "--frames", "2", "--batch", "2", "--new-tokens", "2",
         "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["device"] == "cpu" and figures["dtype"] == "float32" and figures["attention"] == "sdpa"
    assert figures["visual_tokens_per_video"] == 2 * 144 and figures["batched_speedup"] > 0


@pytest.mark.slow
def test_feature_probe_reports_shape_and_colour_accuracy_per_checkpoint(embedded_cache):
    result = subprocess.run(
        [sys.executable, "-m", "bench.probe_features", "--models", "embedded-init", "embedded", "--clips", "60", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "probe_features" and [row["model"] for row in figures["probe"]] == ["embedded-init", "embedded"]
    for row in figures["probe"]:
        assert row["objects"] >= 60 and 0 <= row["shape_accuracy"] <= 1
        assert row["colour_accuracy"] > 0.8  # a shape's colour is what its tokens show most plainly: far above 0.17
        # on these clips (fixed-size shapes, fully in view) the tokens around a shape tell a circle from a square
        assert 0 <= row["circle_vs_square"] <= 1 and row["circle_vs_square_window"] > 0.8


@pytest.mark.slow
def test_the_engine_bench_sets_video_pruning_rates_side_by_side():
    result = subprocess.run([sys.executable, "-m", "bench.engine", "--quick", "--video-prune-rates", "0", "0.5", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rates = json.loads(result.stdout.strip().splitlines()[-1])["rates"]
    assert rates["0.5"]["prompt_tokens"] < rates["0.0"]["prompt_tokens"] and rates["0.0"]["requests_per_s_ratio"] == 1.0
