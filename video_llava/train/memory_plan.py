"""Memory a training run takes per worker, before a cluster is rented (``--dry-run`` of ``jobs.sft`` and
``jobs.dpo``): the weights, gradients and AdamW state (exact, counted from the checkpoint's classes built on the meta
device: no weight is read), and the activations (estimated, the usual transformer count).

Under ``ddp`` every worker holds all of the first three; under ``fsdp`` each holds its share, plus one transformer
block gathered at a time. Weights, gradients and the optimizer's two moments are float32 whatever ``--precision``
(bf16 autocasts the forward: the master weights stay float32). Activations per micro-batch and transformer block:
about 17 values of the hidden size per token (Korthikanti et al., 2022, "34sbh" bytes in 16-bit), kept for every
block, or with gradient checkpointing only each block's input plus one block's whole; the attention's scores are
not counted (sdpa's and flash-attention's kernels do not keep them); the float32 logits over the vocabulary are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30
TEXT_TOKENS = 128  # a sample's prompt and answer, besides its visual tokens
ACTIVATION_VALUES = 17  # values of the hidden size kept per token and transformer block


@dataclass(frozen=True)
class ParameterCount:
    total: int  # the model's parameters
    trainable: int  # those the run updates (with LoRA: the adapters and the projector)
    largest_block: int  # the parameters of the largest transformer block (what FSDP gathers at a time)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per worker."""

    strategy: str
    workers: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    reference: int = 0  # DPO's frozen reference model, whole on every worker while it scores the pairs, up front

    @property
    def training(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def total(self) -> int:
        """The peak: training, or (DPO) the weights beside the reference while it scores, before training."""
        return max(self.training, self.weights + self.reference)

    def describe(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("AdamW state", self.optimizer),
                ("activations", self.activations)]
        if self.reference:
            rows += [("training", self.training), ("reference model", self.reference),
                     ("scoring", self.weights + self.reference)]  # the reference's memory goes before training
        scale, unit = (GIB, "GiB") if self.total >= GIB else (2**20, "MiB")
        lines = [f"memory per worker ({self.strategy}, {self.workers} worker{'s' * (self.workers > 1)}):"]
        lines += [f"  {name:<16}{size / scale:9.2f} {unit}" for name, size in rows + [("peak", self.total)]]
        return "\n".join(lines)


def count_parameters(source: str, lora_rank: int = 0, train_vision: bool = False, train_projector: bool = True,
                     train_llm: bool = True) -> ParameterCount:
    """The checkpoint's parameters, built on the meta device from its config (no weights read)."""
    import torch
    from transformers import AutoConfig

    from video_llava.model.families import family_of
    from video_llava.train.sharding import transformer_blocks

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = family_of(config, source).model_class()._from_config(config)
    total = sum(p.numel() for p in model.parameters())
    parts = {"vision_tower": train_vision, "multi_modal_projector": train_projector,
             "language_model": train_llm and not lora_rank, "lm_head": train_llm and not lora_rank}
    trainable = 0
    for name, param in model.named_parameters():
        part = next((p for p in parts if p in name), None)
        trainable += param.numel() if (parts[part] if part else train_llm and not lora_rank) else 0
    if lora_rank:  # an adapter's A (rank x in) and B (out x rank) on each attention projection of the LLM
        for name, module in model.named_modules():
            if "language_model" in name and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"):
                trainable += lora_rank * (module.in_features + module.out_features)
    largest = max((sum(p.numel() for p in b.parameters()) for b in transformer_blocks(model)), default=0)
    return ParameterCount(total, trainable, largest)


def plan_memory(count: ParameterCount, text_config: Any, *, strategy: str, workers: int, precision: str,
                gradient_checkpointing: bool, sequences: int, tokens: int, reference: bool = False) -> MemoryPlan:
    """The plan for ``sequences`` sequences of ``tokens`` positions a micro-batch (DPO: two per pair)."""
    shards = workers if strategy == "fsdp" else 1
    gathered = 4 * count.largest_block if strategy == "fsdp" else 0
    weights = 4 * count.total // shards + gathered
    gradients = 4 * count.trainable // shards + gathered
    optimizer = 8 * count.trainable // shards
    width = 2 if precision == "bf16" else 4
    per_block = ACTIVATION_VALUES * tokens * text_config.hidden_size * width
    layers = text_config.num_hidden_layers
    kept = (layers * tokens * text_config.hidden_size * width + per_block) if gradient_checkpointing \
        else layers * per_block
    logits = 4 * tokens * text_config.vocab_size
    activations = sequences * (kept + logits)
    return MemoryPlan(strategy, workers, weights, gradients, optimizer, activations,
                      reference=4 * count.total if reference else 0)


def plan_run(cfg: Any, model: str, *, lora_rank: int = 0, sequences_per_example: int = 1,
             reference: bool = False) -> MemoryPlan:
    """The plan of a job's run (``cfg``: its ``TrainRunConfig``, whose ``train`` names the parts that train) on
    checkpoint ``model``: a micro-batch of ``batch_size`` examples of ``frames`` frames each."""
    from video_llava.model.loading import resolve_config, resolve_source
    from video_llava.model.settings import ModelSettings

    settings = ModelSettings(model=model, num_frames=cfg.frames, max_frames=max(cfg.frames, 1))
    source = resolve_source(settings)
    resolved = resolve_config(settings, source)
    count = count_parameters(source, lora_rank, "vision" in cfg.train, "projector" in cfg.train, "llm" in cfg.train)
    visual = cfg.frames * resolved.per_frame if resolved.per_frame else 576  # a family that takes images: one
    return plan_memory(count, resolved.config.get_text_config(), strategy=cfg.strategy, workers=cfg.num_workers,
                       precision=cfg.precision, gradient_checkpointing=cfg.gradient_checkpointing,
                       sequences=cfg.batch_size * sequences_per_example, tokens=visual + TEXT_TOKENS,
                       reference=reference)
