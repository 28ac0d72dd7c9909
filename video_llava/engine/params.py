"""How one request is sampled: per row of the running batch, whatever its batch-mates ask."""

from __future__ import annotations

from dataclasses import dataclass

from video_llava.engine.grammar import OutputFormat


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # a sampled row draws from its own random stream: the same seed, the same answer
    stop: tuple[str, ...] = ()  # the answer ends before the first of these
    ignore_eos: bool = False  # benchmarks only: every answer runs to max_new_tokens
    n: int = 1  # answers sampled from one prefill (each its own stream: seed, seed + 1, ...)
    logprobs: bool = False  # each answer token's log-probability under the model (before temperature/top-p)
    top_logprobs: int = 0  # and this many most likely tokens at each position
    top_k: int = 0  # 0: no bound; else only the k most likely tokens (ties with the k-th included)
    response_format: OutputFormat | None = None  # structured output: the answer is JSON of this format

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1 or not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"n must be >= 1 and top_logprobs in 0..20, got {self.n}, {self.top_logprobs}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"temperature must be >= 0, top_p in (0, 1] and top_k >= 0, got {self.temperature}, "
                             f"{self.top_p}, {self.top_k}")
