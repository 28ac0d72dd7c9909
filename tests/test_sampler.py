"""The batched sampler against the plain definitions it replaces: greedy rows are the argmax; a sampled token is
always in its row's top-k and top-p set (the set from a full sort) and its frequencies are the distribution
restricted to that set; a seeded row draws the same tokens whatever its batch-mates; logprobs are the model's own;
and each token's bytes spell the answer."""

from __future__ import annotations

import pytest

from video_llava.engine.params import SamplingParams
from video_llava.engine.sampler import RowDraw, SamplingError, sample, uniforms


def allowed(logits, p: SamplingParams) -> set[int]:
    """The tokens a row may draw, by the definitions: top-k (ties with the k-th in), then each token whose more
    likely tokens hold less than top_p of the probability (float64 here, float32 in the sampler: a hair of slack)."""
    scaled = logits.double() / p.temperature
    if p.top_k:
        scaled = scaled.masked_fill(scaled < scaled.topk(p.top_k).values[-1], float("-inf"))
    probs = scaled.softmax(-1)
    return {i for i in range(len(probs)) if probs[i] > 0 and float(probs[probs > probs[i]].sum()) < p.top_p + 1e-5}


def test_uniforms_are_uniform_and_depend_only_on_stream_count_and_round():
    import torch

    streams = torch.arange(100_000, dtype=torch.int64) * 7919 + (1 << 40)
    u = uniforms(streams, torch.full_like(streams, 3), 0)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    assert float(((counts - 5000) ** 2 / 5000).sum()) < 45  # chi-square, 19 degrees of freedom: p about 0.001
    assert torch.equal(u[10:20], uniforms(streams[10:20], torch.full((10,), 3), 0))
    assert not torch.equal(u, uniforms(streams, torch.full_like(streams, 4), 0))
    assert not torch.equal(u, uniforms(streams, torch.full_like(streams, 3), 1))


def test_greedy_rows_take_the_argmax_whatever_rows_share_the_step():
    import torch

    torch.manual_seed(0)
    logits = torch.randn(6, 1000)
    greedy, hot = SamplingParams(4), SamplingParams(4, temperature=1.0, top_p=0.9, seed=1)
    rows = [RowDraw(greedy if i % 2 else hot, 100 + i, 0) for i in range(6)]
    tokens = sample(logits, rows).tokens
    assert [tokens[i] for i in (1, 3, 5)] == logits.argmax(-1)[1::2].tolist()


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 0.9, 0), (0.7, 0.5, 0), (1.3, 1.0, 5), (1.0, 0.3, 50),
                                                     (2.0, 0.95, 1)])
@pytest.mark.parametrize("shape", ["flat", "peaked"])
def test_every_sampled_token_is_in_its_rows_top_k_and_top_p_set(temperature, top_p, top_k, shape):
    import torch

    torch.manual_seed(1)
    logits = torch.randn(16, 300) * (0.3 if shape == "flat" else 4.0)
    p = SamplingParams(4, temperature=temperature, top_p=top_p, top_k=top_k)
    sets = [allowed(row, p) for row in logits]
    for drawn in range(40):
        tokens = sample(logits, [RowDraw(p, 1000 * i + 17, drawn) for i in range(16)]).tokens
        for token, permitted in zip(tokens, sets):
            assert token in permitted


def test_frequencies_are_the_distribution_restricted_to_the_top_p_set():
    """A flat-ish row where most first draws fall outside the set (top_p 0.5): the redrawn rounds too."""
    import torch

    logits = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.5, 0.0, -1.0, -3.0])
    p = SamplingParams(4, temperature=1.0, top_p=0.5)
    probs = logits.double().softmax(-1)
    kept = sorted(allowed(logits, p))
    assert kept == [0, 1]
    expected = probs[kept] / probs[kept].sum()
    draws = 20_000
    tokens = sample(logits.expand(draws, -1), [RowDraw(p, stream, 0) for stream in range(draws)]).tokens
    counts = torch.bincount(torch.tensor(tokens), minlength=8).double()
    assert counts[2:].sum() == 0
    assert torch.allclose(counts[kept] / draws, expected, atol=0.012)


def test_a_seeded_row_draws_the_same_tokens_whatever_its_batch_mates_and_position():
    import torch

    torch.manual_seed(2)
    mine = torch.randn(500) * 2
    p = SamplingParams(4, temperature=0.8, top_p=0.9, top_k=40, seed=7)
    alone = [sample(mine[None], [RowDraw(p, 7, k)]).tokens[0] for k in range(30)]
    for k in range(30):
        others = torch.randn(5, 500) * 3
        position = k % 6
        logits = torch.cat([others[:position], mine[None], others[position:]])
        rows = [RowDraw(SamplingParams(4, temperature=1.0, top_p=0.5), 99 + j, k) for j in range(6)]
        rows[position] = RowDraw(p, 7, k)
        assert sample(logits, rows).tokens[position] == alone[k]
    assert len(set(alone)) > 3  # it really samples


def test_a_row_with_non_finite_logits_fails_alone():
    import torch

    logits = torch.randn(3, 50)
    logits[1, 4] = float("nan")
    rows = [RowDraw(SamplingParams(2, temperature=t), 5, 0) for t in (1.0, 1.0, 0.0)]
    tokens = sample(logits, rows).tokens
    assert isinstance(tokens[1], SamplingError)
    assert isinstance(tokens[0], int) and tokens[2] == int(logits[2].argmax())


def test_logprobs_are_the_raw_models_log_softmax_and_its_top_tokens():
    import torch

    torch.manual_seed(3)
    logits = torch.randn(4, 200)
    rows = [RowDraw(SamplingParams(2, temperature=1.0, top_p=0.8, logprobs=True, top_logprobs=4), 3, 0),
            RowDraw(SamplingParams(2), 0, 0),
            RowDraw(SamplingParams(2, logprobs=True, top_logprobs=0), 0, 0),
            RowDraw(SamplingParams(2, temperature=0.5, logprobs=True, top_logprobs=2), 9, 0)]
    step = sample(logits, rows)
    reference = logits.log_softmax(-1)
    assert step.logprobs[1] is None
    for i in (0, 2, 3):
        chosen, top = step.logprobs[i]
        assert chosen == pytest.approx(float(reference[i, step.tokens[i]]), abs=1e-6)
        best = reference[i].topk(rows[i].params.top_logprobs)
        assert [t for t, _ in top] == best.indices.tolist()
        assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-6)
