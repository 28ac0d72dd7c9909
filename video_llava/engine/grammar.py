"""Structured output: the tokens each constrained row may take next, from a grammar, as a mask the sampler applies
before it draws (greedy rows too), so constrained and free rows share a batch.

The grammar library is llguidance (the one vLLM's ``guidance`` backend and SGLang use): its Rust matcher computes a
row's mask in tens of microseconds on the host for any vocabulary, it compiles JSON schemas (OpenAI's ``json_schema``
with ``strict``, and ``json_object`` as any JSON object) and Lark grammars, and it needs no GPU and no torch
version of its own, so the same code runs on a CPU and beside a GPU (the masks are copied to the logits' device,
unpacked there). A row's matcher consumes each token it samples; the row ends when the grammar is complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Sequence


class GrammarError(ValueError):
    """A response format the grammar library cannot compile; the message says what is wrong with it."""


@dataclass(frozen=True)
class OutputFormat:
    """What a request's answer must be: any JSON object, or JSON valid under a schema (``schema``: its JSON text)."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None

    def grammar(self) -> str:
        """The llguidance grammar of this format (a compiled JSON schema; no whitespace between tokens beyond
        JSON's own, so an answer cannot run on in blank space)."""
        from llguidance import LLMatcher

        schema = self.schema if self.kind == "json_schema" else json.dumps({"type": "object"})
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except (ValueError, TypeError, RuntimeError) as exc:
            raise GrammarError(f"the JSON schema cannot be compiled: {exc}") from exc


class Grammars:
    """Matchers for one tokenizer and vocabulary (the model's logits' width), and the masks of a step's rows."""

    def __init__(self, tokenizer: Any, vocab: int, eos: Sequence[int]):
        self.tokenizer, self.vocab, self.eos = tokenizer, vocab, sorted(eos)
        self._lltokenizer = None

    @property
    def lltokenizer(self) -> Any:
        if self._lltokenizer is None:  # built once, on first use (it reads the whole vocabulary)
            import llguidance.hf

            self._lltokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab, eos_token=self.eos)
        return self._lltokenizer

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher of ``grammar``; ``GrammarError`` if it cannot be used with this tokenizer."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.lltokenizer, grammar)
        if matcher.is_error():
            raise GrammarError(f"the response format cannot be compiled: {matcher.get_error()}")
        return matcher

    def allowed(self, matchers: Sequence[Any], device: Any) -> Any | None:
        """(rows x vocabulary) bool: what each row may take next (every token for a row without a matcher); None
        when no row has one."""
        if all(m is None for m in matchers):
            return None
        import llguidance.torch
        import torch

        packed = llguidance.torch.allocate_token_bitmask(len(matchers), self.vocab)
        packed.fill_(-1)  # all bits set: a free row may take any token
        for i, matcher in enumerate(matchers):
            if matcher is not None:
                llguidance.torch.fill_next_token_bitmask(matcher, packed, i)
        words = packed.to(device)
        bits = (words.unsqueeze(-1) >> torch.arange(32, device=device, dtype=words.dtype)) & 1
        return bits.reshape(len(matchers), -1)[:, :self.vocab].bool()
