"""``--strategy fsdp``: FSDP2 over two real Ray Train workers (gloo on the CPU), two micro-batches a step, follows
DDP's losses, resumes from its sharded checkpoint to the same losses, and exports a normal transformers checkpoint
that loads with ``--model``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.make_synthetic import SyntheticConfig
from jobs.make_synthetic import main as make_synthetic
from tests.test_sft import run_sft
from video_llava.model.embedded import embedded_path

pytestmark = pytest.mark.slow
TWO_WORKERS = ("--num-workers", "2", "--cpus-per-worker", "1", "--batch-size", "1", "--grad-accum", "2")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    make_synthetic(SyntheticConfig(output=out, train=8, val=0, test=0, seed=1))
    return out


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_follows_ddp_writes_sharded_checkpoints_and_exports_a_loadable_model(data, tmp_path, embedded_cache):
    """(Resuming from the shards: the LoRA test below, through the same sharding.load_sharded.)"""
    from transformers import LlavaNextVideoForConditionalGeneration

    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    ddp = run_sft(data, tmp_path / "ddp", embedded_cache, 4, *TWO_WORKERS)
    assert ddp.returncode == 0, (ddp.stdout + ddp.stderr)[-3000:]
    fsdp = run_sft(data, tmp_path / "fsdp", embedded_cache, 4, *TWO_WORKERS, "--strategy", "fsdp")
    assert fsdp.returncode == 0, (fsdp.stdout + fsdp.stderr)[-3000:]
    assert "finished at step 4" in fsdp.stdout
    for checkpoint in (p for p in (tmp_path / "fsdp" / "run").glob("checkpoint_*") if p.is_dir()):  # steps 2 and 4
        shards = sorted(p.name for p in (checkpoint / "sharded").iterdir())
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each worker wrote its own shard
    assert _losses(tmp_path / "fsdp" / "run") == pytest.approx(_losses(tmp_path / "ddp" / "run"), rel=1e-4, abs=1e-6)
    exported = tmp_path / "fsdp" / "run" / "model"
    a = LlavaNextVideoForConditionalGeneration.from_pretrained(exported).state_dict()
    b = LlavaNextVideoForConditionalGeneration.from_pretrained(tmp_path / "ddp" / "run" / "model").state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    qa = VideoQAModel(ModelSettings(model=str(exported)))  # what --model PATH loads
    try:
        (answer,) = qa.answer([np.zeros((4, 64, 64, 3), np.uint8)], ["Hi"], max_new_tokens=2)
        assert answer.completion_tokens >= 1
    finally:
        qa.close()


def test_lora_under_fsdp_follows_lora_under_ddp_and_exports_the_merged_model(data, tmp_path, embedded_cache):
    """LoRA adapters beside a sharded frozen base take DDP's steps, also after resuming from the sharded checkpoint
    (fresh adapters, then the shards' weights); the final model is the base with the adapters merged in (a normal
    checkpoint), the same weights as DDP's merged export."""
    from transformers import LlavaNextVideoForConditionalGeneration

    lora = (*TWO_WORKERS, "--lora-rank", "4", "--lr", "1e-2")  # a checkpoint at the last step of each run
    for strategy, steps in (("ddp", 2), ("fsdp", 1), ("fsdp", 2)):
        run = run_sft(data, tmp_path / strategy, embedded_cache, steps, *lora, "--strategy", strategy)
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "finished at step 2" in run.stdout and len(_losses(tmp_path / "fsdp" / "run")) == 2
    assert _losses(tmp_path / "fsdp" / "run") == pytest.approx(_losses(tmp_path / "ddp" / "run"), rel=1e-4, abs=1e-6)
    a, b = (LlavaNextVideoForConditionalGeneration.from_pretrained(tmp_path / s / "run" / "model").state_dict()
            for s in ("fsdp", "ddp"))
    assert a.keys() == b.keys() and not any("lora" in k for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    base = LlavaNextVideoForConditionalGeneration.from_pretrained(embedded_path()).state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a if "q_proj" in k)  # the adapters were merged in
