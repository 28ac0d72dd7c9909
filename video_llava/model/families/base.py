"""What every family says about itself, and the default behaviour most of them share.

A family turns media into visual tokens the way its transformers model does inside ``forward``: the same
``get_image_features``/``get_video_features`` calls on the same processor outputs, flattened in the same order, so
the features can be cached by content and spliced into ``inputs_embeds`` (tested token-identical against
transformers' own ``generate(pixel_values=...)`` per family). Token counts come from the family's processor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

IMAGE, VIDEO = "image", "video"
# Videos are decoded with their shorter side at this many times the side the vision tower takes (or as they are when
# smaller), so that the processor's own antialiased resize does the last step. Decoding at the tower's side itself
# left the decoders' scalers (swscale, decord) as the last filter, and the even-rounded size they give shifted the
# processor's centre crop by a pixel: on a 1280x720 clip, LLaVA-NeXT-Video's pixel values then differed from the
# processor's own on the full frames by 3.4x what swapping its bicubic filter for bilinear does; at 1.5x the side
# they equalled it, at 2x they were 0.73 of it (tests/test_frame_size.py measures it).
DECODE_MARGIN = 2


class UnsupportedMediaError(ValueError):
    """The loaded model does not take this medium (a video for LLaVA-1.5); the message names what it takes."""

    def __init__(self, message: str, medium: str):
        super().__init__(message)
        self.medium = medium


def media_kind(item: np.ndarray) -> str:
    """``image`` for an (H, W, 3) array, ``video`` for (N, H, W, 3) frames."""
    if item.ndim == 3 and item.shape[-1] == 3:
        return IMAGE
    if item.ndim == 4 and item.shape[-1] == 3 and item.shape[0] >= 1:
        return VIDEO
    raise ValueError(f"expected an image (H, W, 3) or video frames (N, H, W, 3), got shape {item.shape}")


@dataclass(frozen=True)
class Family:
    """One LLaVA family: its transformers classes, media, token accounting and context policy.

    ``scales_rope``: the LLM was trained on fewer positions than a long video needs, so LLaVA-NeXT's linear RoPE
    rule sizes a factor for ``max_frames`` (LLaVA-NeXT-Video's Vicuna); otherwise no scaling unless forced.
    """

    name: str
    label: str
    model_type: str
    model_class_name: str
    processor_class_name: str
    media: frozenset[str]
    scales_rope: bool = False
    hub_examples: tuple[str, ...] = field(default=())

    # ---- choosing and loading ------------------------------------------------------------------------------
    def matches(self, config: Any, weight_names: frozenset[str]) -> bool:
        return getattr(config, "model_type", None) == self.model_type

    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class_name)

    def processor_class(self) -> type:
        import transformers

        return getattr(transformers, self.processor_class_name)

    def check_config(self, config: Any) -> None:
        """Refuse a checkpoint whose shape this code cannot account for (raise ``ValueError`` saying why)."""

    def prepare_config(self, config: Any, settings: Any) -> None:
        """Apply our settings to a loaded config before the weights load (pooling mode, say)."""

    def complete_processor(self, processor: Any, config: Any) -> None:
        """Fill processor fields older or hand-made processor configs leave out, from the model's config.

        ``patch_size``/``vision_feature_select_strategy`` size the visual-token placeholders;
        ``num_additional_image_tokens`` is 1 for CLIP towers (the CLS token): left at 0, the processor expands
        ``<image>`` one token per image short and a forward with images fails with "Image features and image
        tokens do not match".
        """
        if getattr(processor, "patch_size", "absent") is None:
            processor.patch_size = config.vision_config.patch_size
        if hasattr(processor, "vision_feature_select_strategy") and processor.vision_feature_select_strategy is None:
            processor.vision_feature_select_strategy = config.vision_feature_select_strategy
        if (hasattr(processor, "num_additional_image_tokens") and not processor.num_additional_image_tokens
                and config.vision_config.model_type == "clip_vision_model"):
            processor.num_additional_image_tokens = 1

    def config_tokens_per_frame(self, config: Any) -> int:
        """Visual tokens per video frame from the config's vision geometry, before the processor is loaded (the
        RoPE rule needs it); the loaded model counts with the processor, and a test holds the two equal."""
        return 0

    def context(self, config: Any) -> int:
        return int(config.text_config.max_position_embeddings)

    def tower_side(self, processor: Any) -> int:
        """The side in pixels of the square the vision tower sees a frame as, from the processor that prepares
        the family's frames (its video processor where it takes videos, else its image processor)."""
        frames = getattr(processor, "video_processor", None) if VIDEO in self.media else None
        return max(crop_size(frames or processor.image_processor))

    def frame_short_side(self, processor: Any) -> int:
        """The shorter side videos are decoded at for this checkpoint (``DECODE_MARGIN`` times the tower's)."""
        return DECODE_MARGIN * self.tower_side(processor)

    # ---- media and tokens ----------------------------------------------------------------------------------
    def check_media(self, kinds: Sequence[str]) -> None:
        for kind in kinds:
            if kind not in self.media:
                takes = " and ".join(sorted(f"{m}s" for m in self.media))
                raise UnsupportedMediaError(f"the loaded model ({self.label}) takes {takes}, not {kind}s", kind)

    def tokens_per_frame(self, processor: Any) -> int:
        """Visual tokens per video frame (0 for families without video)."""
        return 0

    def video_tokens(self, processor: Any, num_frames: int) -> int:
        """Visual tokens one video of ``num_frames`` frames becomes."""
        return num_frames * self.tokens_per_frame(processor)

    def image_tokens(self, processor: Any, sizes: Sequence[tuple[int, int]]) -> list[int]:
        """Visual tokens of each image of one message, from their (height, width)."""
        raise NotImplementedError

    # ---- features ------------------------------------------------------------------------------------------
    def image_inputs(self, processor: Any, groups: Sequence[Sequence[np.ndarray]], device: Any = None
                     ) -> dict[str, Any]:
        """The processor's tensors for the images of several messages (``groups``: each message's, in order; what
        ``generate`` would receive for a batch of them), made on ``device`` (the processor resizes and normalises
        there: the model's device, not the CPU, when given)."""
        images = [image for group in groups for image in group]
        return dict(processor.image_processor(images=images, return_tensors="pt", **on_device(device)))

    def image_features(self, model: Any, inputs: dict[str, Any]) -> Any:
        """(tokens, hidden) features of all those images, message after message, as ``forward`` splices them."""
        import torch

        kwargs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items() if k != "pixel_values"}
        pixels = inputs["pixel_values"].to(model.device, model.dtype)
        out = model.get_image_features(pixel_values=pixels, **kwargs, return_dict=True)
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in out.pooler_output], dim=0)

    def video_features(self, model: Any, processor: Any, videos: Sequence[np.ndarray]) -> list[Any]:
        """(tokens, hidden) features of each of ``videos`` (all of one shape), as ``forward`` splices them: one
        pass through the vision tower for all of them (the batch ``forward`` itself takes), the uint8 frames
        resized and normalised by the processor on the model's device."""
        pixels = processor.video_processor(videos=list(videos), return_tensors="pt",
                                           **on_device(model.device))["pixel_values_videos"]
        out = model.get_video_features(pixel_values_videos=pixels.to(model.device, model.dtype), return_dict=True)
        return [features.reshape(-1, features.shape[-1]) for features in out.pooler_output]

    def describe(self) -> dict:
        return {"family": self.label, "media": sorted(self.media), "rope": "linear, sized for max_frames"
                if self.scales_rope else "as declared (none unless forced)"}


