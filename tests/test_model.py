"""The model layer: transformers' LLaVA-NeXT-Video classes, 144 tokens per frame, RoPE scaling, budget, batching."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from video_llava.data.synthetic_video import SAMPLE_SHAPES, MovingShape, render_frames
from video_llava.model.budget import (
    ContextBudgetError,
    rope_factor_for_frames,
    tokens_per_frame,
)
from video_llava.model.embedded import build_embedded, embedded_path
from video_llava.model.loading import ModelLoadError, resolve_config
from video_llava.model.qa_model import VideoQAModel
from video_llava.model.settings import ModelSettings


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return render_frames(SAMPLE_SHAPES, num_frames=16, fps=12)


def _checkpoint_copy(tmp_path: Path, edit_text_config) -> Path:
    """The embedded checkpoint with ``text_config`` rewritten (weights linked, not copied)."""
    src = embedded_path()
    dest = tmp_path / "ckpt"
    dest.mkdir(parents=True)
    for item in src.iterdir():
        if item.name == "config.json":
            config = json.loads(item.read_text())
            edit_text_config(config["text_config"])
            (dest / "config.json").write_text(json.dumps(config))
        else:
            os.symlink(item, dest / item.name)
    return dest


def _unscaled(text_config: dict) -> None:
    text_config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}


def _llava_hf_7b_shape(text_config: dict) -> None:
    """Like llava-hf/LLaVA-NeXT-Video-7B-hf's config.json: factor/type as loose keys, no scaling block."""
    text_config.pop("rope_parameters")
    text_config.update({"factor": 2.0, "type": "linear", "rope_theta": 10000.0})


def test_rule_16_frames_unscaled_32_doubles_56_triples():
    assert [rope_factor_for_frames(n) for n in (16, 32, 56)] == [1.0, 2.0, 3.0]
    assert tokens_per_frame(336, 14, 2) == 144


def test_llm_receives_exactly_144_visual_tokens_per_frame(embedded_model, clip):
    processor = embedded_model.processor
    prompt = embedded_model.prompt_for("What color is the circle?")
    inputs = processor(text=[prompt], videos=[clip], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.video_token_id).sum()) == 16 * 144
    features = embedded_model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"])
    pooled = features.pooler_output
    assert pooled.shape[:2] == (1, 16 * 144)
    assert pooled.shape[-1] == embedded_model.config.text_config.hidden_size


def test_answering_leaves_the_callers_grad_mode_alone(embedded_model, clip):
    import torch

    embedded_model.answer([clip[:4]], ["What color is the circle?"], max_new_tokens=2)
    assert torch.is_grad_enabled()  # a training loop in the same process still gets gradients


def test_pooling_is_stride_2_average_of_the_24x24_patch_grid(embedded_model):
    pooler = embedded_model.model.model.vision_resampler.pool
    assert isinstance(pooler, torch.nn.AvgPool2d) and pooler.stride == 2
    grid = torch.arange(24 * 24, dtype=torch.float32).reshape(1, 576, 1)
    pooled = embedded_model.model.model.vision_resampler(grid)
    assert pooled.shape == (1, 144, 1)
    assert pooled[0, 0, 0].item() == pytest.approx((0 + 1 + 24 + 25) / 4)


@pytest.mark.parametrize("max_frames,factor", [(16, 1.0), (32, 2.0), (56, 3.0)])
def test_factor_is_derived_from_max_frames_for_an_unscaled_checkpoint(tmp_path, embedded_cache, max_frames, factor):
    ckpt = _checkpoint_copy(tmp_path, _unscaled)
    resolved = resolve_config(ModelSettings(model=str(ckpt), max_frames=max_frames, num_frames=min(16, max_frames)))
    assert resolved.rope_factor == factor
    params = resolved.config.text_config.rope_parameters
    assert params["rope_type"] == ("default" if factor == 1.0 else "linear")
    assert resolved.budget_context == 4096 * int(factor)


def test_loaded_model_rotary_frequencies_are_divided_by_the_factor(tmp_path, embedded_cache):
    ckpt = _checkpoint_copy(tmp_path, _unscaled)
    plain = VideoQAModel(ModelSettings(model=str(ckpt), max_frames=16, num_frames=16))
    scaled = VideoQAModel(ModelSettings(model=str(ckpt), max_frames=56))
    assert scaled.model.config.text_config.rope_parameters["rope_type"] == "linear"
    assert scaled.model.config.text_config.rope_parameters["factor"] == 3.0
    plain_freq = plain.model.model.language_model.rotary_emb.inv_freq
    scaled_freq = scaled.model.model.language_model.rotary_emb.inv_freq
    torch.testing.assert_close(scaled_freq * 3.0, plain_freq)


