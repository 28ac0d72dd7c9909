"""AI feedback -> DPO -> eval with the real entry points, real Ray and the embedded default on a tiny synthetic set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from jobs.make_synthetic import SyntheticConfig
from jobs.make_synthetic import main as make_synthetic

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def run_job(module: str, *args: str, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "VIDEO_LLAVA_CACHE": str(cache),
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    make_synthetic(SyntheticConfig(output=out, train=10, val=0, test=8, seed=3))
    # One record whose video is not a video: it must come back as an error row, not vanish or stop the job.
    (out / "videos" / "train" / "broken.mp4").write_bytes(b"not a video at all")
    with open(out / "train.jsonl", "a") as f:
        record = {"id": "train-broken", "video": "videos/train/broken.mp4", "caption": "Nothing.", "qa_type": "color",
                  "conversations": [{"from": "human", "value": "<video>\nWhat color is it?"}, {"from": "gpt", "value": "red"}]}
        f.write(json.dumps(record) + "\n")
    return out


@pytest.fixture(scope="module")
def preferences(data, tmp_path_factory, embedded_cache) -> Path:
    out = tmp_path_factory.mktemp("prefs")
    # A high temperature makes the few samples disagree, so this small set yields pairs.
    result = run_job("jobs.make_preferences", "--data", str(data), "--output", str(out), "--samples", "6",
                     "--temperature", "2.0", "--frames", "4", "--max-new-tokens", "4", cache=embedded_cache)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return out


def _rows(prefs: Path) -> list[dict]:
    from video_llava.feedback.pipeline import read_preferences

    return read_preferences(prefs)


def test_every_record_comes_back_with_all_candidates_scored_and_reasoned(preferences):
    rows = _rows(preferences)
    assert len(rows) == 11
    broken = next(r for r in rows if r["id"] == "train-broken")
    assert broken["status"] == "error" and "sample:" in broken["error"]
    for row in rows:
        if row["status"] != "error":
            assert len(row["candidates"]) == len(row["scores"]) == len(row["reasons"]) == 6
            assert all(1 <= s <= 5 for s in row["scores"]) and all(row["reasons"])
    summary = json.loads((preferences / "summary.json").read_text())
    assert summary["records"] == 11 and summary["errors"] == 1
    assert summary["pairs"] + summary["no_pair"] + summary["errors"] == 11


def test_description_pairs_set_a_faithful_description_against_one_that_hallucinates(data, tmp_path, embedded_cache):
    """``--task describe``: sampled descriptions judged against each clip's specification (the spec judge by
    default); every pair's chosen description names nothing the clip lacks and its rejected one does."""
    from video_llava.feedback.description import score_description

    out = tmp_path / "describe-prefs"
    result = run_job("jobs.make_preferences", "--data", str(data), "--output", str(out), "--task", "describe",
                     "--samples", "6", "--temperature", "1.5", "--frames", "4", cache=embedded_cache)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "describe" and summary["judge"] == "spec"
    assert summary["records"] == 10 and summary["errors"] == 0  # the broken record has no shapes to describe
    rows = _rows(out)
    pairs = [r for r in rows if r["status"] == "pair"]
    assert pairs, summary
    for row in rows:
        assert row["question"] == "Describe the video in detail."
    for pair in pairs:
        shapes = json.loads(pair["spec"])
        assert pair["chosen_score"] >= 4 > pair["rejected_score"]
        chosen, rejected = score_description(pair["chosen"], shapes), score_description(pair["rejected"], shapes)
        assert chosen.hallucinated == chosen.wrong_pairs == 0 and rejected.hallucinated + rejected.wrong_pairs > 0