def on_device(device: Any) -> dict[str, str]:
    """The processor keyword that makes it resize and normalise on ``device`` (none: where it likes, the CPU)."""
    return {} if device is None else {"device": str(device)}


def anyres_image_tokens(processor: Any, sizes: Sequence[tuple[int, int]], tile: tuple[int, int]) -> list[int]:
    """LLaVA-NeXT/OneVision AnyRes counts from the processor's own arithmetic (grid pinpoints, unpadding)."""
    counts = []
    for height, width in sizes:
        n = processor._get_number_of_features(int(height), int(width), tile[0], tile[1])
        if processor.vision_feature_select_strategy == "default":
            n -= 1
        counts.append(n)
    return counts


def crop_size(image_processor: Any) -> tuple[int, int]:
    """(height, width) each tile or frame is processed at."""
    for name in ("crop_size", "size"):
        size = getattr(image_processor, name, None)
        if size is None:
            continue
        size = size if isinstance(size, dict) else {k: getattr(size, k, None) for k in ("height", "width", "shortest_edge")}
        if size.get("height") and size.get("width"):
            return int(size["height"]), int(size["width"])
        if size.get("shortest_edge"):
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise ValueError("the image processor declares no crop_size or size")


def pooled(grid: int, stride: int = 2) -> int:
    return math.ceil(grid / stride) ** 2


registered: list[Family] = []


def weight_names(source: str) -> frozenset[str]:
    """Parameter names a local checkpoint holds (from its safetensors headers; empty when not local)."""
    import json
    from pathlib import Path

    root = Path(source)
    if not root.is_dir():
        return frozenset()
    index = root / "model.safetensors.index.json"
    if index.exists():
        return frozenset(json.loads(index.read_text()).get("weight_map", {}))
    names: set[str] = set()
    for shard in root.glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as handle:
            names.update(handle.keys())
    return frozenset(names)


def family_of(config: Any, source: str = "") -> Family:
    """The family of a checkpoint, from its config's ``model_type`` (and weights where that is ambiguous)."""
    names = weight_names(source) if source else frozenset()
    for family in registered:
        if family.matches(config, names):
            return family
    known = ", ".join(sorted({f.model_type for f in registered}))
    raise ValueError(f"a {getattr(config, 'model_type', None)!r} checkpoint is not of a supported LLaVA family "
                     f"(model_type one of {known})")