def test_config_with_loose_factor_keys_like_llava_hf_7b_is_scaled_not_silently_unscaled(tmp_path, embedded_cache):
    ckpt = _checkpoint_copy(tmp_path, _llava_hf_7b_shape)
    # transformers alone ignores the loose keys: this is the bug we guard against
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(ckpt).text_config.rope_parameters.get("rope_type", "default") == "default"
    model = VideoQAModel(ModelSettings(model=str(ckpt), max_frames=16, num_frames=16))
    assert model.declared_factor == 2.0
    assert model.rope_factor == 2.0  # 16 frames alone would need none, but the checkpoint was tuned at 2
    assert model.model.config.text_config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    plain = VideoQAModel(ModelSettings(model=str(_checkpoint_copy(tmp_path / "u", _unscaled)), max_frames=16, num_frames=16))
    torch.testing.assert_close(
        model.model.model.language_model.rotary_emb.inv_freq * 2.0, plain.model.model.language_model.rotary_emb.inv_freq
    )
    assert model.budget.context == 8192


def test_explicit_factor_wins(tmp_path, embedded_cache):
    ckpt = _checkpoint_copy(tmp_path, _llava_hf_7b_shape)
    assert resolve_config(ModelSettings(model=str(ckpt), rope_scaling_factor=4.0)).rope_factor == 4.0


def test_200_frames_are_refused_with_the_numbers_and_the_largest_count_that_fits(embedded_model):
    with pytest.raises(ContextBudgetError) as info:
        embedded_model.check_request(200, "What color is the circle?")
    message = str(info.value)
    assert "200 frames x 144 = 28800 visual tokens" in message
    assert "context 12288" in message and "use at most 56 frames" in message
    assert info.value.max_frames_that_fit == 56


def test_a_question_too_long_for_the_context_is_refused_naming_the_budget(embedded_model):
    question = "why " * 12000
    with pytest.raises(ContextBudgetError, match="shorten the question"):
        embedded_model.check_request(32, question)


def test_56_frames_fit_and_are_answered(embedded_model):
    frames = render_frames(SAMPLE_SHAPES, num_frames=56, fps=12, width=160, height=120)
    (answer,) = embedded_model.answer([frames], ["What color is the circle?"], max_new_tokens=4)
    assert answer.num_frames == 56 and answer.visual_tokens == 56 * 144
    assert 1 <= answer.completion_tokens <= 4


def test_batched_generate_with_left_padding_matches_one_at_a_time(embedded_model, clip):
    other = render_frames([MovingShape("square", "green", "up")], num_frames=16, fps=12)
    videos = [clip, other, clip[:8]]
    questions = ["What color is the circle?", "Which way does the green square move? Answer in one word.", "Hi"]
    batched = embedded_model.answer(videos, questions, max_new_tokens=8)
    single = [embedded_model.answer([v], [q], max_new_tokens=8)[0] for v, q in zip(videos, questions)]
    assert embedded_model.tokenizer.padding_side == "left"
    assert [a.text for a in batched] == [a.text for a in single]
    assert [a.prompt_tokens for a in batched] == [a.prompt_tokens for a in single]
    assert batched[0].prompt_tokens != batched[1].prompt_tokens  # the batch really needed padding
    assert [a.num_frames for a in batched] == [16, 16, 8]


def test_an_options_log_probability_is_what_greedy_generate_scores_its_tokens(embedded_model, clip):
    """Teacher-forced option scores (a closed answer set's probabilities) against transformers' own: the greedy
    answer's first tokens, scored by ``generate``, and the same text scored as an option, alone and among others."""
    import torch

    prepared = embedded_model.prepare(clip, "What color is the circle?", max_new_tokens=3)
    embeds, mask, _, _ = embedded_model.embedder([prepared])
    with torch.inference_mode():
        out = embedded_model.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=3,
                                            do_sample=False, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0].tolist()
    text = embedded_model.tokenizer.decode(tokens)
    assert embedded_model.tokenizer(text, add_special_tokens=False).input_ids == tokens  # the text is those tokens
    expected = sum(float(step[0].float().log_softmax(-1)[t]) for step, t in zip(out.scores, tokens))
    alone = embedded_model.option_logprobs(prepared, [text])
    among = embedded_model.option_logprobs(prepared, ["blue", text, "a green triangle"])
    assert alone[0] == pytest.approx(expected, abs=1e-4)
    assert among[1] == pytest.approx(expected, abs=1e-4)  # right padding of the shorter options changes nothing
    assert among[0] == pytest.approx(embedded_model.option_logprobs(prepared, ["blue"])[0], abs=1e-4)


