"""Our Prometheus metrics, exported next to Ray Serve's own (``ray_serve_*``) by Ray's metrics agent."""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]


class ModelMetrics:
    """Recorded by the model deployment."""

    def __init__(self) -> None:
        self.batch_size = Histogram(
            "video_llava_batch_size", description="Sequences decoding together when a request finishes.", boundaries=[1, 2, 4, 8, 16, 32, 64]
        )
        self.visual_tokens = Counter("video_llava_visual_tokens", description="Visual tokens fed to the LLM.")
        self.generate_latency = Histogram(
            "video_llava_generate_seconds", description="Time from a request's prefill to its last token.", boundaries=LATENCY_BUCKETS_S
        )
        self.kv_positions = Gauge(
            "video_llava_kv_positions", description="KV positions the blocks in use of the paged KV pool "
            "hold (rows and cached prefixes), read when a request finishes."
        )
        self.kv_budget = Gauge(
            "video_llava_kv_budget_positions", description="KV positions the paged KV pool holds for the rows "
            "(batching.max_batch_tokens, as resolved at startup)."
        )


class IngressMetrics:
    """Recorded by the ingress deployment."""

    def __init__(self) -> None:
        self.frames_decoded = Counter("video_llava_frames_decoded", description="Frames decoded and sampled.")
        self.decode_latency = Histogram(
            "video_llava_decode_seconds", description="Time to decode and sample one video.", boundaries=LATENCY_BUCKETS_S
        )
        self.decodes_cancelled = Counter(
            "video_llava_decodes_cancelled",
            description="Decodes stopped (their worker killed and replaced) because the client left or a sibling "
            "medium of the same message failed.",
        )
        self.rejected = Counter(
            "video_llava_rejected_requests", description="Requests answered with an error.", tag_keys=("code",)
        )
