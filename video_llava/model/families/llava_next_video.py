"""LLaVA-NeXT-Video: video (each frame's 24x24 CLIP grid pooled to 12x12 = 144 tokens) and AnyRes images; Vicuna's
4096 positions stretched by linear RoPE scaling to fit the frames."""

from __future__ import annotations

from typing import Any, Sequence

from video_llava.model.families.base import IMAGE, VIDEO, Family, anyres_image_tokens, crop_size, pooled


class LlavaNextVideoFamily(Family):
    def check_config(self, config: Any) -> None:
        if config.spatial_pool_stride != 2:
            raise ValueError(
                f"checkpoint pools with stride {config.spatial_pool_stride}; only stride 2 gives the token count "
                "transformers' processor assumes (144 per frame at 336 px)"
            )

    def prepare_config(self, config: Any, settings: Any) -> None:
        if config.spatial_pool_mode in ("average", "max"):  # parameter-free modes; "conv" has weights, keep it
            config.spatial_pool_mode = settings.spatial_pool_mode

    def config_tokens_per_frame(self, config: Any) -> int:
        vision = config.vision_config
        return pooled(vision.image_size // vision.patch_size, config.spatial_pool_stride)

    def tokens_per_frame(self, processor: Any) -> int:
        height, width = crop_size(processor.video_processor)
        return (height // processor.patch_size) * (width // processor.patch_size) // 4  # stride-2 pooling

    def image_tokens(self, processor: Any, sizes: Sequence[tuple[int, int]]) -> list[int]:
        return anyres_image_tokens(processor, sizes, crop_size(processor.image_processor))


LLAVA_NEXT_VIDEO = LlavaNextVideoFamily(
    name="llava_next_video",
    label="LLaVA-NeXT-Video",
    model_type="llava_next_video",
    model_class_name="LlavaNextVideoForConditionalGeneration",
    processor_class_name="LlavaNextVideoProcessor",
    media=frozenset({VIDEO, IMAGE}),
    scales_rope=True,
    hub_examples=("llava-hf/LLaVA-NeXT-Video-7B-hf", "llava-hf/LLaVA-NeXT-Video-7B-DPO-hf",
                  "llava-hf/LLaVA-NeXT-Video-7B-32K-hf", "llava-hf/LLaVA-NeXT-Video-34B-hf"),
)
