"""What the engine tells a request's owner, in order: text pieces, then ``Finished`` or ``Failed``."""

from __future__ import annotations

from dataclasses import dataclass

from video_llava.model.answers import Answer


@dataclass(frozen=True)
class TextPiece:
    """New answer text, safe to send (the pieces join to ``Answer.text``)."""

    text: str
    index: int = 0  # which of the request's ``n`` answers


@dataclass(frozen=True)
class Finished:
    """One of the request's answers is complete (a request of ``n`` answers has ``n`` of these)."""

    answer: Answer
    queue_s: float  # from submission to the start of its prefill
    index: int = 0


@dataclass(frozen=True)
class Failed:
    """The request failed alone (its prefill, or the decode step it was in); the engine keeps serving."""

    error: BaseException


Event = TextPiece | Finished | Failed
