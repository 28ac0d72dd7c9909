"""The continuous-batching engine against the plain path it replaces: one-at-a-time ``generate``."""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import pytest

from video_llava.data.synthetic_video import MovingShape, render_frames
from video_llava.engine import Engine, Failed, Finished, QueueFullError, SamplingParams, TextPiece

QUESTIONS = ["What color is the circle?", "Which way does the green square move? Answer in one word.", "Hi",
             "Describe the video in detail, frame by frame, with every shape and color you see in it."]


@pytest.fixture(scope="module")
def videos():
    shapes = [("circle", "red", "right"), ("square", "green", "up"), ("triangle", "blue", "left"),
              ("circle", "yellow", "down")]
    return [render_frames([MovingShape(*s)], num_frames=n, fps=12, width=160, height=120)
            for s, n in zip(shapes, (16, 8, 12, 4))]


@pytest.fixture(scope="module")
def engine(embedded_model):
    engine = Engine(embedded_model, max_running=4, preprocess_ahead=2)  # as the service runs it
    yield engine
    engine.close()


def _alone(model, video, question, tokens):
    (answer,) = model.generate([model.prepare(video, question, tokens)])
    return answer


def test_staggered_arrivals_give_the_tokens_of_one_at_a_time_generate(embedded_model, engine, videos):
    """Mixed questions, frame counts and answer lengths; each request joins the running batch as it arrives."""
    ahead = engine.describe()["vision_ahead"]
    staggered_arrivals_match_one_at_a_time(embedded_model, engine, videos)
    assert engine.describe()["vision_ahead"] > ahead  # vision features made beside the loop, same tokens


def test_static_decode_steps_over_whole_buffers_give_the_same_tokens(embedded_model, videos):
    """``decode_mode="static"`` (the shapes CUDA graphs need): each step computes the running rows' bucket of slots
    over every position of the buffers; the empty slots and positions change no row's tokens."""
    engine = Engine(embedded_model, max_running=4, preprocess_ahead=2, decode_mode="static")
    try:
        staggered_arrivals_match_one_at_a_time(embedded_model, engine, videos)
        assert engine.kv.static and engine.kv.static_shapes
        assert all(positions % 1024 == 0 for _, positions in engine.kv.static_shapes)
    finally:
        engine.close()


def test_compiled_decode_steps_give_the_tokens_of_dynamic_ones(embedded_model, engine, videos):
    """``decode_mode="compiled"``: static steps through ``torch.compile`` (inductor's kernels on a CPU; CUDA graphs
    on a GPU). Answers of different lengths: the bucket of slots changes shape as rows leave."""
    prepared = [embedded_model.prepare(v, QUESTIONS[3], 12) for v in videos[:3]]
    params = SamplingParams(max_new_tokens=12)
    expected = engine.generate(prepared, params)  # dynamic steps: token-identical to one-at-a-time generate
    assert len({a.completion_tokens for a in expected}) == 3
    compiled = Engine(embedded_model, max_running=4, decode_mode="compiled", max_num_batched_tokens=16384,
                      max_num_vision_frames=64)  # the three prefilled in one step: they start decoding together
    try:
        from torch._dynamo.utils import counters

        graphs = dict(counters["stats"])  # compiled at start, for every bucket and a longer span: none in traffic
        assert graphs.get("unique_graphs", 0) >= 1
        got = compiled.generate(prepared, params)
        assert dict(counters["stats"]) == graphs
        assert [(a.text, a.completion_tokens) for a in got] == [(a.text, a.completion_tokens) for a in expected]
        assert {3, 2, 1} <= set(compiled.recent_running())
    finally:
        compiled.close()


