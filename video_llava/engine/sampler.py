"""The next token of every row of a step, in one set of tensor operations on the logits' device.

Greedy rows take the argmax (as ``generate`` with ``do_sample=False``). Sampled rows draw from their temperature,
top-k and top-p distribution by inverse CDF with a uniform that is a hash of (the row's stream, its token index,
the round): no generator state, so a seeded row draws the same tokens whatever rows share its batch, and nothing
moves to the host but the step's results (one copy for all rows).

Top-p without sorting the vocabulary (sorting 32 rows of 152k on a CPU took 210 ms; the per-row host path it
replaces, 550 ms a step): a token is in the top-p set when the probability of the tokens strictly more likely than
it is below ``top_p``. A draw from the whole distribution that lands outside the set rules out every token no more
likely than it, and the row draws again from the rest (the rejection scheme of FlashInfer's top-p sampling, which
vLLM uses on GPUs): each accepted token is distributed as the distribution restricted to the set, and a round
accepts with probability at least ``top_p``. The first round runs for every row at once; the rare rows it rejects
run further rounds by themselves (one more copy to the host per round). Ties at the boundary enter the set together.

Logprobs are the model's own (log-softmax of the raw logits, before temperature and filtering), the chosen token's
and the ``top_logprobs`` most likely, for the rows that ask.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from video_llava.engine.params import SamplingParams

Raw = tuple[float, list[tuple[int, float]]]  # the chosen token's log-probability, the top (id, log-probability)


class SamplingError(RuntimeError):
    """A row's distribution could not be sampled (its logits are not finite)."""


@dataclass(frozen=True)
class RowDraw:
    """What one row of a step samples with: its request's parameters, its random stream and how many tokens it drew
    before this one (the stream and that count are what its uniforms are a hash of)."""

    params: SamplingParams
    stream: int
    drawn: int


@dataclass
class StepSample:
    """Per row: its token (or the error its sampling met: that row alone fails) and, when asked, its logprobs."""

    tokens: list[int | Exception]
    logprobs: list[Raw | None]


def new_stream(seed: int | None) -> int:
    """A row's random stream: its seed, else 63 bits of the system's entropy."""
    return seed if seed is not None else random.SystemRandom().getrandbits(63)


