"""The captions-to-DPO loop over a directory of real video files, each hop a job, with the embedded default serving
as captioner, question writer and judge through a real service on 127.0.0.1 (the mechanics, not the quality)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.live_service import SAMPLE, running_service
from tests.test_preferences_dpo import run_job
from video_llava.data.synthetic_video import SAMPLE_SHAPES, MovingShape, render_frames, write_video

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service():
    args = {"model": {"model": "embedded", "num_frames": 8}, "served_model_names": ["writer"],
            "deployment": {"num_cpus": 0.5, "ingress_num_cpus": 0.25}}
    with running_service(args) as base:
        yield base


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """The bundled clip and four rendered ones, as files in nested directories (as a bucket holds them)."""
    root = tmp_path_factory.mktemp("bucket")
    (root / "clips" / "b").mkdir(parents=True)
    shutil.copy(SAMPLE, root / "clips" / "sample.mp4")
    for k, shapes in enumerate([SAMPLE_SHAPES, [MovingShape("square", "blue", "down")],
                                [MovingShape("triangle", "green", "left")], [MovingShape("circle", "yellow", "up")]]):
        write_video(root / "clips" / ("b" if k % 2 else "") / f"v{k}.mp4",
                    render_frames(shapes, num_frames=12, width=96, height=72))
    return root


def test_captions_become_records_questions_pairs_a_dpo_model_and_an_evaluation(service, videos, tmp_path,
                                                                                embedded_cache, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "none")  # the service needs no key; the jobs read one
    endpoint = ["--judge", "openai", "--judge-url", f"{service}/v1", "--judge-model", "writer"]

    def job(module: str, *args: str, figures: Path | None = None) -> dict:
        """Run a job; its figures: the JSON file it writes, else its last line."""
        result = run_job(module, *args, cache=embedded_cache)
        assert result.returncode == 0, (module, (result.stdout + result.stderr)[-3000:])
        return json.loads(figures.read_text() if figures else result.stdout.strip().splitlines()[-1])

    captions = tmp_path / "captions"
    manifest = job("jobs.caption", "--input", str(videos), "--output", str(captions), "--frames", "4",
                   "--max-new-tokens", "24", "--num-cpus", "2", figures=captions / "_manifest.json")
    assert manifest["ok"] == 5
    from jobs.make_questions import MakeQuestionsConfig
    from jobs.make_questions import main as make_questions
    from jobs.make_records import MakeRecordsConfig
    from jobs.make_records import main as make_records

    # the two hops that need no CPU of Ray's run here, on the service's Ray (the others start their own)
    records = make_records(MakeRecordsConfig(captions=str(captions), output=tmp_path / "records", val_fraction=0.4))
    assert records["records"] == 5 and records["train"] + records["val"] == 5 and records["val"] >= 1
    first = json.loads((tmp_path / "records" / "train.jsonl").read_text().splitlines()[0])
    assert Path(first["video"]).is_file() and first["caption"] and first["conversations"][1]["value"] == first["caption"]

    questions = make_questions(MakeQuestionsConfig(data=tmp_path / "records", output=tmp_path / "qa", questions=2,
                                                   llm_url=f"{service}/v1", llm_model="writer", concurrency=2))
    assert questions["train"]["questions"] >= records["train"] and questions["train"]["errors"] == 0
    asked = [json.loads(line) for line in (tmp_path / "qa" / "train.jsonl").read_text().splitlines()]
    assert all(r["conversations"][0]["value"].startswith("<video>\n") and r["caption"] for r in asked)
    assert {r["source"] for r in asked} == {json.loads(line)["id"] for line in
                                             (tmp_path / "records" / "train.jsonl").read_text().splitlines()}

    prefs = job("jobs.make_preferences", "--data", str(tmp_path / "qa"), "--output", str(tmp_path / "prefs"),
                "--samples", "4", "--frames", "4", "--max-new-tokens", "8", "--num-cpus", "2", *endpoint,
                figures=tmp_path / "prefs" / "summary.json")
    assert prefs["errors"] == 0 and prefs["pairs"] >= 1  # the judge's replies parsed (JSON of a schema)
    result = run_job("jobs.dpo", "--preferences", str(tmp_path / "prefs"), "--model", "embedded",
                     "--output", str(tmp_path / "runs"),
                     "--name", "dpo", "--max-steps", "2", "--batch-size", "2", "--frames", "4", "--checkpoint-every", "2",
                     cache=embedded_cache)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    model = tmp_path / "runs" / "dpo" / "model"
    figures = job("jobs.eval", "--data", str(tmp_path / "qa"), "--split", "val", "--model", str(model),
                  "--frames", "4", "--max-new-tokens", "8", "--num-cpus", "2", *endpoint)
    assert figures["all"]["n"] == questions["val"]["questions"] and figures["all"]["errors"] == 0
    assert figures["all"]["mean_reward"] is not None  # every answer judged by the service
    assert os.path.isdir(model)
