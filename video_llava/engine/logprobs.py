"""Log-probabilities of generated tokens, spelled out once an answer ends: one entry per generated token (its end
of sequence too), each with its own bytes and the text it adds, in one pass over the answer.

A token's bytes come from the tokenizer's vocabulary (byte-level BPE's byte alphabet; SentencePiece's ``▁`` and
``<0xNN>`` byte pieces), not from decoding prefixes of the answer again for every token (quadratic). The text of an
entry is what an incremental UTF-8 decoder gives when the token's bytes arrive: a character split over byte pieces
belongs to the token that completes it, so the entries' texts join to the answer as generated and their bytes to
its UTF-8. Alternatives are spelled as they would continue the answer at that position.
"""

from __future__ import annotations

import codecs
from typing import Any, Sequence

from video_llava.engine.sampler import Raw
from video_llava.model.answers import TokenLogprob


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-character table, reversed: the character byte-level BPE writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenBytes:
    """Each token id's own bytes for one tokenizer (special tokens, which answers skip: none)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        decoder = str(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", ""))
        self.byte_level = "ByteLevel" in decoder
        self.alphabet = _byte_level_alphabet() if self.byte_level else {}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        found = self._cache.get(token)
        if found is None:
            found = self._cache[token] = self._bytes(token)
        return found

    def _bytes(self, token: int) -> bytes:
        if token in self.special:
            return b""
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if piece is None:
            return b""
        if self.byte_level and all(c in self.alphabet for c in piece):
            return bytes(self.alphabet[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece's byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()


def spelled(token_bytes: TokenBytes, tokens: Sequence[int], raw: Sequence[Raw]) -> tuple[TokenLogprob, ...]:
    """One ``TokenLogprob`` per generated token, from the raw figures the sampler gave at each step."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out: list[TokenLogprob] = []
    for token, (logprob, top) in zip(tokens, raw):
        state = decoder.getstate()
        alternatives = []
        for alternative, alternative_logprob in top:
            decoder.setstate(state)
            own = token_bytes(alternative)
            alternatives.append(TokenLogprob(decoder.decode(own), alternative_logprob, own))
        decoder.setstate(state)
        own = token_bytes(token)
        out.append(TokenLogprob(decoder.decode(own), logprob, own, tuple(alternatives)))
    return tuple(out)
