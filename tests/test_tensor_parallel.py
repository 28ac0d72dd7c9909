"""A model over several devices (``model.tensor_parallel_size``): this process is rank 0 and runs the engine, a Ray
actor is rank 1 (gloo on the CPU), each holding half of the LLM's heads and its own half of the paged KV. The answers
are the one-process answers, for every family's tiny checkpoint; a rank that dies fails the engine's health, not a
hang; a model too big for the devices asked for is refused before any weight is read, naming the numbers."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.conftest import HEIGHT, WIDTH
from video_llava.data.synthetic_video import SAMPLE_SHAPES, render_frames
from video_llava.model.families.tiny import TINY_FAMILIES

FRAMES = render_frames(SAMPLE_SHAPES, num_frames=16, width=WIDTH, height=HEIGHT)
TAKES_VIDEO = {"llava_next_video", "llava_onevision"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    from video_llava.ray_runtime import start_local_ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


def settings(path, ranks: int = 1, **extra):
    from video_llava.model.settings import ModelSettings

    return ModelSettings(model=str(path), device="cpu", dtype="float32", num_frames=16, max_frames=16,
                         tensor_parallel_size=ranks, **extra)


def questions(qa, family: str):
    """An image question, the same asked twice (the second reads the first's prefix from the prefix cache), and on
    video families two long videos (chunked prefill; the pool grows past its first blocks)."""
    media = [[FRAMES[0]], [FRAMES[0]], [FRAMES[1], FRAMES[2]]]
    if family in TAKES_VIDEO:
        media += [[FRAMES], [FRAMES[::-1]]]
    return [qa.prepare(m, f"Describe it. ({i})", max_new_tokens=8) for i, m in enumerate(media)]


def answers(qa, family: str) -> tuple[list[list[tuple[str, ...]]], dict]:
    """Each request's answers (n=2 for one: its answers share the prompt's last block until one writes it, then a
    copy) as (token, log-probability) pairs, on an engine with a prefix cache and 300-token prompt chunks; and its stats."""
    from video_llava.engine import Engine
    from video_llava.engine.params import SamplingParams

    prepared = questions(qa, family)
    params = [SamplingParams(8, logprobs=True, n=2 if i == 2 else 1) for i in range(len(prepared))]
    engine = Engine(qa, max_running=4, max_num_batched_tokens=300, prefix_cache_mb=16)
    try:
        results = [engine.run([p], [s])[0] for p, s in zip(prepared[:2], params[:2])]  # one after the other: a hit
        results += engine.run(prepared[2:], params[2:])  # together
        stats = dict(engine.describe(), blocks=engine.kv.manager.num_blocks, heads=engine.kv.shape.heads)
    finally:
        engine.close()
    return [[[(t.token, t.logprob) for t in a.logprobs] for a in result] for result in results], stats


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_two_ranks_answer_token_for_token_as_one_process(cluster, tiny_checkpoint, family):
    from video_llava.model.qa_model import VideoQAModel

    path = tiny_checkpoint(family)
    one = VideoQAModel(settings(path))
    expected, _ = answers(one, family)
    two = VideoQAModel(settings(path, ranks=2))
    try:
        got, stats = answers(two, family)
    finally:
        two.close(ranks=True)
    tokens = [[[t for t, _ in a] for a in r] for r in got]
    assert tokens == [[[t for t, _ in a] for a in r] for r in expected]
    # the same numbers but for the order of the all-reduce's sums (float32)
    assert np.allclose([p for r in got for a in r for _, p in a], [p for r in expected for a in r for _, p in a],
                       atol=1e-4), (got, expected)
    assert stats["heads"] == one.config.get_text_config().num_key_value_heads // 2  # this rank's half of the KV
    assert stats["prefix_hits"] >= 1
    if family in TAKES_VIDEO:
        assert stats["blocks"] > 256  # the pool grew (rank 1's with it: its forwards wrote past the first blocks)


def test_a_rank_that_dies_fails_the_health_check_and_the_next_request_at_once(cluster, tiny_checkpoint):
    import ray

    from video_llava.engine.shards import ShardFault
    from video_llava.model.qa_model import VideoQAModel

    two = VideoQAModel(settings(tiny_checkpoint("llava"), ranks=2))
    try:
        assert two.answer([FRAMES[0]], ["Describe it."], max_new_tokens=4)[0].completion_tokens == 4
        two.engine.check_health()
        with pytest.raises(ValueError, match="tensor_parallel_size > 1"):  # the one-process reference would hang
            two.generate([two.prepare(FRAMES[0], "Describe it.")])
        rank = two.shards.workers[0]
        ray.kill(rank)  # asynchronous: the rank is gone once a call to it fails
        with pytest.raises(ray.exceptions.RayActorError):
            while True:
                ray.get(rank.ping.remote(), timeout=60)
        with pytest.raises(ShardFault, match="does not answer"):
            two.engine.check_health()
        with pytest.raises(ShardFault):  # the collective meets a closed connection: no wait for a timeout
            two.answer([FRAMES[0]], ["Describe it."], max_new_tokens=4)
        assert two.engine.fault is not None  # a device fault: the engine serves no more
    finally:
        two.close(ranks=True)


def test_a_model_too_big_for_the_devices_asked_for_is_refused_before_loading_naming_the_numbers(tiny_checkpoint,
                                                                                                  capsys):
    from video_llava.model.placement import PlacementError, main
    from video_llava.model.qa_model import VideoQAModel

    path = tiny_checkpoint("llava_next")
    # the tiny model's float32 weights: 0.79 MiB, 0.42 MiB of them in the LLM's layers and head (split over ranks)
    with pytest.raises(PlacementError) as refused:
        VideoQAModel(settings(path, device_memory_gb=0.8 / 1024))
    assert str(refused.value).endswith(
        ": 0.79 MiB of weights per device with tensor_parallel_size 1 (0.79 MiB in all) exceed 85% of a device's "
        "0.80 MiB (0.68 MiB; the rest is for the KV pool and activations): set model.tensor_parallel_size: 2 (and as "
        "many GPUs)")
    with pytest.raises(PlacementError, match="must divide the model's 4 attention heads and 2 KV heads"):
        VideoQAModel(settings(path, ranks=4))  # refused before any rank starts: no Ray here
    fits = VideoQAModel(settings(path, device_memory_gb=1.0))  # checked, then loaded as without the check
    assert fits.answer([FRAMES[0]], ["Describe it."], max_new_tokens=3)[0].text == \
        VideoQAModel(settings(path)).answer([FRAMES[0]], ["Describe it."], max_new_tokens=3)[0].text
    main([str(path), "--dtype", "float32", "--device-memory-gb", str(0.8 / 1024)])  # sizing a cluster beforehand
    assert capsys.readouterr().out.splitlines()[1:] == ["  tensor_parallel_size 1: 0.79 MiB per device, does not fit",
                                                         "  tensor_parallel_size 2: 0.58 MiB per device, fits"]


def test_every_step_layout_but_compiled_runs_over_two_ranks(cluster, tiny_checkpoint):
    """Static (padded) steps and FlexAttention over the pool give the tokens of the default steps; compiled steps are
    refused; the auto budget's profile run is run by every rank (a lone rank 0 would wait in its collectives)."""
    import torch

    from video_llava.engine import Engine
    from video_llava.engine.budget import chunk_forward
    from video_llava.engine.params import SamplingParams
    from video_llava.model.qa_model import VideoQAModel

    two = VideoQAModel(settings(tiny_checkpoint("llava"), ranks=2))
    try:
        with pytest.raises(ValueError, match="compiled is not offered with tensor_parallel_size > 1"):
            Engine(two, decode_mode="compiled")
        prepared = [two.prepare(FRAMES[i], "Describe it.", max_new_tokens=6) for i in range(3)]
        tokens = {}
        for name, options in {"flex": {"attention": "flex"}, "dynamic": {}, "static": {"decode_mode": "static"}}.items():
            engine = Engine(two, **options)
            tokens[name] = [a.text for a in engine.generate(prepared, SamplingParams(6))]
            engine.close()
        assert tokens["static"] == tokens["dynamic"] and tokens["flex"] == tokens["dynamic"]
        others = two.shards.profile(64)  # what budget.step_bytes runs on a GPU, every rank at once
        with torch.inference_mode():
            chunk_forward(two.model, 64)
        two.shards.wait(others)
    finally:
        two.close(ranks=True)


