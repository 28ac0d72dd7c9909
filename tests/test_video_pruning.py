"""A video token budget: how many tokens a budget keeps, which ones (the first frame whole, then those that changed
most from the frame before), the counts the prompt, the budget check and usage agree on, and the engine's answers
on pruned prompts equal the reference path's."""

from __future__ import annotations

import numpy as np
import pytest

from video_llava.data.synthetic_video import SAMPLE_SHAPES, render_frames
from video_llava.model.pruning import VideoPruning, VideoTokenBudgetError, kept_positions

QUESTION = "What color is the circle?"


def said(answer) -> tuple:
    """What a greedy answer is, token for token: its text, its length and why it ended."""
    return answer.text, answer.completion_tokens, answer.finish_reason


@pytest.mark.parametrize("pruning, kept", [
    (VideoPruning(), 1152), (VideoPruning(0.5), 576), (VideoPruning(0.75), 288), (VideoPruning(0.99), 144),
    (VideoPruning(budget=400), 400), (VideoPruning(budget=10**6), 1152), (VideoPruning(0.5, budget=700), 576),
    (VideoPruning(0.25, budget=500), 500),
])
def test_a_budget_keeps_the_smaller_count_and_never_less_than_the_first_frame(pruning, kept):
    assert pruning.kept(frames=8, per_frame=144) == kept


def test_a_budget_below_one_frame_or_a_rate_out_of_range_is_refused_with_the_numbers():
    with pytest.raises(VideoTokenBudgetError, match="video_token_budget=100 is below one frame's 144 tokens"):
        VideoPruning(budget=100).kept(8, 144)
    for rate in (-0.1, 1.0):
        with pytest.raises(VideoTokenBudgetError, match=r"video_pruning_rate must be in \[0, 1\)"):
            VideoPruning(rate)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return render_frames(SAMPLE_SHAPES, num_frames=8, width=96, height=72)


def test_rate_zero_is_todays_prompt_and_a_budget_above_the_video_changes_nothing(embedded_model, clip):
    plain = embedded_model.prepare(clip, QUESTION, 6)
    for pruning in (VideoPruning(), VideoPruning(budget=10**6)):
        same = embedded_model.prepare(clip, QUESTION, 6, pruning)
        assert (same.media_tokens, same.prompt, same.visual_tokens) == (plain.media_tokens, plain.prompt, 1152)
        embeds, _, _, _ = embedded_model.embedder([same])
        reference, _, _, _ = embedded_model.embedder([plain])
        assert embeds.equal(reference)


