"""Where an answer ends on a stop string, and which part of a growing answer is safe to stream.

An answer's text is the text generated with its leading whitespace dropped (the chat templates end right after
"ASSISTANT:", so models begin with a space; LLaVA's own scripts strip it too), cut before the first stop string
found in that text: the same text streamed or not, its trailing whitespace kept (as OpenAI and vLLM keep it).
A streamed piece never holds what could still turn out to start a stop string, nor the replacement character of a
multi-byte character whose bytes have not all arrived, so the pieces join to exactly the final ``Answer.text``.
"""

from __future__ import annotations

from typing import Sequence


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first of the ``stop`` strings starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


def stopped_at(generated: str, stop: Sequence[str]) -> int | None:
    """Where the answer a ``generated`` text gives is cut by a stop string (in ``answer_text``'s terms), or None."""
    return first_stop(generated.lstrip(), stop)


def answer_text(generated: str, stop: Sequence[str]) -> str:
    """The answer a generated text gives: its leading whitespace dropped, cut before the first stop string."""
    text = generated.lstrip()
    cut = first_stop(text, stop)
    return text if cut is None else text[:cut]


class StreamedText:
    """The pieces of one answer safe to send as its text grows."""

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may still be forming
        self.sent = ""
        self.stopped = False

    def update(self, generated: str) -> str:
        """The new piece to send now that the whole text generated so far is ``generated`` ('' if none)."""
        if self.stopped:
            return ""
        text = generated.lstrip()
        cut = first_stop(text, self.stop)
        if cut is not None:
            self.stopped = True
            visible = text[:cut]
        else:
            visible = text[: len(text) - self.hold] if self.hold else text
        visible = visible.rstrip("\ufffd")
        if len(visible) <= len(self.sent) or not visible.startswith(self.sent):
            return ""  # nothing new, or the tokenizer re-spelled earlier text: wait for the final text
        piece, self.sent = visible[len(self.sent):], visible
        return piece

    def finish(self, final_text: str) -> str:
        """The rest of ``final_text`` (the answer's whole text) not yet sent."""
        piece = final_text[len(self.sent):] if final_text.startswith(self.sent) else ""
        self.sent = final_text
        return piece
