"""Which parts of a LLaVA model train, and at which learning rate: the stages of the LLaVA recipes (LLaVA-1.5: the
projector alone on image-caption pairs, then projector and LLM on instructions; Yi-VL: the vision tower too;
OneVision: a lower rate for the vision tower) are choices of parts and rates here.

A parameter belongs to ``vision`` (the vision tower), ``projector`` (the multimodal projector and LLaVA-NeXT's
``image_newline``, which LLaVA-1.6 trains with it) or ``llm`` (the language model and its head), by its name, so the
same rule reads a plain, a PEFT-wrapped or an FSDP-sharded model."""

from __future__ import annotations

from typing import Any, Iterable, Literal

Part = Literal["vision", "projector", "llm"]
PARTS: tuple[Part, ...] = ("vision", "projector", "llm")


def part_of(name: str) -> Part:
    """The part parameter ``name`` belongs to."""
    if "vision_tower" in name:
        return "vision"
    if "multi_modal_projector" in name or "image_newline" in name:
        return "projector"
    return "llm"


def select_trained(model: Any, parts: Iterable[str], lora: bool = False) -> dict[str, int]:
    """Train the parameters of ``parts`` and freeze the others. Under ``lora`` (PEFT has left only its adapters and
    saved modules trainable) a part not asked for is frozen and the vision tower, asked for, is trained whole (PEFT
    froze it); the LLM's base weights stay frozen. Returns the counts of trained and all parameters."""
    parts = set(parts)
    for name, param in model.named_parameters():
        part = part_of(name)
        if not lora:
            param.requires_grad_(part in parts)
        elif part not in parts:
            param.requires_grad_(False)
        elif part == "vision":
            param.requires_grad_(True)
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}


def param_groups(model: Any, rates: dict[str, float], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups: one per part with trained parameters, each at its ``rates[part]`` (kept as
    ``base_lr``, which the schedule scales each step), in the order of ``PARTS``."""
    groups: dict[str, list] = {part: [] for part in PARTS}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[part_of(name)].append(param)
    return [{"params": params, "lr": rates[part], "base_lr": rates[part], "part": part,
             "weight_decay": weight_decay} for part, params in groups.items() if params]
