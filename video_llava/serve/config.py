"""``ServeArgs``: the validated ``args:`` block of ``serve_configs/*.yaml`` (the typed application builder's input)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from video_llava.model.settings import ModelSettings
from video_llava.video.decode import SERVICE_LIMITS

API_KEYS_ENV = "VIDEO_LLAVA_API_KEYS"


class LimitSettings(BaseModel):
    """What the service accepts. Anything beyond is a 4xx with a JSON reason."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_upload_bytes: int = Field(200 * 2**20, ge=1, description="largest upload or fetched video")
    max_duration_s: float = Field(600.0, gt=0, description="longest video accepted")
    max_video_pixels: int = Field(SERVICE_LIMITS["max_pixels"], ge=1, description="largest frame area (width x height)")
    max_aspect_ratio: float = Field(
        SERVICE_LIMITS["max_aspect_ratio"], ge=1, description="longest side / shortest side of a frame, at most"
    )
    max_question_chars: int = Field(8000, ge=1)
    fetch_timeout_s: float = Field(20.0, gt=0, description="time allowed to fetch a video URL")
    decode_timeout_s: float = Field(60.0, gt=0, description="time allowed to decode one video")
    # SSRF: by default URLs may only point at public addresses. Tests and private deployments list the
    # hosts (names or CIDR blocks) they trust; file:// is never fetched.
    url_allowlist: list[str] = Field(default_factory=list, description="hosts/CIDRs allowed even if private")
    allow_private_urls: bool = Field(False, description="allow loopback/private/link-local targets (unsafe)")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto) for s3:// URLs")
    s3_buckets: list[str] = Field(
        default_factory=list, description="buckets clients may name in s3:// URLs (empty: no s3:// from clients)"
    )
    max_request_bytes: int = Field(
        400 * 2**20, ge=1, description="all media of one request together (uploads, data: URLs, fetched videos)"
    )
    body_timeout_s: float = Field(60.0, gt=0, description="time allowed to receive a request body (slow clients: 408)")
    # Bearer keys for every /v1 route (empty and no file or environment variable: no authentication).
    api_keys: list[str] = Field(default_factory=list, description="accepted API keys (Authorization: Bearer KEY)")
    api_keys_file: str | None = Field(None, description="file of API keys, one per line, read when the app is built")
    require_api_keys: bool = Field(False, description="refuse to start without keys (configs that listen on 0.0.0.0)")
    enable_docs: bool = Field(False, description="serve /docs and /openapi.json")

    def resolved_api_keys(self) -> list[str]:
        """Keys from ``api_keys``, ``api_keys_file`` and ``$VIDEO_LLAVA_API_KEYS`` (comma-separated)."""
        keys = list(self.api_keys)
        if self.api_keys_file:
            path = Path(self.api_keys_file).expanduser()
            if not path.is_file():
                raise ValueError(f"limits.api_keys_file: no such file: {path}")
            keys += path.read_text().split()
        keys += os.environ.get(API_KEYS_ENV, "").replace(",", " ").split()
        return sorted({k.strip() for k in keys if k.strip()})


