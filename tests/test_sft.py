"""SFT with Ray Train: the real entry point, a tiny synthetic set, a few steps."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from jobs.make_synthetic import SyntheticConfig
from jobs.make_synthetic import main as make_synthetic
from jobs.sft import SFTConfig
from video_llava.train.parts import PARTS, part_of

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from PIL import Image

    from video_llava.data.synthetic_video import SAMPLE_SHAPES, render_frames

    out = tmp_path_factory.mktemp("syn")
    make_synthetic(SyntheticConfig(output=out, train=8, val=0, test=0, seed=1, follow_ups=True))
    # Image records beside the video ones: batches mix both (LLaVA-NeXT trains on images and videos together).
    (out / "images").mkdir()
    with open(out / "train.jsonl", "a") as f:
        for i in range(4):
            Image.fromarray(render_frames(SAMPLE_SHAPES, num_frames=1, width=96, height=72)[0]).save(out / "images" / f"{i}.png")
            f.write(json.dumps({"id": f"img-{i}", "image": f"images/{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"}]}) + "\n")
    return out


def run_sft(data: Path, output: Path, cache: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "VIDEO_LLAVA_CACHE": str(cache),
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp")}
    source = ["--records", str(data)] if data.is_file() else ["--data", str(data)]
    args = [sys.executable, "-m", "jobs.sft", *source, "--output", str(output), "--name", "run",
            "--max-steps", str(steps), "--batch-size", "4", "--checkpoint-every", "2", "--frames", "4", *extra]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_frame_counts_are_drawn_per_step_and_keep_the_frames_per_step():
    cfg = SFTConfig.model_validate({"data": "d", "output": "o", "frames": 4, "batch_size": 16, "frame_counts": "4,8,32"})
    assert cfg.frame_counts == (4, 8, 32)
    shapes = [cfg.step_shape(step) for step in range(1, 61)]
    assert shapes == [cfg.step_shape(step) for step in range(1, 61)]  # seeded: a resumed run draws the same
    assert {frames for frames, _ in shapes} == {4, 8, 32}
    assert all(frames * batch == 64 for frames, batch in shapes)
    assert SFTConfig(data="d", output="o").step_shape(7) == (8, 8)  # no frame counts: --frames and --batch-size
    with pytest.raises(ValueError, match="1-56"):
        SFTConfig.model_validate({"data": "d", "output": "o", "frame_counts": "4,64"})


def test_the_learning_rate_holds_then_decays_linearly_to_zero_at_the_last_step():
    cfg = SFTConfig(data="d", output="o", lr=1e-3, max_steps=10, decay_from=6)
    assert [round(cfg.lr_at(step, 10) / 1e-3, 2) for step in range(1, 11)] == [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2]
    assert SFTConfig(data="d", output="o", lr=1e-3, max_steps=10).lr_at(10, 10) == 1e-3  # constant without decay_from


def test_warmup_rises_to_the_peak_then_linear_or_cosine_decay_fall_to_just_above_zero():
    import math

    linear = SFTConfig(data="d", output="o", lr=1e-3, warmup_ratio=0.2, lr_schedule="linear")
    assert linear.warmup_steps(10) == 2
    assert [round(linear.lr_at(step, 10) / 1e-3, 3) for step in range(1, 11)] == [
        0.5, 1, 0.889, 0.778, 0.667, 0.556, 0.444, 0.333, 0.222, 0.111]
    cosine = SFTConfig(data="d", output="o", lr=1e-3, warmup_ratio=0.2, lr_schedule="cosine")
    factors = [cosine.lr_at(step, 10) / 1e-3 for step in range(1, 11)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == pytest.approx(0.5 * (1 + math.cos(math.pi / 9)))
    assert all(a > b for a, b in zip(factors[1:], factors[2:])) and 0 < factors[-1] < 0.05
    assert SFTConfig(data="d", output="o", lr_schedule="cosine", decay_from=6).lr_at(6, 10) == 1e-3  # held until 6
    with pytest.raises(ValueError):
        SFTConfig(data="d", output="o", warmup_ratio=1.0)


def test_a_resumed_run_drops_the_logged_steps_it_trains_again(tmp_path):
    from video_llava.train.run import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", rank=0)
    for step in range(1, 6):  # killed after step 5; the last checkpoint was at step 3
        log.write({"step": step, "loss": 1.0})
    resumed = MetricsLog(tmp_path / "metrics.jsonl", rank=0, start_step=3)
    resumed.write({"step": 4, "loss": 0.5})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"]) for m in lines] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 0.5)]


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "run" / "metrics.jsonl").read_text().splitlines()]


def test_sft_steps_lower_the_loss_train_the_projector_and_llm_at_their_rates_and_keep_the_vision_tower(
        data, tmp_path, embedded_cache):
    """The default parts (projector and LLM; the vision tower frozen), each at its own rate, over whole epochs of
    the 12 records in steps whose frame count (and so batch) is drawn per step."""
    from transformers import LlavaNextVideoForConditionalGeneration

    from video_llava.model.embedded import embedded_path

    result = run_sft(data, tmp_path, embedded_cache, 6, "--frame-counts", "2,4", "--epochs", "3", "--lr-llm", "5e-4")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    metrics = _metrics(tmp_path)
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 6 and losses[-1] < losses[0]
    drawn = SFTConfig(data=data, output=tmp_path, frames=4, frame_counts=(2, 4), batch_size=4, epochs=3, max_steps=6)
    assert [m["frames"] for m in metrics] == [drawn.step_shape(m["step"])[0] for m in metrics]
    assert [m["epoch"] for m in metrics] == [epoch + 1 for epoch, _, _ in drawn.steps_of(12)]
    assert len({m["epoch"] for m in metrics}) > 1  # the epochs turned over within the 6 steps
    assert all(m["lr/llm"] == 5e-4 and m["lr/projector"] == 1e-3 and "lr/vision" not in m for m in metrics)
    b = LlavaNextVideoForConditionalGeneration.from_pretrained(embedded_path()).state_dict()
    a = LlavaNextVideoForConditionalGeneration.from_pretrained(tmp_path / "run" / "model").state_dict()
    changed = {part: [not torch.equal(b[k], a[k]) for k in b if part_of(k) == part] for part in PARTS}
    assert any(changed["projector"]) and any(changed["llm"])
    assert changed["vision"] and not any(changed["vision"])  # frozen


def test_video_prune_rates_are_read_checked_and_refused_under_fsdp():
    assert SFTConfig.model_validate({"data": "d", "output": "o", "video_prune_rates": "0,0.5"}).video_prune_rates == (0, 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        SFTConfig.model_validate({"data": "d", "output": "o", "video_prune_rates": "0,1"})
    with pytest.raises(ValueError, match="use --strategy ddp"):
        SFTConfig.model_validate({"data": "d", "output": "o", "video_prune_rates": "0.5", "strategy": "fsdp"})


def test_epochs_walk_every_record_once_per_epoch_in_steps_of_the_batch():
    cfg = SFTConfig(data="d", output="o", batch_size=4, epochs=2)
    assert cfg.steps_of(10) == [(0, 0, 4), (0, 4, 4), (0, 8, 2), (1, 0, 4), (1, 4, 4), (1, 8, 2)]
    assert SFTConfig(data="d", output="o", batch_size=4, epochs=2, max_steps=4).steps_of(10)[-1] == (1, 0, 4)
    with pytest.raises(ValueError, match="--train must include llm"):
        SFTConfig(data="d", output="o", lora_rank=8, train="projector")
    with pytest.raises(ValueError):
        SFTConfig(data="d", output="o", train="projector,decoder")


def newest_trainer_state(output: Path) -> dict:
    """The trainer.pt of the run's newest checkpoint under ``output``/run."""
    newest = max((p for p in (output / "run").glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)
    return torch.load(newest / "trainer.pt", weights_only=False)


def test_a_rerun_resumes_from_the_last_checkpoint_continues_the_step_count_and_keeps_its_parts(
        data, tmp_path, embedded_cache):
    first = run_sft(data, tmp_path, embedded_cache, steps=4)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    second = run_sft(data, tmp_path, embedded_cache, steps=6)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert "finished at step 6" in second.stdout
    from video_llava.train.run import check_resumed_parts

    state = newest_trainer_state(tmp_path)  # what a resume reads: the step, the AdamW state, the parts trained
    assert state["step"] == 6 and state["parts"] == ["projector", "llm"]
    check_resumed_parts(state, ["projector", "llm"])
    with pytest.raises(ValueError, match="cannot resume: the checkpoint trained projector,llm, --train asks projector"):
        check_resumed_parts(state, ["projector"])  # its AdamW state is for other parameters


@pytest.fixture(scope="module")
def llava_file(data) -> Path:
    """A ``.json`` array in LLaVA's released shapes, apart from its media (--media-root): LLaVA-Video records (a video
    under an ``<image>`` placeholder), a LLaVA-1.5 image record, two images in two turns, a text-only ShareGPT record,
    a video that does not decode (index 5) and a record with no conversation (index 6)."""
    videos = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()][:3]
    (data / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)

    def turns(*values):
        return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]

    records = [
        {"id": v["id"], "video": v["video"], "conversations": turns(
            v["conversations"][0]["value"].replace("<video>", "<image>"), v["conversations"][1]["value"])}
        for v in videos[:2]]
    records += [
        {"id": "img", "image": "images/0.png", "conversations": turns("<image>\nWhat color is the circle?", "red")},
        {"id": "two", "image": ["images/0.png", "images/1.png"], "conversations": turns(
            "Here: <image>\nWhat color is the circle?", "red", "And here: <image>\nWhat color is it?", "red")},
        {"id": "chat", "conversations": [{"from": "system", "value": "Be brief."}, *turns("Hello?", "Hi.")]},
        {"id": "broken", "video": "broken.mp4", "conversations": turns("<video>\nWhat is it?", "nothing")},
        {"id": "empty", "image": "images/2.png"},
        {"id": videos[2]["id"], "video": videos[2]["video"], "conversations": turns("<video>\nWhat?", "a shape")},
        {"id": "img2", "image": "images/2.png", "conversations": turns("<image>\nWhat shape is red?", "circle")},
    ]
    (data / "sets").mkdir(exist_ok=True)
    (data / "sets" / "mix.json").write_text(json.dumps(records))
    return data / "sets" / "mix.json"