def staggered_arrivals_match_one_at_a_time(embedded_model, engine, videos):
    """A long answer the others join while it is generated; eight requests arriving over time, some together:
    each answer is the one ``generate`` gives it alone."""
    cases = [(videos[i % 4], QUESTIONS[(i * 3) % 4], (6, 12, 3, 9)[i % 4]) for i in range(8)]
    expected = [_alone(embedded_model, v, q, n) for v, q, n in cases]
    embedded_model.embedder.feature_cache.clear()  # the engine runs the vision tower itself
    results: dict[int, object] = {}
    done = threading.Event()

    def emit(i):
        def on(event):
            if not isinstance(event, TextPiece):
                results[i] = event
                if len(results) == len(cases):
                    done.set()
        return on

    decoding = threading.Event()
    engine.submit(embedded_model.prepare(videos[2], QUESTIONS[3], 300), SamplingParams(max_new_tokens=300, ignore_eos=True),
                  lambda e: decoding.set())  # a long answer the others join while it is generated
    assert decoding.wait(60)
    for i, (v, q, n) in enumerate(cases):
        engine.submit(embedded_model.prepare(v, q, n), SamplingParams(max_new_tokens=n), emit(i))
        time.sleep(0.03 * (i % 3))  # some arrive together, some while others decode
    assert done.wait(300)
    got = [results[i] for i in range(len(cases))]
    assert all(isinstance(r, Finished) for r in got), got
    assert [r.answer.text for r in got] == [a.text for a in expected]
    assert [r.answer.completion_tokens for r in got] == [a.completion_tokens for a in expected]
    assert [r.answer.finish_reason for r in got] == [a.finish_reason for a in expected]
    assert [r.answer.prompt_tokens for r in got] == [a.prompt_tokens for a in expected]
    assert max(engine.recent_running()) > 2  # rows of different lengths really shared decode steps


def test_a_request_arriving_mid_generation_finishes_before_the_long_one(embedded_model, engine, videos):
    order: "queue.SimpleQueue[str]" = queue.SimpleQueue()
    decoding = threading.Event()
    long = embedded_model.prepare(videos[0], QUESTIONS[3], 400)
    short = embedded_model.prepare(videos[1], QUESTIONS[2], 2)

    def on_long(event):
        decoding.set()
        if isinstance(event, Finished):
            order.put("long")

    engine.submit(long, SamplingParams(max_new_tokens=400, ignore_eos=True), on_long)
    assert decoding.wait(60)  # the long answer is being generated
    engine.submit(short, SamplingParams(max_new_tokens=2), lambda e: order.put("short") if isinstance(e, Finished) else None)
    assert [order.get(timeout=120), order.get(timeout=120)] == ["short", "long"]


def test_streamed_pieces_join_to_the_answer_and_streaming_shares_the_batch(embedded_model, engine, videos):
    prepared = [embedded_model.prepare(v, q, 12) for v, q in zip(videos, QUESTIONS)]
    streams = [list(engine.stream(p, SamplingParams(max_new_tokens=12))) for p in prepared[:1]]
    *pieces, answer = streams[0]
    assert "".join(pieces) == answer.text and all(isinstance(p, str) and p for p in pieces)
    plain = engine.generate(prepared, SamplingParams(max_new_tokens=12))
    assert plain[0].text == answer.text


def test_stop_strings_cut_the_answer_streamed_or_not(embedded_model, engine, videos):
    prepared = embedded_model.prepare(videos[0], "Describe the video.", 24)
    (full,) = engine.generate([prepared], SamplingParams(max_new_tokens=24))
    words = full.text.split()
    assert len(words) > 3, full.text
    stop = f" {words[3][:2]}"  # begins within one token and ends in the next, or spans a word boundary
    *pieces, answer = engine.stream(prepared, SamplingParams(max_new_tokens=24, stop=(stop,)))
    assert answer.text == full.text[: full.text.index(stop)] and answer.finish_reason == "stop"  # whitespace kept
    assert "".join(pieces) == answer.text
    (whole,) = engine.generate([prepared], SamplingParams(max_new_tokens=24, stop=(stop,)))
    assert whole.text == answer.text


def test_a_seeded_sampled_answer_does_not_depend_on_its_batch_mates(embedded_model, engine, videos):
    prepared = [embedded_model.prepare(v, q, 10) for v, q in zip(videos, QUESTIONS)]
    seeded = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    alone = engine.generate([prepared[0]], seeded)[0].text
    others = [SamplingParams(max_new_tokens=10, temperature=1.0)] * 3
    together = engine.generate(prepared, [seeded, *others])[0].text
    assert together == alone
    open_ended = embedded_model.prepare(videos[0], "Describe the video.", 10)
    # without a seed, samples differ (hot enough that the trained default's peaked answers cannot all agree: at 1.5
    # four samples once gave the same sentence)
    unseeded = {engine.generate([open_ended], SamplingParams(max_new_tokens=10, temperature=4.0))[0].text
                for _ in range(6)}
    assert len(unseeded) > 1


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish(embedded_model, engine, videos):
    events: "queue.SimpleQueue[object]" = queue.SimpleQueue()
    long = embedded_model.prepare(videos[0], QUESTIONS[3], 2000)
    request_id = engine.submit(long, SamplingParams(max_new_tokens=2000, ignore_eos=True), events.put)
    events.get(timeout=60)  # it is being generated
    cancelled_before = engine.stats.cancelled
    engine.cancel(request_id)
    (other,) = engine.generate([embedded_model.prepare(videos[1], QUESTIONS[0], 4)], SamplingParams(max_new_tokens=4))
    assert other.completion_tokens >= 1
    assert engine.stats.cancelled == cancelled_before + 1
    seen = []
    while not events.empty():
        seen.append(events.get())
    assert not any(isinstance(e, Finished) for e in seen)  # it never ran to its 2000 tokens


