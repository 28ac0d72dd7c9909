"""LLaVA-OneVision: video (SigLIP's 27x27 grid per frame, bilinear-pooled to 14x14 = 196 tokens, plus one newline
token per video), one AnyRes image, or several images at their base resolution; Qwen2's 32k positions, no scaling."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from video_llava.model.families.base import IMAGE, VIDEO, Family, anyres_image_tokens, crop_size, on_device, pooled


class LlavaOnevisionFamily(Family):
    def _grid(self, processor: Any) -> int:
        return int(math.sqrt(processor.num_image_tokens))  # the processor's own per-tile count (729 = 27x27)

    def config_tokens_per_frame(self, config: Any) -> int:
        return pooled(config.vision_config.image_size // config.vision_config.patch_size)  # bilinear to ceil(27/2)

    def tokens_per_frame(self, processor: Any) -> int:
        return math.ceil(self._grid(processor) / 2) ** 2

    def video_tokens(self, processor: Any, num_frames: int) -> int:
        return num_frames * self.tokens_per_frame(processor) + 1  # the video's newline token

    def image_tokens(self, processor: Any, sizes: Sequence[tuple[int, int]]) -> list[int]:
        if len(sizes) > 1:  # several images in one message: each at its base resolution, plus a newline
            n = processor.num_image_tokens + 1 - (processor.vision_feature_select_strategy == "default")
            return [n] * len(sizes)
        return anyres_image_tokens(processor, sizes, crop_size(processor.image_processor))

    def image_inputs(self, processor: Any, groups: Sequence[Sequence[np.ndarray]], device: Any = None
                     ) -> dict[str, Any]:
        import torch

        # Nested per message: a message of several images gets only the base view of each, as the model reads it.
        inputs = dict(processor.image_processor(images=[list(g) for g in groups], return_tensors="pt",
                                                **on_device(device)))
        inputs["batch_num_images"] = torch.tensor([len(g) for g in groups])
        return inputs


LLAVA_ONEVISION = LlavaOnevisionFamily(
    name="llava_onevision",
    label="LLaVA-OneVision",
    model_type="llava_onevision",
    model_class_name="LlavaOnevisionForConditionalGeneration",
    processor_class_name="LlavaOnevisionProcessor",
    media=frozenset({VIDEO, IMAGE}),
    hub_examples=("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava-hf/llava-onevision-qwen2-7b-ov-hf",
                  "llava-hf/llava-onevision-qwen2-72b-ov-hf"),
)