def test_preference_pairs_prefer_the_higher_scored_answer(preferences):
    pairs = [r for r in _rows(preferences) if r["status"] == "pair"]
    assert pairs, "no pairs: the sampled answers all scored the same"
    for pair in pairs:
        assert pair["chosen_score"] > pair["rejected_score"]
        assert pair["chosen_score"] == max(pair["scores"]) and pair["rejected_score"] == min(pair["scores"])
        assert pair["chosen"] in pair["candidates"] and pair["rejected"] in pair["candidates"]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dpo_steps_raise_the_margin_and_a_rerun_resumes_the_step_count(preferences, tmp_path, embedded_cache):
    """With the anchors' options (RPO, warmup then linear decay, clipping, a held-out share scored every 2 steps):
    metrics.jsonl and TensorBoard hold TRL's figures, the learning rate follows the schedule of each run's length,
    the held-out pairs are never trained on, and a rerun resumes the step count."""
    from jobs.dpo import DPOConfig
    from video_llava.data.splits import held_out
    from video_llava.model.embedded import embedded_path

    ids = sorted(r["id"] for r in _rows(preferences) if r["status"] == "pair")
    evaluated = [i for i in ids if held_out(i, 0.3)]
    assert 0 < len(evaluated) < len(ids)
    common = ["--preferences", str(preferences), "--model", str(embedded_path()), "--output", str(tmp_path),
              "--name", "dpo", "--lr", "1e-3", "--batch-size", "2", "--frames", "4", "--checkpoint-every", "2",
              "--rpo-alpha", "0.5", "--warmup-ratio", "0.5", "--lr-schedule", "linear", "--max-grad-norm", "0.5",
              "--eval-fraction", "0.3", "--eval-every", "2"]
    first = run_job("jobs.dpo", *common, "--max-steps", "2", cache=embedded_cache)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert f"{len(ids) - len(evaluated)} pairs ({len(evaluated)} held out), sigmoid loss" in first.stdout
    # the reference scores each pair the run takes once (2 steps of 2), and the held-out ones
    assert f"the reference scored {4 + len(evaluated)} pairs" in first.stdout + first.stderr
    second = run_job("jobs.dpo", *common, "--max-steps", "6", cache=embedded_cache)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    metrics = _metrics(tmp_path / "dpo" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert metrics[-1]["rewards/margins"] > 0.01 and metrics[-1]["loss"] < metrics[0]["loss"]
    trl = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "nll_loss", "grad_norm", "lr"}
    assert all(trl <= set(m) for m in metrics)
    schedule = DPOConfig(preferences="p", model="m", output="o", lr=1e-3, warmup_ratio=0.5, lr_schedule="linear")
    expected = [schedule.lr_at(step, 2) for step in (1, 2)] + [schedule.lr_at(step, 6) for step in (3, 4, 5, 6)]
    assert [m["lr"] for m in metrics] == pytest.approx(expected)
    assert [m["lr"] for m in metrics][2:] == pytest.approx([1e-3, 1e-3 * 3 / 4, 1e-3 / 2, 1e-3 / 4])
    assert all(m["nll_loss"] > 0 and m["grad_norm"] > 0 for m in metrics)
    evals = [m for m in metrics if "eval/rewards/accuracies" in m]
    assert [m["step"] for m in evals] == [2, 4, 6] and all(m["eval/pairs"] == len(evaluated) for m in evals)
    assert evals[0]["eval/logps/chosen"] != evals[-1]["eval/logps/chosen"]  # scored by the policy as it trains
    scalars = _tensorboard_scalars(tmp_path / "dpo" / "tensorboard")
    assert scalars["rewards/margins"] == {m["step"]: pytest.approx(m["rewards/margins"], rel=1e-5) for m in metrics}
    assert set(scalars["eval/rewards/margins"]) == {2, 4, 6}
    assert (tmp_path / "dpo" / "model" / "model.safetensors").exists()