def test_a_request_that_fails_in_its_prefill_fails_alone(embedded_model, engine, videos):
    good = embedded_model.prepare(videos[0], QUESTIONS[0], 4)
    bad = embedded_model.prepare(videos[1], QUESTIONS[0], 4)
    broken = type(bad)(bad.media, (bad.media_tokens[0] + 5,), bad.prompt, bad.prompt_tokens, bad.visual_tokens, 4)
    results: "queue.SimpleQueue[tuple[str, object]]" = queue.SimpleQueue()
    engine.submit(broken, SamplingParams(max_new_tokens=4), lambda e: results.put(("bad", e)), stream=False)
    engine.submit(good, SamplingParams(max_new_tokens=4), lambda e: results.put(("good", e)), stream=False)
    got = dict(results.get(timeout=120) for _ in range(2))
    assert isinstance(got["bad"], Failed) and isinstance(got["good"], Finished)
    assert got["good"].answer.text == _alone(embedded_model, videos[0], QUESTIONS[0], 4).text


@contextlib.contextmanager
def _failing(module, when, error):
    """``module`` raises ``error`` whenever ``when(its first input)`` holds: a fault inside the model's forward."""
    raised = []

    def hook(_, args, kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        if when(first):
            raised.append(first.shape)
            raise error

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield raised
    finally:
        handle.remove()


def test_a_decode_step_out_of_memory_is_run_in_halves_and_no_request_fails(embedded_model, videos):
    """The fault is in the second decoder layer, after the first appended its KV: the retry must not see that
    half-written step (the tokens would shift)."""
    import torch

    cases = [embedded_model.prepare(videos[i], QUESTIONS[i], 24) for i in range(4)]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)  # long enough to share steps however they arrive
    engine = Engine(embedded_model, max_running=4)
    layer = embedded_model.model.model.language_model.layers[1]
    try:
        expected = [r[0].text for r in engine.run(cases, params)]
        with _failing(layer, lambda h: h.shape[0] > 2 and h.shape[1] == 1,
                      torch.OutOfMemoryError("more than two rows do not fit")) as raised:
            results = engine.run(cases, params)
        assert raised, "no step ran with more than two rows: the test tested nothing"
        assert [r[0].text for r in results] == expected
        assert engine.stats.failed == 0 and engine.describe()["split_steps"] == len(raised)
    finally:
        engine.close()


def _decode_inputs(model, engine, prepared) -> list[int]:
    """The tokens a request feeds to its decode steps, run alone."""
    seen: list[int] = []
    handle = model.model.get_input_embeddings().register_forward_hook(
        lambda _, args, out: seen.extend(args[0][:, 0].tolist()) if args[0].shape[1] == 1 else None)
    try:
        engine.generate([prepared], SamplingParams(max_new_tokens=8))
    finally:
        handle.remove()
    return seen


def test_a_request_whose_decode_step_fails_fails_alone_and_its_batch_mates_finish(embedded_model, videos):
    cases = [embedded_model.prepare(videos[i], QUESTIONS[i], 8) for i in range(4)]
    engine = Engine(embedded_model, max_running=4)
    try:
        inputs = [_decode_inputs(embedded_model, engine, p) for p in cases]
        bad, poison = next((i, t) for i in (3, 0, 1, 2) for t in inputs[i]
                           if not any(t in inputs[j] for j in range(4) if j != i))  # a token only it feeds back
        expected = [_alone(embedded_model, videos[i], QUESTIONS[i], 8).text for i in range(4)]
        embeddings = embedded_model.model.get_input_embeddings()
        with _failing(embeddings, lambda ids: ids.shape[1] == 1 and bool((ids == poison).any()),
                      ValueError("a bad input that got through")) as raised:
            results = engine.run(cases, SamplingParams(max_new_tokens=8))
        assert raised
        assert isinstance(results[bad], ValueError)
        assert [r[0].text for i, r in enumerate(results) if i != bad] == [t for i, t in enumerate(expected) if i != bad]
        assert engine.stats.failed == 1
        (again,) = engine.generate([cases[bad]], SamplingParams(max_new_tokens=8))  # the engine keeps serving
        assert again.text == expected[bad]
    finally:
        engine.close()


