"""Jobs run on a Ray cluster through the stock client: `ray start --head` then `ray job submit`."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.local_cluster import free_port, stop_cluster

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster(embedded_cache):
    """A local one-node cluster with the job server, as `ray start --head` makes it."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "VIDEO_LLAVA_CACHE": str(embedded_cache),
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    dashboard, port = free_port(), free_port()
    start = [str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(port),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
             "--temp-dir", tempfile.mkdtemp(prefix="ray-", dir="/tmp")]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 300  # on a loaded 2-core machine the agent has taken over two minutes
    while True:  # the job agent comes up some seconds after `ray start` returns
        probe = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"], env=env,
                               capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            break
        if time.time() > deadline:
            stop_cluster(port)
            pytest.fail(f"the cluster's job agent did not take a job in 300 s: {probe.stderr[-500:]}")
        time.sleep(2)
    yield address, env
    stop_cluster(port)


def test_caption_job_submitted_with_ray_job_submit_succeeds(cluster, tmp_path):
    address, env = cluster
    from video_llava.data.synthetic_video import SAMPLE_SHAPES, render_frames, write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        write_video(videos / f"clip{i}.mp4", render_frames(SAMPLE_SHAPES, num_frames=12, fps=12, width=96, height=64))
    runtime_env = '{"env_vars": {"HF_HUB_OFFLINE": "1"}, "excludes": [".venv", ".git", "tests", "bench"]}'
    result = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env-json", runtime_env,
         "--", "python", "-m", "jobs.caption", "--input", str(videos), "--output", str(tmp_path / "out"),
         "--frames", "4", "--max-new-tokens", "4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "succeeded" in result.stdout.lower()
    assert "3 captioned this run" in result.stdout
    assert (tmp_path / "out" / "_manifest.json").exists()


def _submit(address: str, env: dict, *args: str, env_vars: dict | None = None) -> subprocess.CompletedProcess:
    import json

    runtime_env = json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1", **(env_vars or {})},
                              "excludes": [".venv", ".git", "tests", "bench", "data", "runs"]})
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env-json",
         runtime_env, "--", "python", "-m", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )


def test_an_sft_job_submitted_with_ray_job_submit_succeeds(cluster, tmp_path):
    from jobs.make_synthetic import SyntheticConfig
    from jobs.make_synthetic import main as make_synthetic

    address, env = cluster
    data = tmp_path / "data"
    make_synthetic(SyntheticConfig(output=data, train=4, val=0, test=0, seed=2))
    sft = _submit(address, env, "jobs.sft", "--data", str(data), "--output", str(tmp_path / "runs"), "--name", "sft",
                  "--max-steps", "2", "--batch-size", "2", "--frames", "2", "--cpus-per-worker", "1")
    assert sft.returncode == 0, (sft.stdout + sft.stderr)[-3000:]
    assert "succeeded" in sft.stdout.lower() and "finished at step 2" in sft.stdout
    # (DPO is submitted the same way; tests/test_captions_to_dpo.py runs it on another run's output.)


def test_a_submitted_job_given_the_readmes_relative_paths_says_to_use_shared_storage(cluster):
    address, env = cluster
    result = _submit(address, env, "jobs.dpo", "--preferences", "runs/prefs", "--model", "runs/sft/model",
                     "--output", "runs", "--name", "dpo")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "relative paths in a submitted job (--output runs, --preferences runs/prefs)" in out, out[-3000:]
    assert "shared storage" in out
    assert "make them with python -m jobs.make_preferences" not in out  # the old, misleading hint


def test_a_submitted_s3_job_without_credentials_says_how_to_pass_them(cluster, tmp_path):
    address, env = cluster
    no_credentials = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "",
                      "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                      "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    result = _submit(address, env, "jobs.caption", "--input", "s3://bucket/videos/", "--output", str(tmp_path / "out"),
                     env_vars=no_credentials)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "no AWS credentials" in out and "--runtime-env-json" in out, out[-3000:]


def test_a_submitted_job_asking_for_gpus_the_cluster_lacks_fails_in_one_line(cluster, tmp_path):
    address, env = cluster
    videos = tmp_path / "videos"
    videos.mkdir()
    from video_llava.data.synthetic_video import SAMPLE_SHAPES, render_frames, write_video

    write_video(videos / "clip.mp4", render_frames(SAMPLE_SHAPES, num_frames=12, fps=12, width=96, height=64))
    result = _submit(address, env, "jobs.caption", "--input", str(videos), "--output", str(tmp_path / "out"),
                     "--num-gpus", "1", env_vars={"VIDEO_LLAVA_RESOURCE_WAIT_S": "3"})
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "error: the caption job (--num-gpus 1) needs 1 CPU, 1 GPU" in out and "0 GPU" in out, out[-3000:]
    assert "Traceback" not in out
