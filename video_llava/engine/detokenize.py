"""The text of a growing answer, decoding only its last few tokens per step.

Decoding the whole token list at every step costs O(n) per token (O(n²) per answer), which long streamed captions
feel. The new text of a step is ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``: a few tokens of
context before the new ones keep the tokenizer's spelling at the seam (SentencePiece's dropped leading space, byte
pieces of one character), and text ending in an unfinished character waits for its next bytes (the scheme of
vLLM's incremental detokenizer); a token that re-spells the context (byte pieces that turn out not to form a
character) brings one whole decode. Tested equal to a whole decode on byte-level BPE and byte-fallback SentencePiece
tokenizers; the final ``Answer.text`` is still one whole decode.
"""

from __future__ import annotations

from typing import Any, Collection

CONTEXT = 5  # tokens decoded before the new ones after a resync


class Detokenizer:
    """Text of the tokens added so far (``skip``: ids left out, as end-of-sequence tokens are)."""

    def __init__(self, tokenizer: Any, skip: Collection[int] = ()):
        self.tokenizer, self.skip = tokenizer, set(skip)
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The text so far, with ``token`` added (an unfinished character's bytes wait for the rest)."""
        if token in self.skip:
            return self.text
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if after.endswith("\ufffd"):  # a character whose bytes have not all arrived: wait for them
            return self.text
        if "\ufffd" in after or not after.startswith(before):  # byte pieces that form no character re-spell the
            self.text = self._decode(self.ids)  # text around them (a stripped space among them): one whole decode
            self._prefix, self._read = max(0, len(self.ids) - CONTEXT), len(self.ids)
        elif len(after) > len(before):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self.text