def test_requests_admitted_together_share_one_vision_pass_and_give_the_tokens_of_one_at_a_time(embedded_cache):
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    qa = VideoQAModel(ModelSettings(feature_cache_mb=0))  # every request runs the vision tower
    clips = [render_frames([MovingShape("square", color, "right")], num_frames=8, fps=12, width=160, height=120)
             for color in ("red", "green", "blue")]
    cases = [qa.prepare(clip, QUESTIONS[0], 6) for clip in clips]
    expected = [_alone(qa, clip, QUESTIONS[0], 6).text for clip in clips]
    passes: list[int] = []
    handle = qa.model.model.vision_tower.register_forward_hook(lambda _, args, out: passes.append(args[0].shape[0]))
    engine = Engine(qa, max_running=4, max_num_vision_frames=24)
    try:
        results = engine.run(cases, SamplingParams(max_new_tokens=6))
    finally:
        handle.remove()
        engine.close()
    assert passes == [24]  # the three videos' 8 frames each, in one pass (the step's frame budget holds them)
    assert [r[0].text for r in results] == expected
    assert all(not r[0].vision_cached and r[0].vision_s > 0 for r in results)


def test_the_waiting_queue_is_bounded(embedded_model, videos):
    engine = Engine(embedded_model, max_running=1, max_waiting=1)
    try:
        prepared = embedded_model.prepare(videos[3], QUESTIONS[2], 30)
        params = SamplingParams(max_new_tokens=30, ignore_eos=True)
        engine.submit(prepared, params, lambda e: None)
        time.sleep(0.3)  # the first runs, the second waits
        engine.submit(prepared, params, lambda e: None)
        with pytest.raises(QueueFullError, match="already waiting"):
            engine.submit(prepared, params, lambda e: None)
    finally:
        engine.close()


def test_flex_attention_over_the_pool_gives_the_tokens_of_one_at_a_time_generate(embedded_model, videos):
    """``attention="flex"``: FlexAttention reads the pool itself through a block mask (no row gathered): mixed
    lengths, prompts in chunks, rows decoding together; the model's own attention is back once the engine closes."""
    prepared = [embedded_model.prepare(videos[i % 4], QUESTIONS[(i * 3) % 4], (6, 12, 3, 9)[i % 4]) for i in range(6)]
    expected = [embedded_model.generate([p])[0].text for p in prepared]
    engine = Engine(embedded_model, max_running=4, attention="flex", max_num_batched_tokens=2048)
    try:
        assert [a.text for a in engine.run(prepared, [SamplingParams(p.max_new_tokens) for p in prepared])
                for a in a] == expected
        assert max(engine.recent_running()) >= 2 and engine.kv_positions == 0
    finally:
        engine.close()
    assert embedded_model.model.config.get_text_config()._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="dynamic steps only"):
        Engine(embedded_model, attention="flex", decode_mode="static")


def test_the_kv_held_is_what_the_rows_own_tokens_need_to_within_a_block_each(embedded_model, videos):
    """A long video answer beside three short image-sized ones: the pool holds each row's own positions (to within a
    block), not every row at the longest one's length; every block is back once they are done."""
    long = embedded_model.prepare(videos[0], QUESTIONS[3], 20)
    short = embedded_model.prepare(videos[3], QUESTIONS[2], 20)
    engine = Engine(embedded_model, max_running=4)
    try:
        answers = engine.generate([long, short, short, short], SamplingParams(max_new_tokens=20, ignore_eos=True))
        assert [a.completion_tokens for a in answers] == [20] * 4 and max(engine.recent_running()) == 4
        own = sum(p.prompt_tokens + p.visual_tokens + 20 for p in (long, short, short, short))
        held = engine.describe()["kv_positions"]
        assert own <= held <= own + 4 * 2 * engine.kv.block_size, (held, own)  # a block each, and one more growing
        assert engine.kv_positions == 0
    finally:
        engine.close()