def test_cpu_defaults_are_float32_and_sdpa(embedded_model):
    described = embedded_model.describe()
    assert described["device"] == "cpu" and described["dtype"] == "float32"
    assert described["attn_implementation"] == "sdpa"
    assert described["tokens_per_frame"] == 144 and described["rope_scaling_factor"] == 3.0


def test_settings_refuse_pooling_strides_the_processor_cannot_count():
    with pytest.raises(ValueError, match="stride 2"):
        ModelSettings(spatial_pool_stride=4)
    with pytest.raises(ValueError, match="exceeds max_frames"):
        ModelSettings(num_frames=64, max_frames=56)


def test_unknown_model_offline_is_a_clear_load_error(embedded_cache):
    with pytest.raises(ModelLoadError, match="cannot load model"):
        VideoQAModel(ModelSettings(model="nobody/no-such-model-xyz"))


def test_directory_without_config_or_of_another_type_is_refused(tmp_path, embedded_cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        VideoQAModel(ModelSettings(model=str(tmp_path / "empty")))
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelLoadError, match="'llama' checkpoint"):
        VideoQAModel(ModelSettings(model=str(tmp_path / "llama")))


def test_embedded_checkpoint_is_built_deterministically(tmp_path):
    first, second = build_embedded(tmp_path / "a"), build_embedded(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_embedded_tokenizer_round_trips_any_text(embedded_model):
    tokenizer = embedded_model.tokenizer
    for text in ["What color is the circle?", "¿Qué pasa? 日本語 🎥", "x" * 50]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_embedded_checkpoint_is_small(embedded_cache):
    size = sum(f.stat().st_size for f in embedded_path().iterdir())
    assert size < 20 * 2**20


def test_cached_vision_features_give_the_same_answer_and_skip_the_tower(embedded_model, clip):
    fresh = clip.copy()
    fresh[:, :4, :4] = 7  # content not seen before by this model instance
    first = embedded_model.answer([fresh], ["What color is the circle?"], max_new_tokens=6)[0]
    calls = embedded_model.vision_calls
    second = embedded_model.answer([fresh], ["What color is the circle?"], max_new_tokens=6)[0]
    assert not first.vision_cached and second.vision_cached
    assert embedded_model.vision_calls == calls
    assert second.text == first.text


def test_our_inputs_embeds_path_matches_transformers_own_pixel_path(embedded_model, clip):
    """Caching vision features must not change answers: compare with generate(pixel_values_videos=...)."""
    question = "Which way does the circle move?"
    processor, model = embedded_model.processor, embedded_model.model
    inputs = processor(text=[embedded_model.prompt_for(question)], videos=[clip], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    reference = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).lstrip()
    ours = embedded_model.answer([clip], [question], max_new_tokens=8)[0]
    assert ours.text == reference


def test_a_seeded_answer_is_the_same_alone_in_a_batch_and_streamed(embedded_model, clip):
    """The library runs on the engine: a sampled question with a seed gets the same answer whatever it is asked
    beside, and streamed."""
    other = render_frames([MovingShape("square", "green", "up")], num_frames=8, fps=12)
    question = "Describe the video."
    (alone,) = embedded_model.answer([clip], [question], max_new_tokens=12, temperature=1.0, seed=21)
    batch = embedded_model.answer([other, clip, other], ["Hi", question, question], max_new_tokens=12,
                                  temperature=1.0, seed=21)
    *pieces, streamed = embedded_model.stream_answer(clip, question, max_new_tokens=12, temperature=1.0, seed=21)
    assert batch[1].text == alone.text == streamed.text == "".join(pieces)


def test_streamed_pieces_join_to_the_answer_with_no_leading_space(embedded_model, clip):
    *pieces, answer = list(embedded_model.stream_answer(clip, "What color is the circle?", max_new_tokens=6))
    assert pieces and not pieces[0][:1].isspace()
    assert "".join(pieces) == answer.text


_FAULTS_OF_A_FREED_BUFFER = """
import resource, sys
import torch
if sys.argv[1] == "retain":
    from video_llava.model.allocator import retain_freed_memory
    assert retain_freed_memory()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)  # 64 MB, as a 48-frame video's float pixels; freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
[faults() for _ in range(4)]  # warm-up: the first buffers also meet torch's and the heap's own first allocations
print(sum(faults() for _ in range(5)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_model_process_reuses_large_freed_buffers_instead_of_faulting_them_in_again():
    """Each request's pixels are a fresh buffer of tens of MB; by default glibc unmaps it when freed, so the next
    request's page-faults in again (16,384 faults for 64 MB). A process hosting a model keeps it for reuse."""
    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_FREED_BUFFER, mode], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        return int(run.stdout.split()[-1])

    assert faults("default") >= 5 * 16_000
    assert faults("retain") < 500