def _tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the TensorBoard event files under ``directory``: {tag: {step: value}} (TFRecord framing: a
    length, its CRC, the event, its CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in directory.glob("events.out.tfevents.*"):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_dpo_refuses_what_it_cannot_do_before_training(preferences, tmp_path, embedded_cache):
    from video_llava.model.embedded import embedded_path

    common = ["--preferences", str(preferences), "--model", str(embedded_path()), "--output", str(tmp_path)]
    ipo = run_job("jobs.dpo", *common, "--loss", "ipo", "--label-smoothing", "0.1", cache=embedded_cache)
    assert ipo.returncode != 0 and "--label-smoothing applies to --loss sigmoid or robust" in ipo.stderr
    everything = run_job("jobs.dpo", *common, "--eval-fraction", "0.9999", cache=embedded_cache)
    assert everything.returncode != 0 and "leaves" in everything.stderr and "both need some" in everything.stderr
    mlflow = run_job("jobs.dpo", *common, "--report-to", "tensorboard,mlflow", cache=embedded_cache)
    assert mlflow.returncode == 2 and "--report-to: " in mlflow.stderr and "mlflow needs mlflow installed" in mlflow.stderr
    assert not (tmp_path / "dpo").exists()  # nothing trained


def test_dpo_with_fsdp_over_two_workers_follows_ddp(preferences, tmp_path, embedded_cache):
    """The policy sharded with FSDP2 over two Ray Train workers (two micro-batches a step each) takes DDP's steps:
    each worker takes the pairs its rank picks from all of them sorted by id (train.run.worker_rows), so two runs see
    the same pairs on the same workers (with Ray Data's streaming split they did not, and the losses differed)."""
    from video_llava.model.embedded import embedded_path

    common = ["--preferences", str(preferences), "--model", str(embedded_path()), "--output", str(tmp_path), "--lr",
              "1e-3", "--batch-size", "1", "--grad-accum", "2", "--frames", "4", "--max-steps", "3",
              "--num-workers", "2", "--cpus-per-worker", "1"]
    for strategy in ("ddp", "fsdp"):
        result = run_job("jobs.dpo", *common, "--name", strategy, "--strategy", strategy, cache=embedded_cache)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        # 9 pairs over two workers: 5 each (one repeated), scored up front, then the reference is freed
        assert "the reference scored 5 pairs on this worker" in result.stdout + result.stderr
    ddp, fsdp = (_metrics(tmp_path / name / "metrics.jsonl") for name in ("ddp", "fsdp"))
    assert len(fsdp) == 3 and fsdp[-1]["rewards/margins"] != 0  # it trained
    for key in ("loss", "rewards/margins", "grad_norm"):
        assert [m[key] for m in fsdp] == pytest.approx([m[key] for m in ddp], rel=1e-4, abs=1e-6)
    assert (tmp_path / "fsdp" / "model" / "model.safetensors").exists()


def test_eval_reports_accuracy_and_judge_reward_per_question_type(data, tmp_path, embedded_cache):
    out = tmp_path / "eval.json"
    result = run_job("jobs.eval", "--data", str(data), "--frames", "4", "--max-new-tokens", "4", "--json-out", str(out),
                     cache=embedded_cache)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["all"]["n"] == 8 and figures["all"]["errors"] == 0
    assert 0.0 <= figures["all"]["accuracy"] <= 1.0 and 1.0 <= figures["all"]["mean_reward"] <= 5.0
    assert set(figures) >= {"color", "shape", "count", "direction"}
    answers = json.loads(out.read_text())["answers"]
    assert len(answers) == 8 and all(len(a["candidates"]) == 1 for a in answers)
    # the probability of the right answer among the possible ones, per type, from each question's own
    assert all(0 < a["correct_option_prob"] < 1 for a in answers)
    from video_llava.data.synthetic_qa import answer_choices
    from video_llava.feedback.scoring import is_correct

    right = [a for a in answers if is_correct(a["candidates"][0], a["reference"], a["qa_type"])]
    assert right and all(a["correct_option_prob"] > 1 / len(answer_choices(a["qa_type"])) for a in right)
    for name in ("all", "color", "shape", "count", "direction"):
        mine = [a["correct_option_prob"] for a in answers if name in ("all", a["qa_type"])]
        f = figures[name]["correct_option_probability"]
        assert f["value"] == pytest.approx(sum(mine) / len(mine), abs=1e-4) and f["low"] <= f["value"] <= f["high"]
        assert figures[name]["accuracy_interval"][0] <= figures[name]["accuracy"] <= figures[name]["accuracy_interval"][1]


def test_eval_describe_scores_descriptions_against_each_clip_and_compares_with_a_baseline(data, tmp_path,
                                                                                         embedded_cache):
    """``--task describe``: one description per clip, scored against its specification; against a baseline whose
    descriptions are the exact captions (no hallucination, full recall) the paired differences are this model's
    figures less 0 and less 1."""
    from video_llava.data.synthetic_qa import DESCRIBE

    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    perfect = [{"id": r["id"], "question": DESCRIBE, "reference": r["caption"], "qa_type": "caption",
                "candidates": [r["caption"]], "error": "", "spec": json.dumps(r["shapes"])} for r in records]
    (tmp_path / "captions.json").write_text(json.dumps({"task": "describe", "answers": perfect}))
    out = tmp_path / "describe.json"
    result = run_job("jobs.eval", "--data", str(data), "--frames", "4", "--task", "describe", "--json-out", str(out),
                     "--baseline", str(tmp_path / "captions.json"), cache=embedded_cache)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["task"] == "describe" and figures["n"] == len(records) and figures["errors"] == 0
    for name in ("hallucination_rate", "recall", "binding_error_rate"):
        f = figures[name]
        assert 0 <= f["low"] <= f["value"] <= f["high"] <= 1, (name, f)
    assert figures["recall"]["value"] > 0.3  # the embedded default describes clips (its SFT ends on the caption)
    answers = json.loads(out.read_text())["answers"]
    assert all(a["question"] == DESCRIBE and len(a["candidates"][0].split()) > 6 for a in answers)  # 64 tokens
    paired = figures["paired"]
    assert paired["n"] == len(records)
    assert paired["hallucination_rate_difference"]["value"] == figures["hallucination_rate"]["value"]
    assert paired["recall_difference"]["value"] == pytest.approx(figures["recall"]["value"] - 1, abs=1e-4)
    qa_baseline = run_job("jobs.eval", "--data", str(data), "--baseline", str(out), cache=embedded_cache)
    assert qa_baseline.returncode != 0 and "is not a --json-out of jobs.eval --task qa" in qa_baseline.stderr


def test_eval_binding_asks_every_shapes_colour_and_every_colours_shape_of_multi_shape_clips(data, tmp_path,
                                                                                            embedded_cache):
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    multi = [r for r in records if len(r["shapes"]) >= 2]
    assert multi and len(multi) < len(records)  # the split has both kinds, so the filter is exercised
    out = tmp_path / "binding.json"
    result = run_job("jobs.eval", "--data", str(data), "--frames", "4", "--max-new-tokens", "4", "--binding",
                     "--json-out", str(out), cache=embedded_cache)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    shapes = sum(len(r["shapes"]) for r in multi)
    assert figures["color"]["n"] == figures["shape"]["n"] == shapes
    assert figures["clips_all_right"]["n"] == len(multi)
    # broken down by the clip's shape types: every multi-shape clip counted once, under its own shape set
    sets = Counter("+".join(sorted(s["shape"] for s in r["shapes"])) for r in multi)
    assert {k: v["clips_all_right"]["n"] for k, v in figures["by_shapes"].items()} == dict(sets)
    assert sum(v["color"]["n"] for v in figures["by_shapes"].values()) == shapes
    asked = {(a["question"], a["reference"]) for a in json.loads(out.read_text())["answers"]}
    for s in (s for r in multi for s in r["shapes"]):
        assert (f"What color is the {s['shape']}?", s["color"]) in asked
        assert (f"What shape is the {s['color']} object?", s["shape"]) in asked


def test_eval_binding_on_a_split_without_multi_shape_clips_says_so(data, tmp_path, embedded_cache):
    single = tmp_path / "single"
    single.mkdir()
    (single / "videos").symlink_to(data / "videos")
    lines = [line for line in (data / "test.jsonl").read_text().splitlines() if len(json.loads(line)["shapes"]) == 1]
    (single / "test.jsonl").write_text("\n".join(lines) + "\n")
    result = run_job("jobs.eval", "--data", str(single), "--frames", "4", "--binding", cache=embedded_cache)
    assert result.returncode != 0
    assert "two or more shapes" in result.stderr


def test_is_correct_takes_the_first_answer_the_text_names():
    from video_llava.feedback.scoring import is_correct

    assert is_correct("red", "red", "color")
    assert is_correct("It is red, not blue.", "red", "color")
    assert not is_correct("blue, or maybe red", "red", "color")
    assert not is_correct("", "red", "color")
    assert is_correct("a big red ball", "red ball", "")


def test_preferences_dpo_and_eval_run_on_a_onevision_checkpoint(data, tmp_path, embedded_cache, tiny_checkpoint):
    """The same loop on another family (a tiny random-weight LLaVA-OneVision): the jobs take it from --model."""
    onevision = str(tiny_checkpoint("llava_onevision"))
    prefs = tmp_path / "prefs"
    made = run_job("jobs.make_preferences", "--data", str(data), "--model", onevision, "--output", str(prefs),
                   "--limit", "6", "--samples", "4", "--temperature", "2.0", "--frames", "4", "--max-new-tokens", "4",
                   "--seed", "0", cache=embedded_cache)
    assert made.returncode == 0, (made.stdout + made.stderr)[-3000:]
    rows = _rows(prefs)
    assert len(rows) == 6 and all(len(r["candidates"]) == 4 and len(r["scores"]) == 4 for r in rows)
    # A random-weight model's answers name nothing, so the word-matching judge ties them all: the pairs DPO takes
    # are made here from its candidates (the job's own pairs are tested on the embedded default above).
    pairs = tmp_path / "pairs"
    (pairs / "shards").mkdir(parents=True)
    with open(pairs / "shards" / "pairs.json", "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "status": "pair", "chosen": r["candidates"][0], "rejected": r["candidates"][1]})
                    + "\n")
    trained = run_job("jobs.dpo", "--preferences", str(pairs), "--model", onevision, "--output", str(tmp_path),
                      "--name", "dpo", "--batch-size", "1", "--grad-accum", "2", "--precision", "bf16", "--frames", "4",
                      "--max-steps", "1", cache=embedded_cache)
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    model = tmp_path / "dpo" / "model"
    assert json.loads((model / "config.json").read_text())["model_type"] == "llava_onevision"
    scored = run_job("jobs.eval", "--data", str(data), "--model", str(model), "--limit", "4", "--frames", "4",
                     "--max-new-tokens", "4", cache=embedded_cache)
    assert scored.returncode == 0, (scored.stdout + scored.stderr)[-3000:]
    figures = json.loads(scored.stdout.strip().splitlines()[-1])
    assert figures["all"]["n"] == 4 and figures["all"]["errors"] == 0