def test_a_bad_record_stops_the_run_before_training_naming_its_index_and_reason(llava_file, data, tmp_path,
                                                                               embedded_cache):
    result = run_sft(llava_file, tmp_path, embedded_cache, 2, "--media-root", str(data))
    assert result.returncode == 2  # the jobs' exit status for an input to fix
    assert "record 6 (id 'empty'): no 'conversations' list" in result.stderr
    assert "--on-bad-record skip" in result.stderr and not (tmp_path / "run" / "model").exists()
    assert json.loads((tmp_path / "run" / "bad_records.jsonl").read_text())["index"] == 6


def test_sft_runs_on_a_onevision_checkpoint_over_llava_files_in_bf16_checkpointed_micro_batches(
        llava_file, data, tmp_path, embedded_cache, tiny_checkpoint):
    """LLaVA's file shapes (videos, images, two images in two turns, text-only) on OneVision, which reads a sample's
    several images together, with the options a 7B run takes (bf16 autocast, gradient checkpointing, two
    micro-batches a step; their effect on the update: tests/test_training_steps.py) and videos pruned at a rate drawn
    per example (tests/test_video_pruning.py: what the forward sees). One epoch: every record is trained on once, the
    undecodable video reported and replaced."""
    from transformers import LlavaOnevisionForConditionalGeneration

    result = run_sft(llava_file, tmp_path, embedded_cache, 2, "--media-root", str(data), "--on-bad-record", "skip",
                     "--epochs", "1", "--model", str(tiny_checkpoint("llava_onevision")), "--video-prune-rates", "0,0.75",
                     "--precision", "bf16", "--gradient-checkpointing", "--grad-accum", "2", "--batch-size", "2")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    output = result.stdout + result.stderr
    assert "skipped record 6 (id 'empty'): no 'conversations' list" in output
    assert "skipped record 5 (id 'broken'): its media could not be read" in output
    assert "sft: 8 records from" in output
    losses = [m["loss"] for m in _metrics(tmp_path)]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    trained = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "run" / "model")
    assert trained.config.model_type == "llava_onevision"
