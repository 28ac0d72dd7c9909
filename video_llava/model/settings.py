"""``ModelSettings``: every knob of the video recipe and the runtime, validated once."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from video_llava.model.prompts import ChatTemplateName
from video_llava.video.sampling import SamplingMode

EMBEDDED = "embedded"
EMBEDDED_INIT = "embedded-init"  # the untrained tiny model the embedded default was trained from
DEFAULT_FRAMES = 32  # frames sampled per video unless a request says otherwise
MAX_FRAMES = 56  # LLaVA-NeXT-Video's largest recipe (RoPE x3 on a 4096-position LLM)


class ModelSettings(BaseModel):
    """How to load LLaVA-NeXT-Video and shape its inputs.

    ``rope_scaling_factor``: ``None`` derives it: the smallest factor that fits ``max_frames`` by LLaVA-NeXT's
    rule (ceil((max_frames x 144 + 1000) / 4096)), but never below a factor the checkpoint declares (it was
    fine-tuned with that one). A number forces that factor; 1.0 turns scaling off.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(EMBEDDED, description="'embedded', 'embedded-init', a hub id such as llava-hf/LLaVA-NeXT-Video-7B-hf, or a local path")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    num_frames: int = Field(DEFAULT_FRAMES, ge=1, description="frames sampled per video by default")
    max_frames: int = Field(MAX_FRAMES, ge=1, le=512, description="largest frame count a request may use")
    sampling: SamplingMode = Field(SamplingMode.UNIFORM, description="default frame sampling mode")
    sample_fps: float = Field(1.0, gt=0, description="frames per second in fps sampling mode")
    spatial_pool_stride: int = Field(2, description="stride of the pooling of the 24x24 patch grid (must be 2)")
    spatial_pool_mode: Literal["average", "max"] = "average"
    rope_scaling_factor: float | None = Field(None, ge=1.0, description="RoPE linear scaling; None derives it")
    base_context: int | None = Field(None, ge=256, description="positions the LLM was trained on; None reads the config")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="devices one replica's model spans (tensor parallelism through transformers' "
        "tp_plan: the LLM's layers split by heads across one process per device; engine/shards.py)")
    device_memory_gb: float | None = Field(
        None, gt=0, description="memory of one device the weights are checked against at start (a rank's share must "
        "fit in 85% of it); None: the GPU's own (no check on a CPU)")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    chat_template: ChatTemplateName = "auto"
    max_new_tokens: int = Field(128, ge=1, le=4096)
    video_pruning_rate: float = Field(0.0, ge=0.0, lt=1.0, description="share of each video's tokens dropped before "
                                      "the LLM by default (the first frame kept whole; of the later frames' tokens, "
                                      "those least changed from the frame before; model.pruning); a request may ask "
                                      "its own")
    feature_cache_mb: int = Field(
        256, ge=0, description="vision features kept for repeat questions about the same frames (0 disables)"
    )
    local_files_only: bool = Field(False, description="never contact the hub (also implied by HF_HUB_OFFLINE=1)")
    retain_freed_memory: bool = Field(
        True, description="keep large freed CPU buffers in the process for the next request instead of unmapping them "
        "(glibc; no page faults on each video's pixels; the process keeps its peak memory): model/allocator.py")

    @field_validator("spatial_pool_stride")
    @classmethod
    def _stride_is_two(cls, value: int) -> int:
        if value != 2:
            raise ValueError(
                f"spatial_pool_stride={value} is not supported: transformers' LlavaNextVideoProcessor counts "
                "video tokens as patches // 4, which is only right for stride 2 (12x12 = 144 tokens per frame)"
            )
        return value

    def model_post_init(self, __context) -> None:
        if self.num_frames > self.max_frames:
            raise ValueError(f"num_frames={self.num_frames} exceeds max_frames={self.max_frames}; lower num_frames or raise max_frames")
