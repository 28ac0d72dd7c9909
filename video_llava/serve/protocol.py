"""The service's types: HTTP request/response schemas (pydantic), the typed error every failure leaves as, and
what crosses the Serve handle between the ingress and the model deployment (``ModelRequest`` -> ``ModelReply`` or
``ModelError``; a stream yields text pieces, then one of those)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from video_llava.engine.grammar import OutputFormat
from video_llava.model.prompts import Turn
from video_llava.model.pruning import VideoPruning
from video_llava.model.qa_model import Answer
from video_llava.video.sampling import SamplingMode

RETRY_AFTER_S = "2"  # what a 503 asks clients to wait


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


# ---- across the Serve handle: ingress -> model deployment ------------------------------------------------------
@dataclass(frozen=True)
class ModelRequest:
    """One conversation about decoded media, as the ingress hands it to the model deployment.

    ``turns``: system text, earlier turns and the question (the last user turn); each user turn carries its
    images (H, W, 3) and sampled video frames (N, H, W, 3) as uint8 arrays, in order.
    """

    turns: tuple[Turn, ...]
    max_new_tokens: int | None = None  # None: the model's default
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # sampling seeded: the request is sampled alone, so its batch-mates cannot change it
    stop: tuple[str, ...] = ()  # the answer ends before the first of these
    n: int = 1  # answers sampled from one prefill
    logprobs: bool = False
    top_logprobs: int = 0
    top_k: int = 0  # 0: no bound
    priority: int = 0  # lower is admitted first (clients do not set it: the service's own classes of traffic)
    pruning: VideoPruning | None = None  # the video token budget asked (None: the model's default)
    response_format: OutputFormat | None = None  # structured output: the answer is JSON of this format

    @property
    def media(self) -> list[np.ndarray]:
        return [m for turn in self.turns for m in turn.media]

    @property
    def num_frames(self) -> int:
        return sum(m.shape[0] for m in self.media if m.ndim == 4)


@dataclass(frozen=True)
class ModelReply:
    """The model deployment's answer, with how long the request waited for its batch."""

    answer: Answer  # the first of ``answers``
    queue_s: float = 0.0
    answers: tuple[Answer, ...] = ()  # all ``n`` of them, in order (empty: just ``answer``)

    @property
    def choices(self) -> tuple[Answer, ...]:
        return self.answers or (self.answer,)


@dataclass(frozen=True)
class ModelPiece:
    """Streamed answer text of choice ``index``, as generated."""

    text: str
    index: int = 0


@dataclass(frozen=True)
class ModelChoice:
    """Streamed: choice ``index`` is complete (its text was sent in pieces; its counts and logprobs are here)."""

    answer: Answer
    index: int = 0


@dataclass(frozen=True)
class ModelError:
    """A request the model deployment refused (it does not fit the context), as the HTTP error it becomes.

    Returned, not raised: a value crosses the handle as it is, where an exception would arrive wrapped by Ray.
    """

    status: int
    message: str
    code: str
    param: str | None = None

    def exception(self) -> ServiceError:
        if self.status == 503:  # at capacity, or out of memory for now: the client may retry
            return ServiceError(503, self.message, type="overloaded", code=self.code, param=self.param,
                                headers={"Retry-After": RETRY_AFTER_S})
        return ServiceError(self.status, self.message, code=self.code, param=self.param)


class GenerationOptions(BaseModel):
    """Per-request knobs shared by both APIs."""

    num_frames: int | None = Field(None, ge=1, description="frames to sample (service default 32, at most max_frames)")
    sampling: SamplingMode | None = Field(None, description="'uniform' or 'fps'")
    sample_fps: float | None = Field(None, gt=0, le=30, description="frames per second in fps mode")
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens only (0: no bound); as vLLM's")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="with temperature > 0: the same request samples "
                             "the same answer, whatever else is being answered")
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the answer ends before the first one")
    json_schema: dict[str, Any] | None = Field(
        None, description="the answer is JSON valid under this schema (structured output; on /v1/video/qa, a JSON "
        "string in a multipart form)")
    video_pruning_rate: float | None = Field(
        None, ge=0.0, lt=1.0, description="share of each video's tokens dropped before the LLM: the first frame kept "
        "whole, of the later frames' tokens those least changed from the frame before (default: the service's)")
    video_token_budget: int | None = Field(
        None, ge=1, description="at most this many tokens of each video reach the LLM (at least one frame's), the "
        "same rule choosing them; with video_pruning_rate, the smaller count")

    def video_pruning(self) -> VideoPruning | None:
        """The video token budget asked, if any (``model.pruning``)."""
        if self.video_pruning_rate is None and self.video_token_budget is None:
            return None
        return VideoPruning(self.video_pruning_rate or 0.0, self.video_token_budget)

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_text(cls, value):
        if isinstance(value, str):  # a multipart form's field
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"json_schema is not JSON: {exc}") from None
        return value

    def output_format(self) -> OutputFormat | None:
        """The structured output asked for, if any."""
        return OutputFormat("json_schema", json.dumps(self.json_schema)) if self.json_schema is not None else None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give at most 4 non-empty stop strings")
        return stops or None

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class QARequest(GenerationOptions):
    """JSON body of ``POST /v1/video/qa``: one of ``video_url`` and ``image_url``, and the question."""

    model_config = ConfigDict(extra="forbid")

    video_url: str | None = Field(None, description="http(s)://, s3://bucket/key or data:video/...;base64,...")
    image_url: str | None = Field(None, description="http(s)://, s3://bucket/key or data:image/...;base64,...")
    question: str = Field(..., min_length=1)

    @model_validator(mode="after")
    def _one_medium(self) -> "QARequest":
        if (self.video_url is None) == (self.image_url is None):
            raise ValueError("give exactly one of video_url and image_url")
        return self


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

    @classmethod
    def of(cls, answer: Answer) -> "Usage":
        return cls(visual_tokens=answer.visual_tokens, prompt_tokens=answer.prompt_tokens,
                   completion_tokens=answer.completion_tokens,
                   total_tokens=answer.visual_tokens + answer.prompt_tokens + answer.completion_tokens)


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
    video: dict[str, Any] | None = None  # the video's metadata (for an image question: None, see ``image``)
    image: dict[str, Any] | None = None  # width, height, format of the image asked about


