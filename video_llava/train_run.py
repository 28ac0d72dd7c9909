"""The Ray Train scaffolding the SFT and DPO jobs share: load (or resume), log, checkpoint, run, export.

A checkpoint directory holds ``model/`` (``save_pretrained`` of the full model and processor, loadable by
everything in this project), ``trainer.pt`` (step, optimizer state) and, for LoRA runs, ``adapter/`` (the PEFT
adapter, so a resumed run continues the same low-rank weights).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$"


def load_for_training(source: str, lora_rank: int = 0, lora_alpha: int = 16, freeze_vision: bool = True):
    """(model, processor, trainer_state or None) from Ray Train's checkpoint if the run is resuming, else ``source``.

    With ``lora_rank`` > 0 the language model's attention projections get PEFT LoRA adapters and only they
    (and the projector) train; otherwise the projector and LLM train. The vision tower is frozen unless
    ``freeze_vision`` is False.
    """
    import ray.train
    import torch
    from transformers import LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor

    from video_llava.training import freeze_vision_tower

    def freeze(model) -> None:
        if freeze_vision:
            freeze_vision_tower(model)

    def load(path) -> tuple:
        return (LlavaNextVideoForConditionalGeneration.from_pretrained(path),
                LlavaNextVideoProcessor.from_pretrained(path))

    def with_lora(model, adapter: Path | None):
        from peft import LoraConfig, PeftModel, get_peft_model

        if adapter is not None:
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=LORA_TARGETS,
                            modules_to_save=["multi_modal_projector"])
        return get_peft_model(model, config)

    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as ckpt:
            state = torch.load(Path(ckpt) / "trainer.pt", weights_only=False)
            if lora_rank > 0:  # the frozen base the adapter was trained on, plus the adapter
                source = state["base"]
                model, processor = load(source)
                freeze(model)
                model = with_lora(model, Path(ckpt) / "adapter")
            else:
                model, processor = load(Path(ckpt) / "model")
                freeze(model)
    else:
        model, processor = load(source)
        freeze(model)
        if lora_rank > 0:
            model = with_lora(model, None)
    return model, processor, state, source


def base_model(model):
    """The ``LlavaNextVideoForConditionalGeneration`` inside DDP and PEFT wrappers."""
    model = model.module if hasattr(model, "module") else model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class MetricsLog:
    """``<output>/<name>/metrics.jsonl``: one JSON line per step (rank 0), readable while the job runs."""

    def __init__(self, path: Path, rank: int):
        self.path, self.rank, self.start = path, rank, time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, metrics: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.path, "a") as log:
                log.write(json.dumps({**metrics, "elapsed_s": round(time.perf_counter() - self.start, 2)}) + "\n")


def report(metrics: dict[str, Any], model, processor, optimizer, base_source: str, save: bool) -> None:
    """``ray.train.report`` the step's metrics, with a checkpoint when ``save`` (written by rank 0 only)."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    if not save:
        ray.train.report(metrics)
        return
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            inner = model.module if hasattr(model, "module") else model
            if hasattr(inner, "merge_and_unload"):  # LoRA: the adapter to resume from, and a merged full model
                inner.save_pretrained(Path(tmp) / "adapter")
                import copy

                copy.deepcopy(inner).merge_and_unload().save_pretrained(Path(tmp) / "model")
            else:
                inner.save_pretrained(Path(tmp) / "model")
            processor.save_pretrained(Path(tmp) / "model")
            torch.save({"step": metrics["step"], "optimizer": optimizer.state_dict(), "base": base_source},
                       Path(tmp) / "trainer.pt")
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)


def fit(train_loop: Callable[[dict], None], config: dict, *, name: str, output: Path, num_workers: int,
        use_gpu: bool, cpus_per_worker: int, datasets: dict | None = None):
    """Run ``train_loop`` under a ``TorchTrainer``; copy the last checkpoint's model to ``<output>/<name>/model``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(output.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=0)),
        datasets=datasets,
    )
    result = trainer.fit()
    final = output.resolve() / name / "model"
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / "model", final, dirs_exist_ok=True)
    return result, final
