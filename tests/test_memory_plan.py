"""``--dry-run``: the memory per worker a training run takes, before a cluster is rented. The weights, gradients and
AdamW state are exact (checked against a real step of the embedded model); FSDP divides them by the workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from video_llava.train.memory_plan import count_parameters, plan_memory

ROOT = Path(__file__).resolve().parents[1]


def _plan(count, config, strategy="ddp", workers=1, checkpointing=False, reference=False):
    return plan_memory(count, config.get_text_config(), strategy=strategy, workers=workers, precision="fp32",
                       gradient_checkpointing=checkpointing, sequences=2, tokens=1000, reference=reference)


def test_the_planned_weights_gradients_and_adamw_state_are_those_of_a_real_step(embedded_cache):
    from video_llava.model.embedded import embedded_path
    from video_llava.model.loading import load_checkpoint
    from video_llava.train.objectives import freeze_vision_tower

    model, _ = load_checkpoint(embedded_path())
    freeze_vision_tower(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(5, 100, (1, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    for p in model.parameters():  # a part this text batch did not reach still gets its state in a real run
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.step()

    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    plan = _plan(count_parameters(str(embedded_path())), model.config)
    assert plan.weights == size(model.parameters())
    assert plan.gradients == size(p.grad for p in model.parameters() if p.grad is not None)
    assert plan.optimizer == size(v for s in optimizer.state.values() for k, v in s.items() if k != "step")
    assert _plan(count_parameters(str(embedded_path())), model.config, checkpointing=True).activations \
        < plan.activations


def test_a_7b_full_fine_tune_needs_112_gb_of_state_under_ddp_and_an_eighth_under_fsdp_on_eight(tmp_path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig

    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    LlavaNextVideoConfig(text_config=text, vision_config=vision).save_pretrained(tmp_path)
    count = count_parameters(str(tmp_path))
    assert 7.0e9 < count.total < 7.2e9 and count.trainable < count.total  # the vision tower frozen
    config = LlavaNextVideoConfig.from_pretrained(tmp_path)
    ddp = _plan(count, config)
    state = ddp.weights + ddp.gradients + ddp.optimizer
    assert 105e9 < state < 115e9
    fsdp = _plan(count, config, strategy="fsdp", workers=8)
    assert fsdp.weights + fsdp.gradients + fsdp.optimizer < state / 8 + 2 * 4 * count.largest_block + 1
    dpo = _plan(count, config, reference=True)  # the reference scores before training, then is freed
    assert dpo.total == max(dpo.training, dpo.weights + dpo.reference) == dpo.training
    lora = count_parameters(str(tmp_path), lora_rank=16)
    assert lora.trainable < count.trainable / 100


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, embedded_cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VIDEO_LLAVA_CACHE": str(embedded_cache)}
    result = subprocess.run([sys.executable, "-m", "jobs.sft", "--data", str(tmp_path), "--output", str(tmp_path),
                             "--dry-run", "--strategy", "fsdp", "--num-workers", "4", "--frames", "16"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "memory per worker (fsdp, 4 workers)" in result.stdout and "AdamW state" in result.stdout
    assert not list(tmp_path.iterdir())  # no run directory, no checkpoint