def _mul32(x: Any, c: int) -> Any:
    """(x * c) mod 2**32 for int64 tensors in [0, 2**32), in two halves so that nothing overflows 63 bits."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & 0xFFFFFFFF


def _mix32(x: Any) -> Any:
    """A 32-bit integer hash with full avalanche (Chris Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(streams: Any, drawn: Any, round_: int) -> Any:
    """Per row a float64 uniform in [0, 1) that depends only on (stream, drawn, round): 53 bits from two hashes."""
    import torch

    lo, hi = streams & 0xFFFFFFFF, (streams >> 32) & 0x7FFFFFFF
    salt = _mix32(torch.full_like(drawn, (round_ + 0x9E3779B9) & 0xFFFFFFFF))
    key = _mix32(lo ^ _mix32(hi ^ _mix32((drawn & 0xFFFFFFFF) ^ salt)))
    first, second = _mix32(key ^ 0x68E31DA4), _mix32(key ^ 0xB5297A4D)
    return (first * 2**21 + (second >> 11)).double() * 2.0**-53


def sample(logits: Any, rows: Sequence[RowDraw], allowed: Any = None) -> StepSample:
    """Each row's next token from ``logits`` (rows x vocabulary, float32) and its ``RowDraw``; ``allowed`` (rows x
    vocabulary, bool): the only tokens a row may take (structured output), its logprobs still the model's own."""
    import torch

    n = logits.shape[0]
    device = logits.device
    params = [r.params for r in rows]
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    finite = torch.isfinite(logits.amax(-1))
    raw = logits
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    tokens = logits.argmax(-1) if len(sampled) < n else None
    accepted = torch.ones(n, dtype=torch.bool, device=device)
    draws = None
    if sampled:
        everyone = len(sampled) == n
        index = None if everyone else torch.tensor(sampled, device=device)
        draws = _Draws(logits if everyone else logits.index_select(0, index), [rows[i] for i in sampled])
        drawn, in_set = draws.draw(0)
        if everyone:
            tokens, accepted, finite = drawn, in_set, finite & draws.finite
        else:
            tokens = tokens.index_copy(0, index, drawn)
            accepted = accepted.index_copy(0, index, in_set)
            finite = finite & torch.ones_like(finite).index_copy(0, index, draws.finite)
    wanting = [i for i, p in enumerate(params) if p.logprobs]
    top = max((params[i].top_logprobs for i in wanting), default=0)
    columns = [tokens.double().unsqueeze(1), accepted.double().unsqueeze(1), finite.double().unsqueeze(1)]
    if wanting:  # log Z, the chosen token's logprob, then the top ids and their logprobs
        everyone = len(wanting) == n
        index = None if everyone else torch.tensor(wanting, device=device)
        mine = raw if everyone else raw.index_select(0, index)
        logprobs = mine.log_softmax(-1)
        picked = (tokens if everyone else tokens.index_select(0, index)).unsqueeze(1)
        chosen = logprobs.gather(1, picked)
        parts = [mine.gather(1, picked) - chosen, chosen]  # log Z = logit - logprob (a redrawn token needs it)
        if top:
            best = logprobs.topk(top, -1)
            parts += [best.indices.to(chosen.dtype), best.values]
        figures = torch.cat(parts, 1).double()
        columns.append(figures if everyone else torch.zeros(n, figures.shape[1], dtype=torch.float64, device=device)
                       .index_copy(0, index, figures))
    table = torch.cat(columns, 1).tolist()  # the step's one copy to the host
    out_tokens: list[int | Exception] = [int(row[0]) for row in table]
    rejected = [k for k, i in enumerate(sampled) if not table[i][1] and table[i][2]]
    if rejected and draws is not None:
        for k, token in draws.redraw(rejected, [out_tokens[sampled[k]] for k in rejected]).items():
            i = sampled[k]
            out_tokens[i] = token
            if params[i].logprobs:  # the chosen token changed, and its logprob with it
                table[i][4] = float(raw[i, token]) - table[i][3]
    out_logprobs: list[Raw | None] = [None] * n
    for i, row in enumerate(table):
        if not row[2]:
            out_tokens[i] = SamplingError("the model's logits for this answer are not finite (inf or nan)")
        elif params[i].logprobs:
            k = params[i].top_logprobs
            out_logprobs[i] = (row[4], [(int(t), v) for t, v in zip(row[5:5 + k], row[5 + top:5 + top + k])])
    return StepSample(out_tokens, out_logprobs)


class _Draws:
    """The sampled rows of a step: their distributions after temperature and top-k, drawn from round by round."""

    def __init__(self, logits: Any, rows: Sequence[RowDraw]):
        import torch

        device = logits.device
        self.streams = torch.tensor([r.stream for r in rows], dtype=torch.int64, device=device)
        self.drawn = torch.tensor([r.drawn for r in rows], dtype=torch.int64, device=device)
        self.top_p = torch.tensor([r.params.top_p for r in rows], dtype=torch.float32, device=device)
        temperatures = [r.params.temperature for r in rows]
        scaled = logits if all(t == 1 for t in temperatures) else \
            logits / torch.tensor(temperatures, dtype=torch.float32, device=device).unsqueeze(1)
        ks = [min(r.params.top_k, logits.shape[1]) for r in rows]
        if any(ks):  # each row's k-th largest logit bounds it (rows without top-k: no bound)
            kth = scaled.topk(max(ks), -1).values.gather(1, torch.tensor([[max(k, 1) - 1] for k in ks], device=device))
            bound = kth.masked_fill(torch.tensor([[k == 0] for k in ks], device=device), float("-inf"))
            scaled = scaled.masked_fill(scaled < bound, float("-inf"))
        self.probs = scaled.softmax(-1)
        self.finite = torch.isfinite(self.probs.sum(-1))

    def draw(self, round_: int, rows: Any = None, pivot: Any = None) -> tuple[Any, Any]:
        """One round for ``rows`` (all when None): tokens drawn from the probability above ``pivot``, and whether
        each is in its row's top-p set."""
        import torch

        pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))  # noqa: E731
        probs, top_p = pick(self.probs), pick(self.top_p)
        if pivot is not None:
            probs = torch.where(probs > pivot.unsqueeze(1), probs, 0.0)
        cdf = probs.cumsum(-1)
        total = cdf[:, -1]
        target = torch.minimum(uniforms(pick(self.streams), pick(self.drawn), round_).to(cdf.dtype) * total,
                               torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
        chosen = probs.gather(1, tokens.unsqueeze(1))
        above = torch.where(probs > chosen, probs, 0.0).sum(-1)  # the tokens ruled out below a pivot are never above
        return tokens, (above < top_p) | (top_p >= 1)

    def redraw(self, rows: list[int], rejected: list[int]) -> dict[int, int]:
        """Further rounds for ``rows`` (positions among the sampled rows) whose first draw, ``rejected``, fell outside
        their top-p set, until each is accepted; a rejected token rules out every token no more likely than it."""
        import torch

        device = self.probs.device
        out: dict[int, int] = {}
        left = torch.tensor(rows, device=device)
        tokens = torch.tensor(rejected, device=device)
        pivot = torch.zeros(len(rows), device=device)
        round_ = 0
        while len(left):
            pivot = torch.maximum(pivot, self.probs.index_select(0, left).gather(1, tokens.unsqueeze(1)).squeeze(1))
            round_ += 1
            tokens, accepted = self.draw(round_, left, pivot)
            verdicts = accepted.tolist()
            out.update({row: token for row, token, ok in zip(left.tolist(), tokens.tolist(), verdicts) if ok})
            keep = ~accepted
            left, pivot, tokens = left[keep], pivot[keep], tokens[keep]
        return out
