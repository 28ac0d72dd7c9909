"""The Ray Train scaffolding the SFT and DPO jobs share: load (or resume), log, checkpoint, run, export.

A checkpoint directory holds ``model/`` (``save_pretrained`` of the full model and processor, loadable by
everything in this project), ``trainer.pt`` (step, optimizer state) and, for LoRA runs, ``adapter/`` (the PEFT
adapter, so a resumed run continues the same low-rank weights).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from video_llava.model.settings import MAX_FRAMES
from video_llava.train.parts import Part
from video_llava.train.schedule import Schedule, lr_factor
from video_llava.train.step import Precision, StepResult
from video_llava.train.tracking import Tracker

Strategy = Literal["ddp", "fsdp"]

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$"


class TrainRunConfig(BaseModel):
    """What every Ray Train job here takes: where checkpoints go, workers, frames, checkpoint cadence, seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    output: Path = Field(..., description="Ray Train storage directory")
    name: str = Field("run", description="run name: checkpoints under <output>/<name>; rerun the same to resume")
    frames: int = Field(8, ge=1, le=MAX_FRAMES)
    checkpoint_every: int = Field(50, ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(2, ge=1, description="CPUs reserved per worker (torch uses as many threads)")
    seed: int = 0
    log_every: int = Field(10, ge=1, description="print a progress line (step, loss, samples/s, ETA) every N steps")
    precision: Precision = Field("fp32", description="bf16: the forward under bf16 autocast, weights, gradients and "
                                 "optimizer state float32 (what a 7B run on GPUs wants); fp32: all float32")
    gradient_checkpointing: bool = Field(False, description="recompute the LLM's activations in the backward pass "
                                         "instead of keeping them: less memory, about a third more compute")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step: a step takes batch_size x "
                            "grad_accum examples per worker, in batch_size at a time, with one large batch's update")
    dry_run: bool = Field(False, description="print the memory per worker the run would take (weights, gradients, "
                          "AdamW state, activations) for the strategy and workers asked, and stop: nothing is trained")
    strategy: Strategy = Field("ddp", description="ddp: every worker holds the whole model, its gradients and "
                               "optimizer state; fsdp: FSDP2 shards them across the workers (each transformer block "
                               "a unit), with sharded checkpoints: what a 7B full fine-tune needs")
    lr: float = Field(1e-3, gt=0, description="the peak learning rate")
    lr_schedule: Schedule = Field("constant", description="after the warmup: constant, or a linear or cosine decay "
                                  "to about 0 at the last step")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="the share of the steps over which the learning rate "
                                "rises linearly from lr/warmup-steps to lr")
    decay_from: int | None = Field(None, ge=0, description="hold --lr until this step, then decay it (linearly "
                                   "unless --lr-schedule says cosine) towards 0 at the last step: warmup-stable-decay")
    max_grad_norm: float = Field(0.0, ge=0, description="clip the gradients' global norm to this before each step "
                                 "(0: no clipping); metrics.jsonl logs the norm before clipping")
    weight_decay: float = Field(0.01, ge=0, description="AdamW's decoupled weight decay, on every trained parameter")
    train: tuple[Part, ...] = Field(("projector", "llm"), description="the parts that train, comma-separated: "
                                    "vision (the vision tower), projector, llm (LLaVA-1.5's stage 1 trains the "
                                    "projector alone, stage 2 projector,llm); the others are frozen")
    lr_vision: float | None = Field(None, gt=0, description="the vision tower's peak learning rate (default --lr)")
    lr_projector: float | None = Field(None, gt=0, description="the projector's peak learning rate (default --lr)")
    lr_llm: float | None = Field(None, gt=0, description="the LLM's peak learning rate (default --lr)")
    report_to: tuple[Tracker, ...] = Field(("tensorboard",), description="where metrics go besides metrics.jsonl: "
                                           "tensorboard (event files under <output>/<name>/tensorboard), mlflow "
                                           "(MLFLOW_TRACKING_URI), wandb (WANDB_API_KEY, WANDB_PROJECT), comma-separated; "
                                           "none for none")

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value):
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip() and v.strip() != "none")
        return value

    @field_validator("train", mode="before")
    @classmethod
    def _parts(cls, value):
        if isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        if not value:
            raise ValueError("name at least one part to train: vision, projector, llm")
        return tuple(dict.fromkeys(value))

    def rates(self) -> dict[str, float]:
        """Each part's peak learning rate."""
        return {"vision": self.lr_vision or self.lr, "projector": self.lr_projector or self.lr,
                "llm": self.lr_llm or self.lr}

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from video_llava.train.tracking import check_trackers

        check_trackers(value)  # before any worker starts: a run must not train for hours and then fail to log
        return value

    @model_validator(mode="before")
    @classmethod
    def _decay_from_decays(cls, data):
        """``--decay-from`` alone decays linearly (what it did before schedules could be named)."""
        if isinstance(data, dict) and data.get("decay_from") is not None and "lr_schedule" not in data:
            data = {**data, "lr_schedule": "linear"}
        return data

    def warmup_steps(self, total: int) -> int:
        return math.ceil(self.warmup_ratio * total)

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of ``step`` of ``total`` (``schedule.lr_factor``)."""
        return self.lr * lr_factor(step, total, self.warmup_steps(total), self.lr_schedule, self.decay_from)


def setup_worker(cfg: TrainRunConfig) -> None:
    """Seed torch and, on CPU, use the threads reserved (Ray leaves torch at one thread per physical core)."""
    import torch

    torch.manual_seed(cfg.seed)
    if not cfg.use_gpu:
        torch.set_num_threads(cfg.cpus_per_worker)


def load_for_training(source: str, parts: tuple[str, ...] = ("projector", "llm"), lora_rank: int = 0,
                      lora_alpha: int = 16):
    """(model, processor, trainer_state or None, source) from Ray Train's checkpoint if the run is resuming, else from
    ``source``; the returned source is what the model started from (a resumed LoRA run's frozen base).

    The ``parts`` named train, the others are frozen (``train.parts``). With ``lora_rank`` > 0 the language model's
    attention projections get PEFT LoRA adapters and they train instead of the LLM's weights.
    """
    import ray.train
    import torch

    from video_llava.model.loading import load_checkpoint
    from video_llava.train.parts import select_trained

    def with_lora(model, adapter: Path | None):
        from peft import LoraConfig, PeftModel, get_peft_model

        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        else:
            config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=LORA_TARGETS,
                                modules_to_save=["multi_modal_projector"])
            model = get_peft_model(model, config)
        select_trained(model, parts, lora=True)
        return model

    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as ckpt:
            state = torch.load(Path(ckpt) / "trainer.pt", weights_only=False)
            if (Path(ckpt) / "sharded").is_dir():  # fsdp: the base's architecture, then every shard's state
                state["sharded"] = Path(tempfile.mkdtemp(prefix="sharded-"))
                shutil.copytree(Path(ckpt) / "sharded", state["sharded"], dirs_exist_ok=True)
                source = state["base"]
                model, processor = load_checkpoint(source)
                select_trained(model, parts)
                if lora_rank > 0:  # fresh adapters of the same shape: the shards hold their trained weights
                    model = with_lora(model, None)
            elif lora_rank > 0:  # the frozen base the adapter was trained on, plus the adapter
                source = state["base"]
                model, processor = load_checkpoint(source)
                model = with_lora(model, Path(ckpt) / "adapter")
            else:
                model, processor = load_checkpoint(Path(ckpt) / "model")
                select_trained(model, parts)
    else:
        model, processor = load_checkpoint(source)
        if lora_rank > 0:
            model = with_lora(model, None)
        else:
            select_trained(model, parts)
    return model, processor, state, source


def check_resumed_parts(state: dict | None, trained: list[str]) -> None:
    """A resume trains the parts its checkpoint trained (its AdamW state is theirs): ``ValueError`` naming both."""
    if state is not None and state.get("parts") not in (None, trained):
        raise ValueError(f"cannot resume: the checkpoint trained {','.join(state['parts'])}, --train asks "
                         f"{','.join(trained)}; resume with the same --train, or start a new run (another --name) "
                         "from the checkpoint's model")


def prepare_training(model, state: dict | None, rates: dict[str, float], gradient_checkpointing: bool = False,
                     strategy: Strategy = "ddp", weight_decay: float = 0.01):
    """(DDP-ready or FSDP-sharded model, AdamW over its trainable parameters, first step): restores the optimizer
    (and, sharded, the model) when resuming."""
    import ray.train
    import torch

    from video_llava.train import sharding
    from video_llava.train.parts import param_groups
    from video_llava.train.step import enable_gradient_checkpointing

    model.train()
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if strategy == "fsdp":
        model = sharding.shard(model.to(ray.train.torch.get_device()))
    else:
        # a part the batch did not use (LLaVA-NeXT's image_newline in a video batch) has no gradient on that worker
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    groups = param_groups(model, rates, weight_decay)
    check_resumed_parts(state, [g["part"] for g in groups])
    optimizer = torch.optim.AdamW(groups)
    try:
        if state is not None and "sharded" in state:
            sharding.load_sharded(model, optimizer, state["sharded"])
            shutil.rmtree(state["sharded"], ignore_errors=True)
        elif state is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"cannot resume: the checkpoint's optimizer trained other parts than --train "
                         f"{','.join(g['part'] for g in groups)} asks ({exc}); resume with the same --train, or "
                         "start a new run (another --name)") from exc
    for group, asked in zip(optimizer.param_groups, groups):  # the rates asked now, not the checkpoint's
        group.update(base_lr=asked["base_lr"], weight_decay=weight_decay, part=asked["part"])
    return model, optimizer, state["step"] if state else 0


class MetricsLog:
    """``<output>/<name>/metrics.jsonl``: one JSON line per step (rank 0), readable while the job runs. A run resumed
    from ``start_step`` drops the lines of steps after it (they are trained again), so the log reads as one run."""

    def __init__(self, path: Path, rank: int, start_step: int = 0, report_to: tuple[str, ...] = (),
                 config: dict[str, Any] | None = None):
        from video_llava.train.tracking import Trackers

        self.path, self.rank, self.start = path, rank, time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        if rank == 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.trackers = Trackers(path.parent, path.parent.name, report_to, rank, start_step, config)

    def write(self, metrics: dict[str, Any]) -> None:
        """One line of ``metrics`` (with its ``step``), also to the trackers ``--report-to`` named."""
        if self.rank == 0:
            with open(self.path, "a") as log:
                log.write(json.dumps({**metrics, "elapsed_s": round(time.perf_counter() - self.start, 2)}) + "\n")
            self.trackers.log(metrics, metrics["step"])

    def close(self) -> None:
        self.trackers.close()


@dataclass
class WorkerRun:
    """A train loop's state on its Ray Train worker, set up the same way for every job by ``start_worker``."""

    cfg: TrainRunConfig
    model: Any  # DDP-wrapped when there are several workers
    processor: Any
    optimizer: Any
    start_step: int  # the checkpoint's step when resuming, else 0
    source: str  # the starting checkpoint (a resumed LoRA run's frozen base)
    rank: int
    device: Any
    log: MetricsLog
    name: str = "train"
    log_every: int = 10
    strategy: Strategy = "ddp"
    _mark: tuple[float, int, int] | None = None  # (time, step, samples since) at the last progress line

    def step(self, step: int, total_steps: int, parts: Any, loss_of: Callable[[Any], Any]) -> StepResult:
        """Optimizer step ``step`` of ``total_steps`` over ``parts`` ((micro-batch, its share of the step) pairs) at
        the schedule's learning rate, clipped and under the run's precision: ``step.optimizer_step``."""
        from video_llava.train.step import optimizer_step

        factor = self.cfg.lr_at(step, total_steps) / self.cfg.lr
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        done = optimizer_step(self.model, self.optimizer, parts, loss_of, self.cfg.precision, self.device,
                              max_grad_norm=self.cfg.max_grad_norm)
        return StepResult(done.loss, done.grad_norm, self.cfg.lr * factor,
                          {g["part"]: g["lr"] for g in self.optimizer.param_groups})

    def end_step(self, metrics: dict[str, Any], save: bool, total_steps: int, samples: int) -> None:
        """Log the step's metrics, print a progress line every ``log_every`` steps (rank 0) and, at a checkpoint
        step, report the metrics with a checkpoint. ``samples``: examples this step took on this worker."""
        self.log.write(metrics)
        self._progress(metrics, total_steps, samples)
        if metrics["step"] == total_steps:
            self.log.close()
        report(metrics, self.model, self.processor, self.optimizer, self.source, save, self.strategy,
               final=metrics["step"] == total_steps)

    def _progress(self, metrics: dict[str, Any], total_steps: int, samples: int) -> None:
        step = metrics["step"]
        since, since_step, counted = self._mark or (self.log.start, self.start_step, 0)
        counted += samples
        if self.rank != 0 or (step % self.log_every and step != total_steps):
            self._mark = (since, since_step, counted)
            return
        now = time.perf_counter()
        elapsed = max(now - since, 1e-9)
        eta = elapsed / max(1, step - since_step) * (total_steps - step)
        # sys.stdout, not print: Ray Train patches print on its workers into a logger that shows each line twice
        sys.stdout.write(f"{self.name}: step {step}/{total_steps} loss {metrics['loss']:.4f} "
                         f"{counted / elapsed:.2f} samples/s ETA {int(eta // 60)}m{int(eta % 60):02d}s\n")
        sys.stdout.flush()
        self._mark = (now, step, 0)


def start_worker(cfg: TrainRunConfig, model: str, **load: Any) -> WorkerRun:
    """Seed and size torch, load ``model`` (or resume from Ray Train's checkpoint; ``load`` goes to
    ``load_for_training``), wrap it for DDP with an AdamW optimizer, and open ``<output>/<name>/metrics.jsonl``."""
    import ray.train

    from video_llava.model.loading import resolve_source
    from video_llava.model.settings import ModelSettings

    setup_worker(cfg)
    loaded, processor, state, source = load_for_training(resolve_source(ModelSettings(model=model)), cfg.train, **load)
    wrapped, optimizer, start_step = prepare_training(loaded, state, cfg.rates(), cfg.gradient_checkpointing,
                                                      cfg.strategy, cfg.weight_decay)
    rank = ray.train.get_context().get_world_rank()
    log = MetricsLog(cfg.output.resolve() / cfg.name / "metrics.jsonl", rank, start_step, cfg.report_to,
                     cfg.model_dump(mode="json"))
    return WorkerRun(cfg, wrapped, processor, optimizer, start_step, source, rank, ray.train.torch.get_device(), log,
                     name=cfg.name, log_every=cfg.log_every, strategy=cfg.strategy)


def report(metrics: dict[str, Any], model, processor, optimizer, base_source: str, save: bool,
           strategy: Strategy = "ddp", final: bool = False) -> None:
    """At a checkpoint step (``save``), ``ray.train.report`` the metrics with a checkpoint: written by rank 0 (ddp), or
    a shard by every worker (fsdp; the gathered model too at the ``final`` step)."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    if not save:
        # ray.train.report blocks until the controller polls the worker (seconds): reporting every step would
        # cap training at that rate. Steps go to metrics.jsonl; Ray Train sees the metrics of each checkpoint.
        return
    rank = ray.train.get_context().get_world_rank()
    if strategy == "fsdp":
        _report_sharded(metrics, model, processor, optimizer, base_source, rank, final)
        return
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
            torch.save({"step": metrics["step"], "optimizer": optimizer.state_dict(), "base": base_source,
                        "parts": [g["part"] for g in optimizer.param_groups]}, Path(tmp) / "trainer.pt")
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)


def _report_sharded(metrics: dict[str, Any], model, processor, optimizer, base_source: str, rank: int,
                    final: bool) -> None:
    """Every worker's shard of the model and optimizer (``sharding.save_sharded``), the step and base (rank 0), and
    at the ``final`` step the whole model gathered into ``model/`` (rank 0 writes it)."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    from video_llava.train import sharding

    with tempfile.TemporaryDirectory() as tmp:
        sharding.save_sharded(model, optimizer, Path(tmp) / "sharded")
        weights = sharding.full_state_dict(model) if final else None  # a collective: every worker takes part
        if rank == 0:
            torch.save({"step": metrics["step"], "base": base_source,
                        "parts": [g["part"] for g in optimizer.param_groups]}, Path(tmp) / "trainer.pt")
            if weights is not None:
                sharding.save_full(model, weights, base_source, Path(tmp) / "model")
                processor.save_pretrained(Path(tmp) / "model")
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def worker_rows(name: str = "train") -> list[dict]:
    """This worker's rows of dataset ``name``: every row, sorted by ``id`` (then ``index``: released files repeat
    ids), the first ones repeated up to a multiple of the workers (as torch's ``DistributedSampler`` pads), then
    every ``world``-th from this worker's rank. Each worker
    reads the whole dataset (``fit`` does not split it): Ray Data's streaming split hands rows to whichever worker
    asks first, so which worker trained on which row changed from run to run, and a run or a resume could not be
    repeated; and every worker has as many rows, so as many steps and micro-batches (FSDP's collectives run per
    micro-batch: a worker with one fewer would leave the others waiting)."""
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    rows = sorted(ray.train.get_dataset_shard(name).iter_rows(), key=lambda r: (str(r["id"]), r.get("index", 0)))
    rows += (rows * world)[:-len(rows) % world]  # -n % world: the rows short of a multiple
    return rows[rank::world]


def fit(train_loop: Callable[[dict], None], cfg: TrainRunConfig, datasets: dict | None = None):
    """Run ``train_loop`` under a ``TorchTrainer``; copy the last checkpoint's model to ``<output>/<name>/model``.

    Paths are made absolute first: workers run in their own directories, where relative ones point elsewhere.
    """
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    from video_llava.job_cli import absolute_paths
    from video_llava.ray_runtime import ensure_ray, is_quiet, require_resources

    cfg = absolute_paths(cfg)
    ensure_ray()
    asked = f"--num-workers {cfg.num_workers} --cpus-per-worker {cfg.cpus_per_worker}" + (" --use-gpu" if cfg.use_gpu else "")
    require_resources({"CPU": cfg.num_workers * cfg.cpus_per_worker, "GPU": cfg.num_workers if cfg.use_gpu else 0},
                      f"training with {asked}")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=str(cfg.output),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=0),
                             logging_config=LoggingConfig(log_level="WARNING" if is_quiet() else "INFO")),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # each worker picks its rows by rank: worker_rows
    )
    result = trainer.fit()
    final = cfg.output / cfg.name / "model"
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / "model", final, dirs_exist_ok=True)
    return result, final