# ---- OpenAI-compatible chat completions ------------------------------------------------------------------------
class _URL(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str


class _ImageURL(_URL):
    detail: Literal["auto"] = Field("auto", description="only 'auto': images are tiled as the model's family does")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class VideoURLPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["video_url"]
    video_url: _URL


class ImageURLPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: _ImageURL


ContentPart = Annotated[TextPart | VideoURLPart | ImageURLPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One message. ``developer`` is read as ``system`` (as OpenAI does for older models); ``tool`` messages and
    tool calls are refused: this service has no tools. ``name`` (a participant's name) goes to the chat template,
    which renders it where it has a place for it."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="a last chunk, with empty choices, carries the usage")


# OpenAI parameters this service does not implement, with the values that change nothing (sent by some clients as
# defaults): any other value is refused with 400 naming the parameter, never silently ignored.
NO_OP_PARAMETERS: dict[str, tuple] = {
    "frequency_penalty": (0, None), "presence_penalty": (0, None),
    "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none"), "parallel_tool_calls": (None,), "service_tier": (None, "auto"),
    "store": (None, False), "metadata": (None, {}), "modalities": (None, ["text"]),
}
ACCEPTED_UNUSED = {"user"}  # an end-user id for the caller's own records: it cannot change an answer


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the answer always follows the schema here: constrained decoding, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object) or ``json_schema``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("give json_schema with type 'json_schema', and only then")
        return self


class ChatCompletionRequest(GenerationOptions):
    model_config = ConfigDict(extra="allow")  # then checked by ``unsupported_parameters``: refused by name

    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    n: int = Field(1, ge=1, le=8, description="answers sampled from one prefill (seeded: seed, seed + 1, ...)")
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = Field(False, description="each answer token's log-probability under the model")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: the most likely tokens at each "
                                     "position")

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens or self.max_new_tokens

    def unsupported_parameters(self) -> list[str]:
        """Parameters sent with a value this service would have to ignore (see ``NO_OP_PARAMETERS``)."""
        extra = self.model_extra or {}
        names = [name for name, value in extra.items()
                 if name not in ACCEPTED_UNUSED and value not in NO_OP_PARAMETERS.get(name, ())]
        return sorted(names)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.stream_options is not None and self.stream_options.include_usage and not self.stream:
            raise ValueError("stream_options.include_usage needs stream: true (a whole answer carries its usage)")
        return self

    def output_format(self) -> OutputFormat | None:
        """The structured output asked for: ``response_format`` (``json_schema`` is the QA route's field)."""
        if self.json_schema is not None:
            raise ValueError("json_schema is the /v1/video/qa field; the chat API takes response_format")
        f = self.response_format
        if f is None or f.type == "text":
            return None
        if f.type == "json_object":
            return OutputFormat("json_object")
        return OutputFormat("json_schema", json.dumps(f.json_schema.schema_))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut]

    @classmethod
    def of(cls, answer: Answer) -> "ChoiceLogprobs | None":
        if answer.logprobs is None:
            return None
        entry = lambda t: dict(token=t.token, logprob=t.logprob, bytes=list(t.bytes))  # noqa: E731
        return cls(content=[TokenLogprobOut(**entry(t), top_logprobs=[TopLogprob(**entry(alt)) for alt in t.top])
                            for t in answer.logprobs])


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int  # text and visual tokens: what the LLM read
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, answers: Sequence[Answer]) -> "CompletionUsage":
        """The prompt counted once, the completions of the ``n`` answers summed (as OpenAI does for n > 1)."""
        prompt = answers[0].prompt_tokens + answers[0].visual_tokens
        completion = sum(a.completion_tokens for a in answers)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    video_llava: dict[str, Any]  # our extras: frames per video, timings, cache use

    @classmethod
    def of(cls, cid: str, model: str, answers: Sequence[Answer], extra: dict) -> "ChatCompletionResponse":
        """One choice per answer; the prompt is counted once, the completions summed (as OpenAI does for n > 1)."""
        return cls(
            id=cid, model=model,
            choices=[ChatChoice(index=i, message=ChatCompletionMessage(content=a.text), finish_reason=a.finish_reason,
                                logprobs=ChoiceLogprobs.of(a)) for i, a in enumerate(answers)],
            usage=CompletionUsage.of(answers), video_llava=extra,
        )


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, index: int = 0,
               logprobs: ChoiceLogprobs | None = None, with_usage: bool = False) -> dict:
    """One server-sent event's payload in OpenAI's ``chat.completion.chunk`` shape (``with_usage``: the stream
    asked for usage, so every chunk has ``usage: null`` until the last one)."""
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
    if logprobs is not None:
        choice["logprobs"] = logprobs.model_dump()
    chunk = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(cid: str, model: str, answers: Sequence[Answer]) -> dict:
    """The stream's last chunk when it asked for usage: no choices, the usage counted as a whole answer's."""
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": [],
            "usage": CompletionUsage.of(answers).model_dump()}
