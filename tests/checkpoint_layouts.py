"""Tiny checkpoints in each weight layout transformers reads, for the tests that load them through every entry point:
the same weights under transformers 5's own names, the legacy names its ``save_pretrained`` still writes, and
llava-hf's released layout (the vision tower under ``vision_model``)."""

from __future__ import annotations

import shutil
from pathlib import Path

FAMILIES = ["llava_next_video", "llava_onevision", "llava_next", "llava", "yi_vl"]
# How the same weights are named on disk. "current": transformers 5's own module names. "legacy": what transformers
# 4 wrote and 5's save_pretrained still writes for these classes. "hub": legacy with the vision tower under
# vision_model, as llava-hf's released checkpoints hold it.
LAYOUTS = ["current", "legacy", "hub"]
CURRENT_TO_LEGACY = [("lm_head.", "language_model.lm_head."), ("model.language_model.", "language_model.model."),
                     ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline")]


def renamed(name: str, rules: list[tuple[str, str]]) -> str:
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def as_current(name: str, current: set[str]) -> str:
    """A saved weight's name in the current layout (from the legacy or hub one)."""
    for candidate in (name, name.replace("vision_tower.vision_model.", "vision_tower.", 1)):
        for rules in ([], [(new, old) for old, new in CURRENT_TO_LEGACY]):
            if renamed(candidate, rules) in current:
                return renamed(candidate, rules)
    raise KeyError(f"{name} has no place in the model")


def reference_model(config):
    """The family's transformers class built from ``config`` (Yi-VL: ``LlavaForConditionalGeneration`` with its
    projector swapped in), random weights: the names its state dict has are the "current" layout."""
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaNextVideoForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
    )

    from video_llava.model.families.yi_vl import build_projector

    classes = {"llava_next_video": LlavaNextVideoForConditionalGeneration, "llava_onevision":
               LlavaOnevisionForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
    model = classes.get(config.model_type, LlavaForConditionalGeneration)(config)
    if getattr(config, "projector_type", None) == "yi_vl":
        model.model.multi_modal_projector = build_projector(config)
    return model.eval()


def saved_weights(source: Path) -> tuple:
    """(the reference model holding a tiny checkpoint's weights, those weights by their current names)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    reference = reference_model(AutoConfig.from_pretrained(source))
    current = set(reference.state_dict())
    weights = {as_current(k, current): v for k, v in load_file(str(source / "model.safetensors")).items()}
    reference.load_state_dict(weights, strict=True)  # every weight, by the current names
    return reference, weights


def write_layout(source: Path, weights: dict, dest: Path, layout: str) -> Path:
    """``source`` (a checkpoint directory) copied to ``dest`` with ``weights`` saved under ``layout``'s names."""
    from safetensors.torch import save_file

    shutil.copytree(source, dest)
    if layout == "current":
        names = {k: k for k in weights}
    else:
        names = {k: renamed(k, CURRENT_TO_LEGACY) for k in weights}
        if layout == "hub":
            names = {k: v.replace("vision_tower.", "vision_tower.vision_model.", 1)
                     if v.startswith("vision_tower.") else v for k, v in names.items()}
    save_file({names[k]: v.contiguous() for k, v in weights.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    return dest
