"""Benchmarks stay runnable: a quick run ends with one JSON object of its figures (speed itself is not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_decode_bench_quick_run_ends_with_its_figures_as_json():
    result = subprocess.run(
        [sys.executable, "bench/decode.py", "--quick", "--repeat", "1", "--frames", "16", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "decode" and figures["machine"]["cpus"] >= 1
    assert {row["frames"] for row in figures["rows"]} == {16}
    assert all(row["decord_ms"] > 0 and row["pyav_ms"] > 0 for row in figures["rows"])
