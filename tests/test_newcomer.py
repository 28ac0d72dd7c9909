"""What a newcomer runs from the README works as written, and what fails says why in words they can act on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _python_block(section: str) -> str:
    """The first ```python block under the README heading ``section``."""
    text = README.read_text()
    body = text[text.index(f"\n## {section}\n"):]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def _run_script(path: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VIDEO_LLAVA_CACHE": str(cache)}
    return subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_python_snippet_runs_when_saved_as_a_script(tmp_path, embedded_cache):
    script = tmp_path / "snippet.py"
    script.write_text(_python_block("Python"))
    result = _run_script(script, embedded_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    text, visual, completion = result.stdout.strip().splitlines()[-1].rsplit(" ", 2)
    assert text and int(visual) == 32 * 144 and int(completion) >= 1


def test_a_script_without_a_main_guard_is_told_the_decoder_could_not_start_not_that_the_file_is_corrupt(tmp_path, embedded_cache):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        from video_llava.video import DecodeOptions, IsolatedDecoder

        with IsolatedDecoder(workers=1, timeout_s=60) as decoder:
            print(decoder.decode("video_llava/assets/sample.mp4", DecodeOptions(num_frames=4)).num_frames)
    """))
    result = _run_script(script, embedded_cache)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "DecoderStartError" in last and "could not start" in last and '__name__ == "__main__"' in last, last
    assert "corrupt" not in result.stderr


def _job(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VIDEO_LLAVA_CACHE": str(cache), "RAY_AUTH_MODE": "disabled",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_gpu_flags_on_a_machine_without_a_gpu_fail_at_once_saying_what_is_missing(tmp_path, embedded_cache):
    from jobs.make_synthetic import SyntheticConfig
    from jobs.make_synthetic import main as make_synthetic

    data = tmp_path / "data"
    make_synthetic(SyntheticConfig(output=data, train=2, val=0, test=0, seed=1))
    caption = _job("jobs.caption", "--input", str(data / "videos"), "--output", str(tmp_path / "out"), "--num-gpus", "1",
                   cache=embedded_cache)
    assert caption.returncode == 2, caption.stderr[-2000:]
    last = caption.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--num-gpus 1" in last and "needs 1 CPU, 1 GPU" in last and "0 GPU" in last
    sft = _job("jobs.sft", "--data", str(data), "--output", str(tmp_path / "runs"), "--num-workers", "4", "--use-gpu",
               cache=embedded_cache)
    assert sft.returncode == 2, sft.stderr[-2000:]
    last = sft.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--num-workers 4" in last and "4 GPU" in last and "0 GPU" in last


def test_caption_show_on_a_mistyped_output_path_says_there_is_no_output(tmp_path, capsys):
    from jobs.caption import cli

    assert cli(["--output", str(tmp_path / "captons"), "--show"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no caption output at") and "captons" in err


def test_a_missing_required_flag_is_named_in_one_line_not_a_pydantic_dump(tmp_path, capsys):
    from jobs.caption import cli as caption
    from jobs.sft import cli as sft

    assert caption(["--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: invalid arguments: --input: required"
    assert sft(["--data", str(tmp_path), "--output", str(tmp_path), "--frames", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: invalid arguments: --frames: Input should be greater than or equal to 1"


# What the README's training commands change to run in a minute: tiny counts, and the flags of a 2-core machine.
TINY = {"--train": "8", "--val": "0", "--test": "8", "--max-steps": "2", "--samples": "4"}
EXTRA = {
    "jobs.sft": ["--batch-size", "2", "--frames", "2", "--cpus-per-worker", "1", "--log-every", "1"],
    "jobs.make_preferences": ["--frames", "2", "--limit", "8", "--max-new-tokens", "4"],
    "jobs.dpo": ["--max-steps", "2", "--batch-size", "2", "--frames", "2", "--cpus-per-worker", "1"],
    "jobs.eval": ["--frames", "2", "--max-new-tokens", "4"],
}


def _readme_commands(section: str) -> list[list[str]]:
    import shlex

    text = README.read_text()
    body = text[text.index(f"\n## {section}"):]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("python -m jobs.")]


def _tiny(argv: list[str], root: Path) -> list[str]:
    out = []
    for i, token in enumerate(argv):
        if i and argv[i - 1] in TINY:
            token = TINY[argv[i - 1]]
        elif token.startswith(("data/", "runs")):
            token = str(root / token)
        elif token == "embedded-init":
            token = "embedded"  # two steps from the untrained model would answer alike: no preference pairs
        out.append(token)
    return out + EXTRA.get(argv[2], [])


@pytest.mark.slow
def test_the_readme_training_chain_runs_as_written_with_tiny_step_counts(tmp_path, embedded_cache):
    commands = _readme_commands("Training")
    assert [c[2] for c in commands] == ["jobs.make_synthetic", "jobs.sft", "jobs.make_preferences", "jobs.dpo",
                                        "jobs.eval", "jobs.expand_llm"]
    for argv in commands:
        result = _job(*_tiny(argv, tmp_path)[2:], cache=embedded_cache)
        assert result.returncode == 0, (argv, result.stderr[-3000:])
        if argv[2] == "jobs.sft":  # a progress line per --log-every steps, and Ray's and transformers' noise kept out
            progress = re.findall(r"sft: step (\d+)/2 loss [\d.]+ [\d.]+ samples/s ETA \d+m\d\ds", result.stdout)
            assert progress == ["1", "2"], result.stdout[-3000:]
            output = result.stdout + result.stderr
            assert "Starting execution of Dataset" not in output and "Loading weights" not in output
    assert (tmp_path / "runs" / "dpo" / "model" / "config.json").exists()
    assert json.loads((tmp_path / "runs" / "eval-dpo.json").read_text())["all"]["n"] == 8
    assert (tmp_path / "runs" / "sft-4-blocks" / "config.json").exists()


CAPTION = re.compile(r"^The video shows two shapes on a light background: an? \w+ \w+ moving \w+ and an? \w+ \w+ moving \w+\.$")


def test_the_default_model_captions_the_bundled_clip_in_a_whole_sentence(embedded_cache):
    sample = ROOT / "video_llava" / "assets" / "sample.mp4"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VIDEO_LLAVA_CACHE": str(embedded_cache)}
    result = subprocess.run([sys.executable, "-m", "video_llava.cli", "ask", str(sample), "Describe the video in detail.",
                             "--max-new-tokens", "64"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert CAPTION.match(result.stdout.strip()), result.stdout


@pytest.mark.slow
def test_the_caption_quick_start_gives_the_bundled_clip_a_whole_caption(tmp_path, embedded_cache):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "sample.mp4").write_bytes((ROOT / "video_llava" / "assets" / "sample.mp4").read_bytes())
    run = _job("jobs.caption", "--input", str(videos), "--output", str(tmp_path / "captions"), cache=embedded_cache)
    assert run.returncode == 0, run.stderr[-3000:]
    show = _job("jobs.caption", "--output", str(tmp_path / "captions"), "--show", cache=embedded_cache)
    (row,) = [json.loads(line) for line in show.stdout.splitlines()]
    assert row["status"] == "ok" and CAPTION.match(row["caption"]), row["caption"]
