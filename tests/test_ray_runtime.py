"""Starting a private Ray: what a start that timed out leaves behind is stopped, and what the raylet logged is shown."""

import subprocess
import sys

from video_llava.ray_runtime import _log_tails, _stop_processes_of


def test_the_processes_a_failed_start_left_are_stopped_and_no_other(tmp_path):
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", f"--session_dir={tmp_path}/s"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _stop_processes_of(str(tmp_path))
        assert ours.wait(timeout=30) != 0
        assert other.poll() is None
    finally:
        ours.kill()
        other.kill()


def test_the_raylets_and_the_gcs_logs_are_shown_by_their_last_lines(tmp_path):
    logs = tmp_path / "session_2026" / "logs"
    logs.mkdir(parents=True)
    (logs / "raylet.err").write_text("".join(f"line {i}\n" for i in range(40)) + "bind: address already in use\n")
    (logs / "gcs_server.out").write_text("gcs started\n")
    (logs / "worker-1.out").write_text("not shown\n")
    tail = _log_tails(str(tmp_path))
    assert "--- raylet.err" in tail and "bind: address already in use" in tail and "line 39" in tail
    assert "line 10" not in tail  # the last lines only
    assert "gcs started" in tail and "not shown" not in tail
    assert _log_tails(str(tmp_path / "none")) == "(no raylet or GCS log)"