H100_GIB = 79.2  # an 80 GB H100's memory as torch reports it


def test_the_34b_and_72b_shapes_need_the_gpus_the_readme_and_configs_say():
    """Counted on the meta device from the released checkpoints' shapes (Yi-34B + CLIP-L/336; Qwen2-72B + SigLIP):
    34B's 64.7 GiB of bf16 weights fit one 80 GB GPU (gpu-34b.yaml uses two for KV room); 72B's 136.3 GiB need four."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration,
                              LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    from video_llava.model.placement import PlacementError, check_fits, weight_bytes

    yi = LlamaConfig(vocab_size=64000, hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
                     num_attention_heads=56, num_key_value_heads=8, tie_word_embeddings=False)
    clip = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14)
    qwen = Qwen2Config(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)
    siglip = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                                image_size=384, patch_size=14)
    w34 = weight_bytes(LlavaNextVideoForConditionalGeneration, LlavaNextVideoConfig(text_config=yi, vision_config=clip),
                       torch.bfloat16)
    w72 = weight_bytes(LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig(text_config=qwen,
                                                                                     vision_config=siglip), torch.bfloat16)
    gib = 2**30
    assert [round(w34.per_rank(n) / gib, 1) for n in (1, 2)] == [64.7, 33.1]
    assert [round(w72.per_rank(n) / gib, 1) for n in (1, 2, 4)] == [136.3, 69.8, 36.5]
    memory = int(H100_GIB * gib)
    check_fits("34B", w34, 1, memory, heads=8)
    check_fits("72B", w72, 4, memory, heads=8)
    with pytest.raises(PlacementError, match=r"^72B: 69.8 GiB of weights per device with tensor_parallel_size 2 .* "
                                             r"set model.tensor_parallel_size: 4"):
        check_fits("72B", w72, 2, memory, heads=8)