def test_the_tokens_kept_are_those_of_the_region_that_changes(embedded_model):
    """A clip whose left half never changes and whose right half is new noise every frame: past the first frame, the
    tokens kept are the right half's."""
    rng = np.random.default_rng(0)
    frames = np.full((6, 96, 96, 3), 120, np.uint8)
    frames[:, :, 48:] = rng.integers(0, 256, (6, 96, 48, 3), dtype=np.uint8)
    prepared = embedded_model.prepare(frames, QUESTION, 4)
    features = embedded_model.embedder.features([prepared])[0].videos[0]
    per_frame = embedded_model.family.tokens_per_frame(embedded_model.processor)  # 12 x 12
    positions = kept_positions(features, 6, per_frame, per_frame + 5 * per_frame // 2)
    assert positions[:per_frame].tolist() == list(range(per_frame))  # the first frame whole
    columns = (positions[per_frame:] % per_frame % 12).numpy()
    assert (columns >= 6).mean() > 0.98 and not (columns < 4).any()  # the changing half (its edge may blur)


def test_the_prompt_the_budget_check_and_usage_count_the_kept_tokens(embedded_model, clip):
    pruned = embedded_model.prepare(clip, QUESTION, 6, VideoPruning(0.5))
    assert pruned.media_tokens == (576,) and pruned.visual_tokens == 576
    ids = embedded_model.embedder.prompt_ids(pruned)
    assert ids.count(embedded_model.processor.video_token_id) == 576
    (answer,) = embedded_model.answer([clip], [QUESTION], 6, pruning=VideoPruning(0.5))
    assert answer.visual_tokens == 576
    from video_llava.model.accounting import conversation_cost
    from video_llava.model.budget import ContextBudgetError, TokenBudget
    from video_llava.model.prompts import Turn

    def cost(rate: float):
        return conversation_cost(embedded_model.processor, embedded_model.family, [Turn("user", QUESTION, (clip,))],
                                 pruning=VideoPruning(rate))

    budget = TokenBudget(context=1000, per_frame=144, max_frames=56)  # 8 frames' 1152 tokens do not fit
    assert cost(0.5).check(budget, 50) == 576 + cost(0.5).prompt_tokens + 50  # pruned to 576, they do
    with pytest.raises(ContextBudgetError, match=r"8 frames x 144 = 1152 visual tokens - 115 pruned \+ \d+ prompt"):
        cost(0.1).check(budget, 50)  # 1037 kept: still too many


def test_engine_answers_on_pruned_prompts_equal_the_reference_at_every_rate_in_one_batch(embedded_model, clip):
    """Rates mixed in one batch, prefilled in chunks smaller than a frame, after the same clip was seen at another
    rate (its features cached whole, its prefix cached at that length): each answer is transformers' generate's."""
    from video_llava.engine import Engine

    other = render_frames(SAMPLE_SHAPES[::-1], num_frames=8, width=96, height=72)
    engine = Engine(embedded_model, max_running=8, max_num_batched_tokens=100, prefix_cache_mb=64)
    try:
        rates = [0.0, 0.25, 0.5, 0.75]
        media = [clip, other, clip, other]
        prepared = [embedded_model.prepare(m, QUESTION, 6, VideoPruning(r)) for m, r in zip(media, rates)]
        params = [embedded_model.sampling(p) for p in prepared]
        first = engine.generate(prepared, params)
        again = engine.generate(prepared[::-1], params[::-1])[::-1]  # cached features and prefixes, other batch order
    finally:
        engine.close()
    for p, a, b in zip(prepared, first, again):
        (reference,) = embedded_model.generate([p])
        assert said(a) == said(b) == said(reference), p.media_tokens


def test_onevision_keeps_its_closing_newline_after_the_kept_tokens(tiny_checkpoint, clip):
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    model = VideoQAModel(ModelSettings(model=str(tiny_checkpoint("llava_onevision"))))
    try:
        per_frame = model.family.tokens_per_frame(model.processor)
        pruned = model.prepare(clip, QUESTION, 5, VideoPruning(0.5))
        assert pruned.media_tokens == (4 * per_frame + 1,)
        whole = model.embedder.features([model.prepare(clip, QUESTION, 5)])[0].videos[0]
        cut = model.embedder.features([pruned])[0].videos[0]
        assert cut.shape[0] == 4 * per_frame + 1 and cut[-1].equal(whole[-1])  # the newline, last
        (answer,) = model.answer([clip], [QUESTION], 5, pruning=VideoPruning(0.5))
        assert said(answer) == said(model.generate([pruned])[0])
    finally:
        model.close()


@pytest.mark.parametrize("family", ["embedded", "llava_onevision"])
def test_training_on_a_pruned_video_sees_the_embeddings_serving_gives_that_budget(family, tiny_checkpoint, clip):
    """jobs.sft --video-prune-rates: the example keeps the budget's count of video tokens and the forward fills them
    with the features the serving rule keeps, so the prompt's embeddings are the service's for that rate."""
    import torch

    from video_llava.model.embedded import embedded_path
    from video_llava.model.loading import load_checkpoint
    from video_llava.model.prompts import build_prompt
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings
    from video_llava.train.examples import IGNORE_INDEX, collate, pruned_example, sft_example
    from video_llava.train.pruned import pruned_video_inputs

    path = embedded_path() if family == "embedded" else tiny_checkpoint(family)
    model, processor = load_checkpoint(path)
    serving = VideoQAModel(ModelSettings(model=str(path)))
    try:
        per_frame = serving.family.tokens_per_frame(processor)
        prepared = serving.prepare(clip, QUESTION, 4, VideoPruning(0.5))
        (kept,) = prepared.media_tokens
        expected, _, _, _ = serving.embedder([prepared])
        example = pruned_example(sft_example(processor, build_prompt(processor, QUESTION), "red", clip),
                                 processor.video_token_id, kept)
        assert int((example["input_ids"] == processor.video_token_id).sum()) == kept
        assert example["labels"][example["input_ids"] == processor.video_token_id].eq(IGNORE_INDEX).all()
        batch = collate([example], processor.tokenizer.pad_token_id)
        with torch.no_grad():
            inputs = pruned_video_inputs(model, batch, processor.video_token_id, per_frame)
            loss = model(**inputs).loss
        prompt = expected.shape[1]
        assert batch["input_ids"][0, :prompt].tolist() == serving.embedder.prompt_ids(prepared)
        assert torch.allclose(inputs["inputs_embeds"][0, :prompt], expected[0], atol=1e-5)
        assert torch.isfinite(loss)
    finally:
        serving.close()