def test_the_n_answers_of_one_prompt_share_its_blocks(embedded_model, videos):
    prepared = embedded_model.prepare(videos[0], QUESTIONS[0], 6)
    prompt = prepared.prompt_tokens + prepared.visual_tokens
    engine = Engine(embedded_model, max_running=4)
    try:
        answers = engine.run([prepared], SamplingParams(6, n=4, temperature=1.0, seed=3, ignore_eos=True))[0]
        assert len(answers) == 4
        assert engine.describe()["kv_positions"] < prompt + 4 * (6 + 2 * engine.kv.block_size)  # not 4 prompts
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_pool_too_small_for_every_row_preempts_and_recomputes_and_the_answers_are_unchanged(
        embedded_model, videos, mode):
    """Four requests whose prompts fit the pool together but whose answers do not: rows are preempted (their blocks
    freed) and recomputed later (their prompt and their tokens so far), and each answer, greedy or seeded, is the one
    an ample pool gives it (which is ``generate``'s: the tests above)."""
    prepared = [embedded_model.prepare(videos[3], q, 100) for q in QUESTIONS]
    params = [SamplingParams(100, ignore_eos=True), SamplingParams(100, ignore_eos=True, temperature=1.0, seed=7)] * 2
    ample = Engine(embedded_model, max_running=4)
    try:
        expected = [a.text for a in ample.generate(prepared, params)]
    finally:
        ample.close()
    prompts = sum(p.prompt_tokens + p.visual_tokens for p in prepared)
    budget = prompts + 150  # the four prompts fit, their 400 new positions do not
    engine = Engine(embedded_model, max_running=4, max_tokens=budget, decode_mode=mode, max_num_batched_tokens=4096)
    try:
        got = engine.generate(prepared, params)
        assert [a.text for a in got] == expected
        described = engine.describe()
        assert described["preempted"] > 0 and described["kv_positions"] <= budget + engine.kv.block_size
        assert max(engine.recent_running()) == 4
        assert engine.kv_positions == 0  # every block back
        assert engine.generate([prepared[0]], params[0])[0].text == expected[0]
    finally:
        engine.close()


def test_a_request_larger_than_the_pool_is_refused_with_the_numbers_and_the_next_one_runs(embedded_model, videos):
    from video_llava.engine import KVBudgetError

    long = embedded_model.prepare(videos[0], QUESTIONS[3], 8)
    short = embedded_model.prepare(videos[3], QUESTIONS[2], 8)
    budget = short.prompt_tokens + short.visual_tokens + 64
    engine = Engine(embedded_model, max_running=4, max_tokens=budget)
    try:
        with pytest.raises(KVBudgetError, match=f"holds {budget}"):
            engine.generate([long], SamplingParams(8))
        assert engine.generate([short], SamplingParams(8, ignore_eos=True))[0].completion_tokens == 8
    finally:
        engine.close()


def test_an_auto_budget_counts_the_bytes_the_kv_pool_really_takes(embedded_model):
    from video_llava.engine.budget import auto_max_tokens, position_bytes

    engine = Engine(embedded_model, max_tokens=4096)
    try:
        kv = engine.kv
        per_position = position_bytes(embedded_model.model)
        assert kv.shape.position_bytes == per_position
        assert kv.pool_bytes == kv.manager.num_blocks * kv.block_size * per_position  # the null block included
    finally:
        engine.close()
    assert auto_max_tokens(embedded_model.model, 0.5, 1000 * per_position, free=4000 * per_position) == 1000
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        auto_max_tokens(embedded_model.model, 0.5, 2000 * per_position, free=4000 * per_position)


def _events(engine, prepared, params) -> list:
    got: "queue.SimpleQueue[object]" = queue.SimpleQueue()
    engine.submit(prepared, params, got.put, stream=False)
    events, finished = [], 0
    while finished < params.n:
        events.append(got.get(timeout=120))
        assert not isinstance(events[-1], Failed), events[-1]
        finished += isinstance(events[-1], Finished)
    return sorted(events, key=lambda e: e.index)


def test_n_answers_come_from_one_prefill_each_sampled_with_its_own_seed(embedded_model, engine, videos):
    prepared = embedded_model.prepare(videos[0], "Describe the video.", 10)
    prefills = engine.stats.prefills
    greedy = _events(engine, prepared, SamplingParams(max_new_tokens=10, n=3))
    assert engine.stats.prefills == prefills + 1 and [e.index for e in greedy] == [0, 1, 2]
    assert len({e.answer.text for e in greedy}) == 1 and greedy[0].answer.text == _alone(embedded_model, videos[0], "Describe the video.", 10).text
    sampled = _events(engine, prepared, SamplingParams(max_new_tokens=10, n=4, temperature=2.0, seed=40))
    singles = [engine.generate([prepared], SamplingParams(max_new_tokens=10, temperature=2.0, seed=40 + i))[0].text
               for i in range(4)]
    assert [e.answer.text for e in sampled] == singles  # answer i is the request's sample with seed + i
    assert len(set(singles)) > 1


