"""LLaVA-1.5: one fixed-size view per image (336 px CLIP, patch 14: 24x24 = 576 tokens)."""

from __future__ import annotations

from typing import Any, Sequence

from video_llava.model.families.base import IMAGE, Family, crop_size


class LlavaFamily(Family):
    def image_tokens(self, processor: Any, sizes: Sequence[tuple[int, int]]) -> list[int]:
        height, width = crop_size(processor.image_processor)
        n = (height // processor.patch_size) * (width // processor.patch_size) + processor.num_additional_image_tokens
        n -= processor.vision_feature_select_strategy == "default"
        return [n] * len(sizes)


LLAVA = LlavaFamily(
    name="llava",
    label="LLaVA-1.5",
    model_type="llava",
    model_class_name="LlavaForConditionalGeneration",
    processor_class_name="LlavaProcessor",
    media=frozenset({IMAGE}),
    hub_examples=("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf"),
)
