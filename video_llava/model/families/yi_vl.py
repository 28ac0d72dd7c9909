"""Yi-VL: a LLaVA-1.5-shaped checkpoint (model_type ``llava``, 448 px CLIP: 32x32 = 1024 tokens per image) whose
projector is Linear -> LayerNorm -> GELU -> Linear -> LayerNorm. transformers' ``LlavaMultiModalProjector`` has no
such projector, so this is the one piece written by hand: a subclass that swaps it in, chosen when the checkpoint's
weights hold ``multi_modal_projector.linear_3`` and ``linear_4`` (weights named as in LLaMA-Factory's
``LlavaMultiModalProjectorForYiVL``)."""

from __future__ import annotations

from functools import cache
from typing import Any

from video_llava.model.families.llava import LlavaFamily


class YiVLFamily(LlavaFamily):
    def matches(self, config: Any, weight_names: frozenset[str]) -> bool:
        if getattr(config, "model_type", None) != "llava":
            return False
        if getattr(config, "projector_type", None) == "yi_vl":  # what our own tiny and saved checkpoints declare
            return True
        return any(n.endswith("multi_modal_projector.linear_4.weight") for n in weight_names)

    def model_class(self) -> type:
        return yi_vl_model_class()


def build_projector(config: Any):
    """Yi-VL's projector for a ``LlavaConfig``: vision features -> the LLM's width."""
    from torch import nn
    from transformers.activations import ACT2FN

    layers = config.vision_feature_layer
    width = config.vision_config.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1)
    hidden = config.text_config.hidden_size

    class YiVLProjector(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_1 = nn.Linear(width, hidden)
            self.linear_2 = nn.LayerNorm(hidden)
            self.act = ACT2FN[config.projector_hidden_act]
            self.linear_3 = nn.Linear(hidden, hidden)
            self.linear_4 = nn.LayerNorm(hidden)

        def forward(self, features):
            return self.linear_4(self.linear_3(self.act(self.linear_2(self.linear_1(features)))))

    return YiVLProjector()


@cache
def yi_vl_model_class() -> type:
    """``LlavaForConditionalGeneration`` with Yi-VL's projector (built once, on first use: imports transformers).

    transformers gives the key renames of a layout (legacy ``language_model.lm_head`` -> ``lm_head``, ...) only to
    its own classes: a class defined elsewhere counts as custom code and gets none, so a checkpoint saved by
    ``LlavaForConditionalGeneration`` loaded here with a random ``lm_head``. The base class's renames are registered
    for this class by name, as transformers' ``register_checkpoint_conversion_mapping`` is meant for; saving then
    writes the layout the base class writes.
    """
    from transformers import LlavaForConditionalGeneration
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    class YiVLForConditionalGeneration(LlavaForConditionalGeneration):
        def __init__(self, config):
            super().__init__(config)
            self.model.multi_modal_projector = build_projector(config)
            self.post_init()

    register_checkpoint_conversion_mapping(YiVLForConditionalGeneration.__name__,
                                           get_checkpoint_conversion_mapping("llava"), overwrite=True)
    return YiVLForConditionalGeneration


YI_VL = YiVLFamily(
    name="yi_vl",
    label="Yi-VL",
    model_type="llava",
    model_class_name="LlavaForConditionalGeneration",
    processor_class_name="LlavaProcessor",
    media=frozenset({"image"}),
    hub_examples=("transformers-format conversions of 01-ai/Yi-VL-6B and -34B",),
)