class BatchSettings(BaseModel):
    """The model replica's continuous batching: requests join the running decode batch between steps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_size: int = Field(8, ge=1, le=256, description="sequences decoded together")
    max_batch_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        8 * (12288 + 256), description="KV positions the paged KV pool holds for the running rows (blocks of 16 "
        "positions, taken as rows grow: each row holds its own positions, within a block); a request whose prompt, "
        "visual tokens and max_new_tokens need more is refused (400). When the pool runs out, the latest admitted rows "
        "are preempted and recomputed later. auto: what fits in kv_memory_share of the memory free once the model "
        "has loaded, less prefix_cache_mb and the largest step's activations (a profile run on a GPU)")
    kv_memory_share: float = Field(
        0.8, gt=0, le=1, description="with max_batch_tokens: auto, the share of the memory free after loading (the "
        "GPU's, or the host's on a CPU) given to the prefix cache and the batch's KV; the rest is for activations")
    max_waiting: int = Field(256, ge=1, description="requests waiting for room in the batch; beyond, 503 queue_full")
    prefix_cache_mb: int = Field(
        1024, ge=0, description="KV of prompt prefixes (up to the last visual token) kept for repeat questions about the "
        "same media; 0: none. A 32-frame 7B prefix is about 2.4 GB in bf16 (LLaVA-NeXT-Video), 0.4 GB (OneVision)")
    preprocess_ahead: int = Field(
        8, ge=0, le=256, description="waiting requests whose media are made ready ahead (processor and one vision "
        "pass for those taken together), in a thread beside the decode steps; a request joins the batch once they "
        "are (0: at admission, in the model's thread)")
    decode_mode: Literal["dynamic", "static", "compiled"] = Field(
        "dynamic", description="decode steps over the rows and positions in use (dynamic), padded to few shapes "
        "(static), or static and compiled with torch.compile (CUDA graphs on a GPU; compiled at start). The same "
        "tokens in every mode")
    attention: Literal["gather", "flex"] = Field(
        "gather", description="how the attention reads the paged KV: each row's positions gathered from its blocks "
        "for torch's sdpa (gather), or FlexAttention over the pool itself through a block mask (flex: no copy, "
        "compiled on a GPU; dynamic decode steps only). The same tokens")
    max_num_batched_tokens: int = Field(
        1024, ge=2, description="tokens a step computes: every running sequence's next token, then prompts in chunks "
        "with the rest (chunked prefill: a running stream waits at most one step's budget while new prompts arrive); "
        "must be more than max_batch_size")
    max_num_vision_frames: int = Field(
        8, ge=1, description="frames through the vision tower in a step, for the requests admitted (their media "
        "not made ahead): a burst of long videos is run a few frames a step, beside the decode steps")
    ignore_eos: bool = Field(False, description="benchmarks only: every answer runs to its max tokens (bench/serve.py)")

    @model_validator(mode="after")
    def _flex_with_dynamic_steps(self) -> "BatchSettings":
        if self.attention == "flex" and self.decode_mode != "dynamic":
            raise ValueError(f"attention: flex takes decode_mode: dynamic, got {self.decode_mode}")
        return self

    @model_validator(mode="after")
    def _budget_leaves_room_for_prompts(self) -> "BatchSettings":
        if self.max_num_batched_tokens <= self.max_batch_size:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be more than max_batch_size "
                             f"({self.max_batch_size}): each step decodes every running sequence and prefills with "
                             "what is left")
        return self


class DeploymentSettings(BaseModel):
    """Replica resources and scaling for the model deployment (the ingress scales alongside on CPUs)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_gpus: float = Field(0, ge=0, description="GPUs per model replica; with model.tensor_parallel_size N, per rank "
                            "(1: the replica reserves N, one bundle each, on one node)")
    num_cpus: float = Field(1, ge=0)
    num_cpus_per_rank: float = Field(1, ge=0, description="with model.tensor_parallel_size N, CPUs of each of ranks "
                                     "1..N-1 (the replica, rank 0, has num_cpus)")
    model_resources: dict[str, float] = Field(
        default_factory=dict, description="custom resources per model replica, e.g. {model: 1} to pin replicas to nodes that advertise it"
    )
    ingress_resources: dict[str, float] = Field(default_factory=dict, description="custom resources per ingress replica")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0, description="load above the target this long before a replica is added")
    downscale_delay_s: float = Field(600.0, ge=0, description="load below the target this long before one is removed")
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=-1, description="beyond this Serve answers 503 (-1: unbounded)")
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(1, ge=0)
    # Serve's default of 5 in flight per ingress replica let five slow uploads stop the service (/healthz too) and
    # kept the model replicas' batches at about 2; the ingress is async, so hundreds in flight cost little.
    ingress_max_ongoing_requests: int = Field(256, ge=1, description="requests in flight per ingress replica")
    ingress_max_queued_requests: int = Field(512, ge=-1, description="waiting for an ingress replica; then 503")
    decode_workers: int = Field(2, ge=1, description="decode processes per ingress replica")
    decode_wait_s: float = Field(30.0, gt=0, description="how long a request may wait for a free decode process; "
                                 "then 503 decoders_busy with Retry-After")
    decode_cache_mb: int = Field(512, ge=0, description="decoded frames kept per ingress replica for repeat questions")
    decode_worker_memory_mb: int | None = Field(
        4096, ge=256, description="data memory each decode process may hold; past it the request is 422 "
        "decode_out_of_memory and the process is replaced (None: unlimited)")


class ServeArgs(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings)
    served_model_names: list[str] = Field(
        default_factory=list, description="the names clients give as 'model' (the first is the one replies carry and "
        "/v1/models lists first); empty: the model setting itself ('embedded', a hub id or a path). Any other name "
        "is 404 model_not_found")
    limits: LimitSettings = Field(default_factory=LimitSettings)
    batching: BatchSettings = Field(default_factory=BatchSettings)
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)

    @model_validator(mode="after")
    def _consistent(self) -> "ServeArgs":
        if self.deployment.min_replicas > self.deployment.max_replicas:
            raise ValueError("deployment.min_replicas must be <= deployment.max_replicas")
        if self.model.tensor_parallel_size > 1 and self.deployment.num_gpus not in (0, 1):
            raise ValueError(f"deployment.num_gpus is per rank with model.tensor_parallel_size "
                             f"{self.model.tensor_parallel_size}: 1 (a GPU each) or 0 (CPUs), got {self.deployment.num_gpus}")
        if any(not name.strip() for name in self.served_model_names):
            raise ValueError("served_model_names may not hold an empty name")
        return self

    @property
    def model_names(self) -> list[str]:
        """The names this service answers to, the one its replies carry first."""
        return list(self.served_model_names) or [self.model.model]
