"""The ``video-llava`` command, end to end in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "video_llava" / "assets" / "sample.mp4"


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VIDEO_LLAVA_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "video_llava.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_bundled_sample_is_small_and_decodes():
    from video_llava.video.decode import sample_video

    assert SAMPLE.stat().st_size < 100_000
    assert sample_video(SAMPLE).metadata.frame_count == 48


def test_ask_json_answers_with_token_counts(embedded_cache):
    result = run_cli("ask", str(SAMPLE), "What color is the circle?", "--frames", "16", "--max-new-tokens", "8", "--json", cache=embedded_cache)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(out["answer"], str)
    assert out["num_frames"] == 16 and out["visual_tokens"] == 16 * 144
    assert 1 <= out["completion_tokens"] <= 8
    assert out["model"] == "embedded" and out["video"]["frame_count"] == 48


def test_ask_prints_the_answer_on_stdout(embedded_cache):
    result = run_cli("ask", str(SAMPLE), "What color is the circle?", "--max-new-tokens", "4", cache=embedded_cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != "" or "completion" in result.stderr
    assert "32 frames" in result.stderr


def test_info_json_reports_indices_timestamps_and_budget(embedded_cache):
    result = run_cli("info", str(SAMPLE), "--frames", "8", "--json", cache=embedded_cache)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["sampled_indices"] == [0, 7, 13, 20, 27, 34, 40, 47]
    assert info["timestamps"] == pytest.approx([i / 12 for i in info["sampled_indices"]], abs=1e-3)
    assert info["visual_tokens"] == 8 * 144 and info["fits_context"] is True
    assert info["context"] == 12288 and info["rope_scaling_factor"] == 3.0
    assert (info["width"], info["height"], info["fps"], info["duration"]) == (320, 240, 12.0, 4.0)


def test_info_says_when_a_video_does_not_fit(embedded_cache, tmp_path):
    from tests.conftest import shapes_video

    long_clip = shapes_video(tmp_path / "long.mp4", num_frames=240, width=64, height=48)
    result = run_cli("info", str(long_clip), "--frames", "200", "--max-frames", "512", "--rope-factor", "3", "--json", cache=embedded_cache)
    assert result.returncode == 2, result.stderr  # the figures, and an exit status that says it does not fit
    info = json.loads(result.stdout)
    assert info["fits_context"] is False and info["num_sampled"] == 200
    assert 80 <= info["max_frames_that_fit"] <= 84 and "use at most" in info["budget_error"]


@pytest.mark.parametrize(
    "make_input,expected",
    [
        (lambda d: d / "missing.mp4", "no such file"),
        (lambda d: (d / "notes.mp4").write_text("hello") and d / "notes.mp4", "not a readable video"),
        (lambda d: (d / "empty.mp4").write_bytes(b"") or d / "empty.mp4", "empty file"),
    ],
)
def test_bad_video_prints_one_error_line_and_exits_nonzero(embedded_cache, tmp_path, make_input, expected):
    path = make_input(tmp_path)
    result = run_cli("ask", str(path), "What?", cache=embedded_cache)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0]


def test_too_many_frames_is_refused_with_the_budget(embedded_cache, tmp_path):
    from tests.conftest import shapes_video

    clip = shapes_video(tmp_path / "long.mp4", num_frames=240, width=64, height=48)
    result = run_cli("ask", str(clip), "What?", "--frames", "200", cache=embedded_cache)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "exceeds max_frames=56" in result.stderr and "use at most 56 frames" in result.stderr


def test_more_frames_than_max_frames_are_refused_even_when_the_clip_is_shorter(embedded_cache):
    result = run_cli("ask", str(SAMPLE), "What?", "--frames", "200", cache=embedded_cache)  # 48 frames in the clip
    assert result.returncode == 2 and "Traceback" not in result.stderr  # as the service's 400 too_many_frames
    assert "exceeds max_frames=56" in result.stderr and "use at most 56 frames" in result.stderr


def test_invalid_options_are_one_line_errors(embedded_cache):
    result = run_cli("ask", str(SAMPLE), "What?", "--frames", "0", cache=embedded_cache)
    assert result.returncode == 2 and result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr


def test_info_counts_a_question_exactly_as_ask_does(embedded_cache):
    question = "What color is the circle?"
    asked = run_cli("ask", str(SAMPLE), question, "--frames", "8", "--max-new-tokens", "2", "--json", cache=embedded_cache)
    info = run_cli("info", str(SAMPLE), "--question", question, "--frames", "8", "--max-new-tokens", "2", "--json",
                   cache=embedded_cache)
    asked, info = json.loads(asked.stdout.strip().splitlines()[-1]), json.loads(info.stdout)
    assert (info["visual_tokens"], info["prompt_tokens"]) == (asked["visual_tokens"], asked["prompt_tokens"])
    assert info["tokens_needed"] == asked["visual_tokens"] + asked["prompt_tokens"] + 2


def test_info_counts_the_video_tokens_a_budget_keeps_and_refuses_one_below_a_frame(embedded_cache):
    """(The library counts them as the engine runs them: tests/test_video_pruning.py.)"""
    info = run_cli("info", str(SAMPLE), "--frames", "8", "--video-pruning-rate", "0.5", "--video-tokens", "500",
                   "--max-new-tokens", "2", "--json", cache=embedded_cache)
    counted = json.loads(info.stdout)
    assert (counted["visual_tokens"], counted["video_tokens_pruned"]) == (500, 652)  # the smaller of 576 and 500
    assert counted["tokens_needed"] == 500 + counted["prompt_tokens"] + 2
    result = run_cli("info", str(SAMPLE), "--frames", "8", "--video-tokens", "100", cache=embedded_cache)
    assert result.returncode == 2 and "video_token_budget=100 is below one frame's 144 tokens" in result.stderr


@pytest.mark.parametrize("command", ["ask", "info"])
def test_a_question_with_a_media_placeholder_is_a_one_line_bad_input_error(embedded_cache, command):
    question = ["Describe <video> it."] if command == "ask" else ["--question", "Describe <video> it."]
    result = run_cli(command, str(SAMPLE), *question, "--frames", "4", cache=embedded_cache)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: the question contains '<video>'"), result.stderr


def test_unknown_model_is_a_one_line_error(embedded_cache):
    result = run_cli("ask", str(SAMPLE), "What?", "--model", "nobody/none", cache=embedded_cache)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: cannot load model")


@pytest.mark.slow
def test_make_demo_entry_point_answers_over_rest_and_shuts_down(embedded_cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VIDEO_LLAVA_CACHE": str(embedded_cache), "RAY_AUTH_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-m", "video_llava.demo", "--question", "What color is the circle?"],
        capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "answer: " in result.stdout and "32 frames" in result.stdout
    assert "== shutting down" in result.stdout
    output = result.stdout + result.stderr  # a fresh start and a clean stop, with nothing that reads like a fault
    assert "Connecting to existing Serve app" not in output and "graceful_shutdown failed" not in output


def test_ask_and_info_take_an_image_with_any_familys_checkpoint(embedded_cache, tiny_checkpoint, tmp_path):
    from PIL import Image

    from video_llava.video.decode import sample_video

    photo = tmp_path / "photo.png"
    Image.fromarray(sample_video(SAMPLE).frames[0]).save(photo)
    llava = str(tiny_checkpoint("llava"))
    result = run_cli("ask", str(photo), "What is it?", "--model", llava, "--max-new-tokens", "3", "--json",
                     cache=embedded_cache)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["num_frames"] == 0 and out["visual_tokens"] == 576 and out["image"]["format"] == "PNG"
    info = json.loads(run_cli("info", str(photo), "--model", llava, "--json", cache=embedded_cache).stdout)
    assert info["kind"] == "image" and info["family"] == "LLaVA-1.5" and info["visual_tokens"] == 576
    refused = run_cli("ask", str(SAMPLE), "What happens?", "--model", llava, cache=embedded_cache)
    assert refused.returncode == 2 and "takes images, not videos" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_seeded_sampled_answer_from_the_cli_is_the_librarys(embedded_cache, embedded_model, tmp_path):
    """One generation path: ``ask`` runs on the engine as the library's ``answer`` does (and the service: the families
    test), so a sampled answer with a seed is the same from either."""
    from PIL import Image

    from video_llava.video.decode import sample_video

    photo = tmp_path / "photo.png"
    pixels = sample_video(SAMPLE).frames[0]
    Image.fromarray(pixels).save(photo)
    result = run_cli("ask", str(photo), "What is it?", "--max-new-tokens", "12", "--temperature", "1.0",
                     "--top-p", "0.9", "--seed", "5", "--json", cache=embedded_cache)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    (answer,) = embedded_model.answer([pixels], ["What is it?"], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    assert out["answer"] == answer.text
