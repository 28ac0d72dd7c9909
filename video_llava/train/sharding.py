"""Fully sharded data parallelism for the training jobs (``--strategy fsdp``): torch's FSDP2 (``fully_shard``), each
decoder and encoder layer a unit, then the whole model, so a worker holds its share of the weights, gradients and
optimizer state (a 7B full fine-tune: about 112 GB in float32 AdamW state, split across the workers) and gathers
one layer's weights at a time. With LoRA the frozen base is sharded as well (the adapters beside it in each unit):
what a 7B base frees per worker is its weights, not its small trainable state.

Checkpoints while training are sharded (``torch.distributed.checkpoint``: each worker writes its own shard of the
model and optimizer state, the first also the metadata; Ray Train puts every worker's files in one checkpoint
directory) and resume exactly; the final model is gathered once into a normal transformers checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LAYER_SUFFIXES = ("DecoderLayer", "EncoderLayer")  # transformers' names for a transformer block, text and vision


def transformer_blocks(model: Any) -> list[Any]:
    """``model``'s transformer blocks, text and vision: what FSDP shards as units."""
    return [m for m in model.modules() if type(m).__name__.endswith(LAYER_SUFFIXES)]


def shard(model: Any) -> Any:
    """``model`` sharded in place across the process group: every transformer block its own unit, then the root
    (what is left: embeddings, projector, head)."""
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise TypeError(f"--strategy fsdp found no transformer blocks to shard in {type(model).__name__}")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def save_sharded(model: Any, optimizer: Any, path: Path) -> None:
    """This worker's shard of the model's and the optimizer's state under ``path`` (every worker calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))


def load_sharded(model: Any, optimizer: Any, path: Path) -> None:
    """The model's and optimizer's state from a sharded checkpoint (every worker calls it, after ``shard``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    # a parameter that never had a gradient (LLaVA-NeXT's image_newline in a video-only run) has no optimizer state
    # saved: it keeps the fresh state here, and AdamW skips it as the uninterrupted run did
    dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model: Any) -> dict:
    """The whole model's weights, gathered on the CPU (every worker calls it; the first saves them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_full(model: Any, weights: dict, base_source: str, path: Path) -> None:
    """The gathered ``weights`` as a normal transformers checkpoint at ``path``; a LoRA model's adapters merged into a
    copy of its base built on the CPU (what ``--model PATH`` loads, as the DDP path's merged export)."""
    if not hasattr(model, "peft_config"):
        model.save_pretrained(path, state_dict=weights)
        return
    from peft import get_peft_model

    from video_llava.model.loading import load_checkpoint

    base, _ = load_checkpoint(base_source)
    merged = get_peft_model(base, model.peft_config["default"])
    missing, unexpected = merged.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the gathered LoRA weights do not fit their base: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    merged.merge_and_unload().save_pretrained(path)
