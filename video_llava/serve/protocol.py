"""Request/response schemas of the HTTP API and the typed error every failure leaves as."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from video_llava.sampling import SamplingMode


class ServiceError(Exception):
    """An error with an HTTP status that leaves the service as ``{"error": {...}}`` JSON (OpenAI's shape)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


class GenerationOptions(BaseModel):
    """Per-request knobs shared by both APIs."""

    num_frames: int | None = Field(None, ge=1, description="frames to sample (service default 32, at most max_frames)")
    sampling: SamplingMode | None = Field(None, description="'uniform' or 'fps'")
    sample_fps: float | None = Field(None, gt=0, le=30, description="frames per second in fps mode")
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)


class QARequest(GenerationOptions):
    """JSON body of ``POST /v1/video/qa``."""

    model_config = ConfigDict(extra="forbid")

    video_url: str = Field(..., description="http(s)://, s3://bucket/key or data:video/...;base64,...")
    question: str = Field(..., min_length=1)


class Timings(BaseModel):
    fetch_s: float = 0.0
    decode_s: float = 0.0
    queue_s: float = 0.0
    vision_s: float = 0.0  # vision tower + projector, before generate_s (0 when the features were cached)
    generate_s: float = 0.0
    total_s: float = 0.0


class CacheUse(BaseModel):
    decode: bool = False  # frames came from the ingress cache (same bytes, same sampling)
    vision: bool = False  # vision features came from the model replica's cache


class Usage(BaseModel):
    visual_tokens: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class QAResponse(BaseModel):
    answer: str
    model: str
    num_frames: int
    sampled_indices: list[int]
    timestamps: list[float]
    finish_reason: str
    usage: Usage
    timings: Timings
    cached: CacheUse
    video: dict[str, Any]


# ---- OpenAI-compatible chat completions ------------------------------------------------------------------------
class _URL(BaseModel):
    url: str


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class VideoURLPart(BaseModel):
    type: Literal["video_url"]
    video_url: _URL


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart | VideoURLPart] | None = None


class ChatCompletionRequest(GenerationOptions):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use (n=1, user, ...)

    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    n: int = Field(1, ge=1, le=1)

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens or self.max_new_tokens


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_response(cid: str, model: str, text: str, finish_reason: str, usage: Usage, extra: dict) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": usage.prompt_tokens + usage.visual_tokens, "completion_tokens": usage.completion_tokens,
                  "total_tokens": usage.total_tokens},
        "video_llava": extra,
    }


def chat_chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