def test_logprobs_are_the_models_own_one_per_generated_token_and_spell_the_answer(embedded_model, engine, videos):
    import torch

    prepared = embedded_model.prepare(videos[0], "Describe the video.", 8)
    (event,) = _events(engine, prepared, SamplingParams(max_new_tokens=8, logprobs=True, top_logprobs=3))
    answer = event.answer
    assert len(answer.logprobs) == answer.completion_tokens  # the end of sequence too, when it came
    assert "".join(t.token for t in answer.logprobs).lstrip() == answer.text
    assert b"".join(t.bytes for t in answer.logprobs).decode().lstrip() == answer.text
    embeds, mask, _, _ = embedded_model.embedder([prepared])
    with torch.inference_mode():
        out = embedded_model.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                            output_logits=True, return_dict_in_generate=True,
                                            pad_token_id=embedded_model.tokenizer.pad_token_id)
    reference = [step[0].float().log_softmax(-1) for step in out.logits]
    for k, entry in enumerate(answer.logprobs):
        token = int(out.sequences[0, k])
        assert entry.logprob == pytest.approx(float(reference[k][token]), abs=1e-4)
        assert len(entry.top) == 3 and entry.top[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy: best
        assert entry.top[0].logprob >= entry.top[1].logprob >= entry.top[2].logprob
        assert entry.top[0].bytes == entry.bytes


@pytest.mark.parametrize("ahead", [0, 2], ids=["media_at_admission", "media_made_ahead"])
def test_a_repeat_question_reuses_the_prefix_kv_and_gives_the_tokens_of_a_full_prefill(embedded_model, videos, ahead):
    engine = Engine(embedded_model, max_running=4, prefix_cache_mb=64, preprocess_ahead=ahead)
    try:
        params = SamplingParams(max_new_tokens=12)
        questions = ["Describe the video.", "What color is the circle?", "Which way does it move?"]
        first = engine.generate([embedded_model.prepare(videos[0], questions[0], 12)], params)[0]
        assert engine.stats.prefix_hits == 0 and first.text
        embedded_model.embedder.feature_cache.clear()
        vision_calls = embedded_model.embedder.vision_calls
        repeats = [engine.generate([embedded_model.prepare(videos[0], q, 12)], params)[0] for q in questions]
        assert engine.stats.prefix_hits == 3 and all(a.vision_cached and a.vision_s == 0 for a in repeats)
        assert embedded_model.embedder.vision_calls == vision_calls  # the video's KV is cached: no vision pass
        assert [a.text for a in repeats] == [_alone(embedded_model, videos[0], q, 12).text for q in questions]
        assert [a.prompt_tokens for a in repeats] == [_alone(embedded_model, videos[0], q, 12).prompt_tokens
                                                      for q in questions]
        other = engine.generate([embedded_model.prepare(videos[1], questions[1], 12)], params)[0]
        assert engine.stats.prefix_hits == 3 and other.text  # other pixels: no reuse
    finally:
        engine.close()


def test_a_script_that_exits_without_closing_its_engine_ends_its_requests_and_exits_cleanly(tmp_path, embedded_cache):
    """The interpreter's exit closes a running engine first: the request still decoding ends with its error (a
    daemon loop killed mid-step during finalization could abort the process instead)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "leave.py"
    script.write_text(
        "import sys, threading\n"
        "from video_llava.data.synthetic_video import SAMPLE_SHAPES, render_frames\n"
        "from video_llava.engine import Failed, SamplingParams, TextPiece\n"
        "from video_llava.model.qa_model import VideoQAModel\n"
        "from video_llava.model.settings import ModelSettings\n"
        "model = VideoQAModel(ModelSettings())\n"
        "started = threading.Event()\n"
        "def on(event):\n"
        "    started.set()\n"
        "    if isinstance(event, Failed):\n"
        "        print('ended:', type(event.error).__name__, flush=True)\n"
        "prepared = model.prepare(render_frames(SAMPLE_SHAPES, num_frames=4, width=64, height=48), 'Describe it.', 4000)\n"
        "model.engine.submit(prepared, SamplingParams(4000, ignore_eos=True), on, stream=True)\n"
        "started.wait(120)\n"
        "sys.exit(0)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VIDEO_LLAVA_CACHE": str(embedded_cache)}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ended: EngineClosedError" in result.stdout
