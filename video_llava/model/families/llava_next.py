"""LLaVA-NeXT (1.6): images at any resolution (AnyRes: a base view plus a grid of tiles, unpadded, with a newline
token per row); the count depends on each image's size and comes from the processor."""

from __future__ import annotations

from typing import Any, Sequence

from video_llava.model.families.base import IMAGE, Family, anyres_image_tokens, crop_size


class LlavaNextFamily(Family):
    def image_tokens(self, processor: Any, sizes: Sequence[tuple[int, int]]) -> list[int]:
        return anyres_image_tokens(processor, sizes, crop_size(processor.image_processor))


LLAVA_NEXT = LlavaNextFamily(
    name="llava_next",
    label="LLaVA-NeXT",
    model_type="llava_next",
    model_class_name="LlavaNextForConditionalGeneration",
    processor_class_name="LlavaNextProcessor",
    media=frozenset({IMAGE}),
    hub_examples=("llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llava-v1.6-34b-hf"),
)
