"""The engine's step under its budgets: prompts prefilled in chunks and media through the vision tower in runs of
frames, beside the running rows' decode steps; token-identical to one-at-a-time ``generate`` for every family,
whatever the chunk size; admission by priority with a bounded bypass; a loop error tells every admitted request."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from tests.conftest import HEIGHT, WIDTH
from video_llava.data.synthetic_video import SAMPLE_SHAPES, MovingShape, render_frames
from video_llava.engine import Engine, Failed, Finished, SamplingParams, TextPiece
from video_llava.engine.scheduler import Budgets, Scheduler

FAMILIES = ["llava_next_video", "llava_onevision", "llava_next", "llava", "yi_vl"]
TAKES_VIDEO = {"llava_next_video", "llava_onevision"}


# ---- the scheduler alone ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class Waiting:
    id: int
    prompt_positions: int
    priority: int = 0
    rows: int = 1
    cancelled: bool = False
    bypassed: int = 0


def scheduler(max_running: int = 4, max_bypass: int = 2, room: list | None = None) -> Scheduler:
    room = room if room is not None else [1000]  # KV positions free in the pool: what the test says
    return Scheduler(Budgets(max_running, 64, 8, max_bypass), lambda: room[0])


def test_waiting_requests_are_taken_by_priority_then_arrival():
    s = scheduler()
    for request in [Waiting(0, 10, priority=1), Waiting(1, 10), Waiting(2, 10, priority=1), Waiting(3, 10)]:
        s.add(request)
    admitted, _ = s.admit(0, lambda r: True)
    assert [r.id for r in admitted] == [1, 3, 0, 2]


def test_a_request_that_does_not_fit_is_passed_at_most_max_bypass_times_then_holds_the_head():
    room = [500]
    s = scheduler(max_bypass=2, room=room)
    big = Waiting(0, 600)  # its prompt needs 600 positions, 500 are free beside the running row: it waits
    s.add(big)
    for i in range(1, 6):
        s.add(Waiting(i, 100))
    first, _ = s.admit(1, lambda r: True)  # small ones pass it while it does not fit
    assert [r.id for r in first] == [1, 2] and big.bypassed == 2
    room[0] = 300
    second, _ = s.admit(3, lambda r: True)  # passed twice: nothing behind it is admitted until it fits
    assert second == [] and s.waiting[0] is big
    third, _ = s.admit(0, lambda r: True)  # the batch emptied: it goes first
    assert third[0] is big


def test_admission_counts_the_prompts_of_the_requests_admitted_with_it():
    s = scheduler(max_running=8, room=[250])
    for i in range(4):
        s.add(Waiting(i, 100))
    admitted, _ = s.admit(1, lambda r: True)  # 100 + 100 fit in 250, a third does not
    assert [r.id for r in admitted] == [0, 1]


def test_chunks_share_what_the_token_budget_leaves_beside_the_decode_rows_in_order():
    s = scheduler()  # 64 tokens a step
    a, b, c = Waiting(0, 0), Waiting(1, 0), Waiting(2, 0)
    remaining = {a: 50, b: 30, c: 0}
    plan = s.chunks([a, b, c], remaining.get, rows=4)
    assert plan == [(a, 50), (b, 10)]  # 60 tokens beside 4 decode rows; c's vision pass is still running


def test_a_budget_that_leaves_no_room_beside_the_rows_is_refused():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Budgets(8, 8, 4)


@pytest.mark.parametrize("family", ["llava_next_video", "llava"])
def test_an_auto_budget_keeps_room_for_the_largest_steps_activations(tiny_checkpoint, family):
    """``step_bytes``: a prompt chunk at the token budget and a vision pass at the frame budget (measured on a GPU,
    estimated here); more of either keeps more, and the dummy vision pass runs for a family that takes images only."""
    from video_llava.engine.budget import _vision_pass, auto_max_tokens, position_bytes, step_bytes

    qa = family_model(tiny_checkpoint, family)
    small, more_tokens, more_frames = step_bytes(qa, 512, 4), step_bytes(qa, 1024, 4), step_bytes(qa, 512, 8)
    assert 0 < small < more_tokens and small < more_frames
    _vision_pass(qa, 4)
    per_position = position_bytes(qa.model)
    free = 10 * more_tokens
    assert auto_max_tokens(qa.model, 0.5, more_tokens, free=free) == int((0.5 * free - more_tokens) // per_position)


# ---- the engine, every family --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return render_frames(SAMPLE_SHAPES, num_frames=6, width=WIDTH, height=HEIGHT)


_models: dict = {}


def family_model(tiny_checkpoint, family: str):
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    if family not in _models:
        _models[family] = VideoQAModel(ModelSettings(model=str(tiny_checkpoint(family)), device="cpu", num_frames=4,
                                                     max_frames=16, max_new_tokens=6, feature_cache_mb=0))
    return _models[family]


def collect(engine, prepared, params, **kw):
    """Submit; returns (a list that fills with each request's events, an event set when all have ended)."""
    events: list[list] = [[] for _ in prepared]
    ended = threading.Event()
    left = [p.n for p in params]

    def emit(i):
        def on(event):
            events[i].append(event)
            if not isinstance(event, TextPiece):
                left[i] = 0 if isinstance(event, Failed) else left[i] - 1
                if not any(left):
                    ended.set()
        return on

    for i, (p, sp) in enumerate(zip(prepared, params)):
        engine.submit(p, sp, emit(i), **kw)
    return events, ended


@pytest.mark.parametrize("family", FAMILIES)
def test_chunks_smaller_than_a_frame_and_vision_in_runs_give_the_tokens_of_one_at_a_time_generate(
        tiny_checkpoint, frames, family):
    """Prompts in chunks of 37 tokens (a frame is 144 or 196), three frames of vision a step, a long answer running
    throughout, n=2 greedy answers, and a repeat question that reuses its prefix's KV."""
    qa = family_model(tiny_checkpoint, family)
    cases = [([frames[0]], "What color is the circle?"), ([frames[1], frames[2]], "Compare them."),
             ([frames[0]], "Describe it.")]
    if family in TAKES_VIDEO:
        cases += [([frames[:5]], "What happens?"), ([frames[1:5]], "Which way does it move?")]
    prepared = [qa.prepare(media, question, 6) for media, question in cases]
    expected = [qa.generate([p])[0].text for p in prepared]
    engine = Engine(qa, max_running=6, max_num_batched_tokens=37, max_num_vision_frames=3, prefix_cache_mb=64)
    try:
        long = qa.prepare(cases[0][0], "Tell me everything.", 40)
        events, ended = collect(engine, [long] + prepared,
                                [SamplingParams(40, ignore_eos=True)] + [SamplingParams(6, n=2)] * len(prepared))
        assert ended.wait(300)
        answers = [[e.answer.text for e in mine if isinstance(e, Finished)] for mine in events[1:]]
        assert answers == [[text, text] for text in expected]
        repeat = engine.generate([qa.prepare(cases[0][0], "What color is the square?", 6)], SamplingParams(6))
        assert repeat[0].text == qa.generate([qa.prepare(cases[0][0], "What color is the square?", 6)])[0].text
        described = engine.describe()
        assert described["prefix_hits"] >= 1 and described["prefill_chunks"] > len(prepared) + 1
        assert all(w.prompt_tokens <= 37 - w.rows and w.frames <= 3 for w in engine.recent_steps())
    finally:
        engine.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pool_too_small_for_every_answer_preempts_and_every_answer_is_unchanged(tiny_checkpoint, frames, family):
    """Four prompts fit the KV pool together, their 4 x 60 new positions do not: rows are preempted and recomputed
    (their prompt and tokens so far), and each answer, greedy or seeded, is the one an ample pool gives."""
    qa = family_model(tiny_checkpoint, family)
    questions = ["What color is the circle?", "Describe it.", "Hi", "What is in the image?"]
    prepared = [qa.prepare([frames[0]], question, 60) for question in questions]
    params = [SamplingParams(60, ignore_eos=True), SamplingParams(60, ignore_eos=True, temperature=1.0, seed=3)] * 2
    ample = Engine(qa, max_running=4, max_num_batched_tokens=4096)
    try:
        expected = [a.text for a in ample.generate(prepared, params)]
    finally:
        ample.close()
    budget = sum(p.prompt_tokens + p.visual_tokens for p in prepared) + 100
    engine = Engine(qa, max_running=4, max_tokens=budget, max_num_batched_tokens=4096)
    try:
        assert [a.text for a in engine.generate(prepared, params)] == expected
        assert engine.describe()["preempted"] > 0 and engine.kv_positions == 0
    finally:
        engine.close()


def test_preemption_with_shared_prefixes_n_answers_and_chunks_smaller_than_a_frame(tiny_checkpoint, frames):
    """The paths that share blocks under pressure together: repeat questions about one video reuse its cached prefix
    (their tables share its blocks), n=2 answers share their prompt's, prompts run in chunks of 37 tokens, and the pool
    holds the prompts but not every answer: rows are preempted (and the prefix evicted), and every answer is the one
    an ample pool gives; every block comes back."""
    qa = family_model(tiny_checkpoint, "llava_next_video")
    video = frames[:5]
    prepared = [qa.prepare([video], question, 500) for question in
                ("What happens?", "Which way does it move?", "What color is the circle?", "Describe it.")]
    params = [SamplingParams(500, ignore_eos=True, n=2, temperature=1.0, seed=5),
              SamplingParams(500, ignore_eos=True, n=2)] * 2

    def answers(engine):
        first = engine.run(prepared[:1], params[:1])  # its prefix is cached: the rest share its blocks
        return [[a.text for a in r] for r in first + engine.run(prepared[1:], params[1:])]

    ample = Engine(qa, max_running=8, max_num_batched_tokens=37, prefix_cache_mb=1)
    try:
        expected = answers(ample)
        assert ample.describe()["prefix_hits"] == 3
    finally:
        ample.close()
    prompt = prepared[0].prompt_tokens + prepared[0].visual_tokens
    # the pool: one prompt and its answer, and the prefix cache's 1 MB; six rows of 500 new positions do not fit
    engine = Engine(qa, max_running=8, max_tokens=prompt + 532, max_num_batched_tokens=37, prefix_cache_mb=1)
    try:
        assert answers(engine) == expected
        described = engine.describe()
        assert described["preempted"] > 0 and described["prefix_hits"] >= 1
        engine.prefix_cache.clear()
        assert engine.kv_positions == 0
    finally:
        engine.close()


@pytest.mark.parametrize("family", sorted(TAKES_VIDEO))
def test_a_videos_features_made_in_runs_of_frames_equal_its_features_made_whole(tiny_checkpoint, frames, family):
    import torch

    from video_llava.engine.vision import VisionWork, run_vision

    qa = family_model(tiny_checkpoint, family)
    prepared = qa.prepare(frames[:5], "What happens?")
    (whole,) = qa.embedder.features([prepared])
    work = VisionWork(qa.embedder, prepared)
    steps = 0
    while not work.done:
        assert run_vision(qa.embedder, [work], 2) <= 2
        steps += 1
    assert steps == 3  # 2 + 2 + 1 frames
    assert torch.equal(work.features().videos[0], whole.videos[0])  # bit for bit, closing newline once


def test_a_running_stream_decodes_in_every_step_while_a_burst_of_long_videos_is_prefilled(embedded_model):
    """Four 32-frame questions arrive at once beside a streaming answer: no step computes more prompt tokens or
    frames than its budgets, and every step that does prefill work also decodes the stream (no whole prefill, no
    whole vision pass, between two of its tokens)."""
    clips = [render_frames([MovingShape("circle", c, "right")], num_frames=32, fps=12, width=160, height=120)
             for c in ("red", "green", "blue", "yellow", "purple")]
    embedded_model.embedder.feature_cache.clear()  # every frame goes through the tower
    engine = Engine(embedded_model, max_running=8, max_num_batched_tokens=512, max_num_vision_frames=8)
    try:
        streaming, ended = threading.Event(), threading.Event()
        engine.submit(embedded_model.prepare(clips[4], "Tell me everything.", 400),
                      SamplingParams(400, ignore_eos=True),
                      lambda event: (streaming if isinstance(event, TextPiece) else ended).set())
        assert streaming.wait(60)
        while not any(w.rows for w in engine.recent_steps()):  # its own prefill's step recorded
            time.sleep(0.005)
        since = engine.recent_steps()[-1].started
        results = engine.run([embedded_model.prepare(c, "What color is the circle?", 4) for c in clips[:4]],
                             SamplingParams(4))
        assert all(isinstance(r, tuple) for r in results) and not ended.is_set()  # the stream outlived the burst
        work = [w for w in engine.recent_steps() if w.started > since and (w.prompt_tokens or w.frames)]
        assert sum(w.prompt_tokens for w in work) >= 4 * 32 * 144  # the burst's prompts, in chunks
        assert sum(w.frames for w in work) == 4 * 32
        assert all(w.prompt_tokens <= 512 - w.rows and w.frames <= 8 for w in work)
        assert all(w.rows >= 1 for w in work), work  # the stream decoded in each of those steps
    finally:
        engine.close()


def test_an_error_of_the_loop_itself_fails_every_admitted_request_and_the_engine_goes_on(embedded_model):
    clip = render_frames([MovingShape("square", "red", "up")], num_frames=8, fps=12, width=160, height=120)
    engine = Engine(embedded_model, max_running=4)
    original = engine._scheduler.chunks
    calls = {"n": 0}

    def broken_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the scheduler broke")
        return original(*args, **kwargs)

    engine._scheduler.chunks = broken_once
    try:
        prepared = [embedded_model.prepare(clip, q, 20) for q in ("What color?", "Which way?")]
        results = engine.run(prepared, SamplingParams(20, ignore_eos=True))
        assert any(isinstance(r, RuntimeError) and "scheduler broke" in str(r) for r in results)
        assert all(isinstance(r, (RuntimeError, tuple)) for r in results)  # every request ended: none waits
        (again,) = engine.generate([prepared[0]], SamplingParams(4))
        assert again.completion_tokens >= 1
    finally:
        engine.close()


def _long_and_short(model):
    short = render_frames([MovingShape("circle", "red", "right")], num_frames=4, fps=12, width=160, height=120)
    long = render_frames([MovingShape("square", "blue", "up")], num_frames=28, fps=12, width=160, height=120)
    return model.prepare(short, "Describe it.", 30), model.prepare(long, "What color is the square?", 6)


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_a_pool_that_fails_to_grow_at_layer_k_while_a_prompt_joins_leaves_the_other_rows_exactly_as_they_were(
        embedded_model, layer):
    """A long prompt's chunks need the KV pool to grow beside a short running row: the allocation fails at its k-th
    tensor. The pool stays as it was (and stops growing); the running row's tokens are a clean run's; the long
    request waits for the blocks the short one frees and is answered; so is the next request."""
    import torch

    short, long = _long_and_short(embedded_model)
    params = SamplingParams(30, ignore_eos=True)
    engine = Engine(embedded_model, max_running=4)
    kv = engine.kv
    try:
        expected = engine.generate([short], params)[0].text
        assert short.prompt_tokens + short.visual_tokens + 30 + long.prompt_tokens + long.visual_tokens > \
            kv.manager.num_blocks * kv.block_size, "the pool need not grow: the test tests nothing"
        made = {"n": 0, "armed": False}
        original = kv._new_pool

        def failing(positions):
            if made["armed"]:
                made["n"] += 1
                if made["n"] == layer + 1:
                    raise torch.OutOfMemoryError(f"no room for pool tensor {layer}")
            return original(positions)

        kv._new_pool = failing
        started = threading.Event()
        events, ended = collect(engine, [short], [params])
        engine.submit(embedded_model.prepare(short.media[0], "Hi", 1), SamplingParams(1),
                      lambda e: started.set() if isinstance(e, Finished) else None)
        assert started.wait(60)
        made["armed"] = True
        capacity = kv.manager.num_blocks
        joined = engine.run([long], SamplingParams(6))
        assert ended.wait(120)
        assert made["n"] == layer + 1
        assert kv.manager.num_blocks == capacity and kv.max_positions == (capacity - 1) * kv.block_size
        assert isinstance(joined[0], tuple) and joined[0][0].completion_tokens >= 1
        (finished,) = [e for e in events[0] if isinstance(e, Finished)]
        assert finished.answer.text == expected
        assert engine.generate([long], SamplingParams(6))[0].completion_tokens >= 1
    finally:
        engine.close()


def test_a_chunk_that_fails_in_the_middle_of_a_prompt_fails_its_request_alone(embedded_model):
    import torch

    short, long = _long_and_short(embedded_model)
    engine = Engine(embedded_model, max_running=4, max_num_batched_tokens=512)
    layer = embedded_model.model.model.language_model.layers[1]
    raised = []

    def hook(_, args, kwargs):
        positions = kwargs.get("position_ids")
        if positions is not None and positions.shape[1] > 1 and int(positions[0, 0]) >= 1024:
            raised.append(int(positions[0, 0]))  # a chunk of the long prompt past its first 1024 positions
            raise torch.OutOfMemoryError("the chunk does not fit")

    params = SamplingParams(30, ignore_eos=True)
    expected = engine.generate([short], params)[0].text
    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        results = engine.run([short, long], [params, SamplingParams(6)])
    finally:
        handle.remove()
    try:
        assert raised and results[0][0].text == expected
        assert isinstance(results[1], torch.OutOfMemoryError)
        assert engine.generate([long], SamplingParams(6))[0].completion_tokens >= 1
    finally:
        engine.close()


def test_a_device_fault_fails_every_request_in_flight_and_the_health_check_then_fails(embedded_model):
    """A CUDA error (here raised in a decode step on the CPU) poisons the process: every request in flight is told,
    new ones are refused, and the replica's health check fails so that Serve replaces it."""
    from video_llava.engine import EngineClosedError

    short, long = _long_and_short(embedded_model)
    engine = Engine(embedded_model, max_running=4)
    layer = embedded_model.model.model.language_model.layers[0]

    def hook(_, args, kwargs):
        hidden = args[0] if args else next(iter(kwargs.values()))
        if hidden.shape[1] == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        engine.check_health()
        results = engine.run([short, long], SamplingParams(8))
        assert all(isinstance(r, RuntimeError) and "illegal memory access" in str(r) for r in results)
        with pytest.raises(RuntimeError, match="the device failed"):
            engine.check_health()
        with pytest.raises(EngineClosedError, match="device failed"):
            engine.generate([short], SamplingParams(2))
    finally:
        handle.remove()
        engine.close()


def test_a_recomputed_rows_generated_placeholder_id_is_prefilled_as_text(embedded_model, frames):
    """A preempted row is prefilled again from its prompt and the tokens it had generated; a generated token whose id
    is a media placeholder's is text there (its plain embedding), not a slot for media features (which would not
    match the features' count), and the prefix cut stays the prompt's."""
    import torch

    from video_llava.model.families.base import VIDEO

    engine = Engine(embedded_model, max_running=2, prefix_cache_mb=16)
    try:
        prefiller = engine._prefiller
        prepared = embedded_model.prepare(frames[:4], "What happens?", max_new_tokens=4)
        placeholder = embedded_model.embedder.token_ids[VIDEO]
        alone, recompute = prefiller.plan(prepared), prefiller.plan(prepared, then=[placeholder, 7])
        assert recompute.cut == alone.cut > 0 and recompute.ids[-2:] == [placeholder, 7]
        (features,) = prefiller.features_each([prepared])
        task = prefiller.start(recompute, features)
        assert task.embeds.shape[1] == len(recompute.ids)
        plain = embedded_model.model.get_input_embeddings()(torch.tensor([placeholder, 7]))
        assert torch.equal(task.embeds[0, -2:], plain)
        assert torch.equal(task.embeds[0, :-2], prefiller.start(alone, features).embeds[0])
    finally:
        engine.close()


def test_questions_about_cached_media_are_admitted_by_the_blocks_they_add_not_their_whole_prompt(embedded_model):
    """Two questions about a 16-frame video whose prefix is cached: each adds a few text positions to the shared
    prefix blocks, so both are admitted together (queued together, they meet one admission) in a pool that could not
    hold both prompts whole (as vLLM counts a prefix-cache hit); the answers are those of an ample pool."""
    video = render_frames(SAMPLE_SHAPES, num_frames=16, width=WIDTH, height=HEIGHT)
    prepared = [embedded_model.prepare(video, q, max_new_tokens=8) for q in
                ("What happens?", "What color is the circle?", "Which way does it move?")]
    prompt = prepared[0].prompt_tokens + prepared[0].visual_tokens
    positions = []
    for max_tokens in (None, prompt + 16):  # ample; then one whole prompt beside the prefix cache's 2 MB
        engine = Engine(embedded_model, max_running=4, max_tokens=max_tokens, prefix_cache_mb=2)
        try:
            first = engine.generate(prepared[:1], SamplingParams(8))  # its prefix is cached
            room = engine._kv_room()
            answers = [a.text for a in first + engine.generate(prepared[1:], SamplingParams(8))]
            positions.append((answers, engine.describe(), room))
        finally:
            engine.close()
    (expected, _, _), (answers, described, room) = positions
    assert room < 2 * prompt  # the two prompts whole do not fit beside the cached prefix
    assert answers == expected
    assert described["most_running_in_a_step"] == 2 and described["prefix_hits"] == 2 and described["preempted"] == 0
