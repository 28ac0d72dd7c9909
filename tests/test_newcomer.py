"""What a newcomer runs from the README works as written, and what fails says why in words they can act on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

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
