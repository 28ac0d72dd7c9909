"""Log-probabilities of generated tokens: taken from each step's logits, spelled out as text once the answer ends."""

from __future__ import annotations

from typing import Any, Sequence

from video_llava.model.qa_model import TokenLogprob

Raw = tuple[float, list[tuple[int, float]]]  # the chosen token's log-probability, the top (id, log-probability)


def token_logprobs(logits: Any, token: int, top: int) -> Raw:
    """The chosen token's log-probability under the model's distribution at its position (before temperature and
    top-p), and the ``top`` most likely tokens with theirs."""
    logprobs = logits.float().log_softmax(-1)
    best = logprobs.topk(top) if top else None
    alternatives = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return float(logprobs[token]), alternatives


def spelled(tokenizer: Any, eos: set[int], tokens: Sequence[int], raw: Sequence[Raw], text: str
            ) -> tuple[TokenLogprob, ...]:
    """The answer's tokens up to its end (EOS, and what a stop string cut from ``text``, left out), each as the text
    it adds after the tokens before it (leading space included), with the alternatives spelled the same way."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    out: list[TokenLogprob] = []
    shown = ""
    for k, (token, (logprob, top)) in enumerate(zip(tokens, raw)):
        if token in eos or len(shown.strip()) >= len(text):
            break
        before = decode(list(tokens[:k]))
        piece = lambda t: decode(list(tokens[:k]) + [t])[len(before):]  # noqa: E731
        out.append(TokenLogprob(piece(token), logprob, tuple((piece(t), lp) for t, lp in top)))
        shown += out[-1].token
    return tuple(out)
