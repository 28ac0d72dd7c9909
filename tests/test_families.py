"""Every LLaVA family in the registry, through exactly the code path of a real checkpoint: a tiny random-weight
checkpoint per family (its real visual geometry) is chosen by its config, counted by its processor, and answered
token-identically to transformers' own ``generate(pixel_values=...)``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import HEIGHT, WIDTH
from video_llava.data.synthetic_video import SAMPLE_SHAPES, render_frames
from video_llava.model.budget import ContextBudgetError
from video_llava.model.families import UnsupportedMediaError
from video_llava.model.prompts import InvalidQuestionError, Turn

FAMILIES = ["llava_next_video", "llava_onevision", "llava_next", "llava", "yi_vl"]
TAKES_VIDEO = {"llava_next_video", "llava_onevision"}


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return render_frames(SAMPLE_SHAPES, num_frames=6, width=WIDTH, height=HEIGHT)


@pytest.fixture(scope="module")
def tall_image() -> np.ndarray:
    """A 500x300 portrait photo-like image: AnyRes picks another grid for it than for a 320x240 frame."""
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (500, 300, 3), dtype=np.uint8)


_models: dict = {}


@pytest.fixture
def qa(request, tiny_checkpoint):
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    family = request.param
    if family not in _models:
        _models[family] = VideoQAModel(ModelSettings(model=str(tiny_checkpoint(family)), device="cpu",
                                                     num_frames=4, max_frames=16, max_new_tokens=6))
    return _models[family]


def media_cases(family: str, frames: np.ndarray, tall: np.ndarray) -> list[list[np.ndarray]]:
    cases = [[frames[0]], [tall], [frames[0], tall]]
    if family in TAKES_VIDEO:
        cases += [[frames[:4]], [frames[:3], frames[3:6]]]  # the processor stacks equal-length videos
    if family == "llava_onevision":
        cases.append([tall, frames[:4]])  # images and a video in one message
    return cases


def processor_inputs(qa, prompt: str, media: list[np.ndarray]):
    images = [m for m in media if m.ndim == 3]
    videos = [m for m in media if m.ndim == 4]
    kwargs = {}
    if images:
        kwargs["images"] = [images]  # one sample's images
    if videos:
        kwargs["videos"] = videos
    return qa.processor(text=[prompt], return_tensors="pt", **kwargs)


@pytest.mark.parametrize("qa", FAMILIES, indirect=True)
def test_checkpoint_is_chosen_by_its_config_and_counted_by_its_processor(qa, frames, tall_image):
    assert qa.family.name == qa.settings.model.rsplit("/", 1)[-1]
    for media in media_cases(qa.family.name, frames, tall_image):
        prepared = qa.prepare(media, "What color is the circle?")
        ids = processor_inputs(qa, prepared.prompt, media)["input_ids"][0].tolist()
        expanded = sum(ids.count(t) for t in {qa.embedder.token_ids["image"], qa.embedder.token_ids["video"]} - {None})
        assert prepared.visual_tokens == expanded, [m.shape for m in media]
        ours = qa.embedder.expand(prepared)
        assert sum(ours.count(token) for token in qa.embedder.tokens.values() if token) == expanded


@pytest.mark.parametrize("qa", FAMILIES, indirect=True)
def test_spliced_cached_features_give_the_tokens_of_transformers_generate(qa, frames, tall_image):
    """The reference is the checkpoint as transformers loads it: the whole vision tower, ``generate(pixel_values)``;
    ours drops the tower's unused last layer, splices cached features and generates from embeddings."""
    import torch

    plain = qa.family.model_class().from_pretrained(qa.source).eval()
    unused = qa.config.vision_config.num_hidden_layers < plain.config.vision_config.num_hidden_layers
    assert unused == (plain.config.vision_feature_layer == -2)  # CLIP families read the penultimate layer
    for media in media_cases(qa.family.name, frames, tall_image):
        prepared = qa.prepare(media, "Describe it.")
        inputs = processor_inputs(qa, prepared.prompt, media)
        with torch.inference_mode():
            out = plain.generate(**inputs, max_new_tokens=6, do_sample=False)
        reference = qa.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).lstrip()
        first, again = (qa.generate([prepared])[0] for _ in range(2))
        assert first.text == reference, [m.shape for m in media]
        assert again.text == reference and again.vision_cached  # the second pass read the feature cache
        assert first.visual_tokens == prepared.visual_tokens


def features_and_vision_passes(qa, cases) -> tuple[list, list[int]]:
    """The features of ``cases`` taken together, and the batch size of each call of the vision tower."""
    passes: list[int] = []
    hook = qa.model.model.vision_tower.register_forward_hook(lambda _, args, out: passes.append(args[0].shape[0]))
    try:
        return qa.embedder.features(cases), passes
    finally:
        hook.remove()


@pytest.mark.parametrize("qa", FAMILIES, indirect=True)
def test_image_questions_share_one_vision_pass_and_get_the_features_each_gets_alone(qa, frames, tall_image):
    """Three questions' image sets (one image, another, and a message of both: OneVision reads that one at base
    resolution) through the vision tower in one call, each question's features as it gets them by itself."""
    import torch

    cases = [qa.prepare(media, "Describe it.") for media in ([frames[0]], [tall_image], [frames[0], tall_image])]
    qa.embedder.feature_cache.clear()
    alone = [qa.embedder.features([p])[0].images for p in cases]
    qa.embedder.feature_cache.clear()
    together, passes = features_and_vision_passes(qa, cases)
    assert len(passes) == 1
    for case, mine, single in zip(cases, together, alone):
        assert mine.images.shape == (case.visual_tokens, single.shape[-1]) == single.shape
        assert torch.equal(mine.images, single)  # bit for bit
        assert not mine.cached and mine.vision_s > 0


@pytest.mark.parametrize("qa", sorted(TAKES_VIDEO), indirect=True)
def test_video_questions_share_one_vision_pass_and_get_the_features_each_gets_alone(qa, frames):
    """The engine runs the vision tower once for the videos of several waiting requests (ahead of their prefill):
    bit for bit the features each request gets by itself, and a video asked about twice goes through once."""
    import torch

    cases = [qa.prepare(video, "Describe it.") for video in (frames[:4], frames[2:6], frames[1:5], frames[:4])]
    qa.embedder.feature_cache.clear()
    alone = [qa.embedder.features([p])[0].videos[0] for p in cases]
    qa.embedder.feature_cache.clear()
    together, passes = features_and_vision_passes(qa, cases)
    assert passes == [3 * 4]  # one pass, three distinct videos of four frames
    for mine, single in zip(together, alone):
        assert torch.equal(mine.videos[0], single)
        assert not mine.cached and mine.vision_s > 0


def test_a_model_without_video_refuses_a_video_naming_what_it_takes(tiny_checkpoint, frames):
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    qa = VideoQAModel(ModelSettings(model=str(tiny_checkpoint("llava")), device="cpu"))
    with pytest.raises(UnsupportedMediaError, match=r"LLaVA-1\.5\) takes images, not videos") as err:
        qa.prepare(frames[:4], "What happens?")
    assert err.value.medium == "video"
    assert qa.describe()["media"] == ["image"] and qa.per_frame == 0


def test_rope_is_scaled_only_where_the_family_needs_it(tiny_checkpoint):
    from video_llava.model.loading import resolve_config
    from video_llava.model.settings import ModelSettings

    video = resolve_config(ModelSettings(model=str(tiny_checkpoint("llava_next_video")), max_frames=56))
    assert video.rope_factor == 3.0 and video.budget_context == 3 * 4096  # ceil((56 x 144 + 1000) / 4096)
    onevision = resolve_config(ModelSettings(model=str(tiny_checkpoint("llava_onevision")), max_frames=56))
    assert onevision.rope_factor == 1.0 and onevision.budget_context == 32768  # Qwen2's own context
    assert onevision.config.text_config.rope_parameters.get("rope_type", "default") == "default"
    assert onevision.per_frame == 196  # 27x27 SigLIP grid pooled to 14x14
    forced = resolve_config(ModelSettings(model=str(tiny_checkpoint("llava")), rope_scaling_factor=2.0))
    assert forced.rope_factor == 2.0 and forced.config.text_config.rope_parameters["factor"] == 2.0


def test_yi_vl_is_told_from_llava_by_its_projector_weights(tiny_checkpoint, tmp_path, tall_image):
    import shutil

    from transformers import AutoConfig

    from video_llava.model.families import family_of
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    # A conversion that declares nothing beyond model_type "llava": the weights say Yi-VL.
    plain = tmp_path / "yi"
    shutil.copytree(tiny_checkpoint("yi_vl"), plain)
    config = json.loads((plain / "config.json").read_text())
    config.pop("projector_type")
    (plain / "config.json").write_text(json.dumps(config))
    assert family_of(AutoConfig.from_pretrained(plain), str(plain)).name == "yi_vl"
    assert family_of(AutoConfig.from_pretrained(tiny_checkpoint("llava")), str(tiny_checkpoint("llava"))).name == "llava"
    qa = VideoQAModel(ModelSettings(model=str(plain), device="cpu", max_new_tokens=4))
    assert type(qa.model.model.multi_modal_projector).__name__ == "YiVLProjector"
    assert qa.prepare(tall_image, "What is it?").visual_tokens == 1024  # 448 px / patch 14 = 32x32


@pytest.mark.parametrize("qa", ["llava_onevision", "llava"], indirect=True)
def test_a_conversation_keeps_its_system_message_and_earlier_turns(qa, frames):
    turns = [
        Turn("system", "You answer in one word."),
        Turn("user", "What color is the circle?", (frames[0],)),
        Turn("assistant", "Red."),
        Turn("user", "And the square?"),
    ]
    prepared = qa.prepare_conversation(turns)
    assert "You answer in one word." in prepared.prompt and "Red." in prepared.prompt
    assert prepared.prompt.index("What color") < prepared.prompt.index("Red.") < prepared.prompt.index("And the square")
    single = qa.prepare(frames[0], "And the square?")
    assert prepared.prompt_tokens > single.prompt_tokens  # the budget counts the whole conversation
    assert qa.generate([prepared])[0].completion_tokens >= 1
    with pytest.raises(InvalidQuestionError, match="end with a user message"):
        qa.prepare_conversation(turns[:3])
    with pytest.raises(InvalidQuestionError, match="<image>"):
        qa.prepare_conversation([Turn("system", "see <image>"), Turn("user", "hi")])


@pytest.mark.parametrize("qa", ["llava"], indirect=True)
def test_budget_errors_give_the_familys_numbers(qa, frames):
    many = [frames[0]] * 8  # 8 x 576 image tokens > 4096 positions
    with pytest.raises(ContextBudgetError, match=r"4608 image tokens .* context 4096\); send fewer or smaller images"):
        qa.prepare(many, "What is in the images?")


def test_onevision_trains_on_mixed_image_and_video_examples(tiny_checkpoint, frames, tall_image):
    """The SFT/DPO example path (processor expansion, collation, labelled forward) on a OneVision checkpoint."""
    import torch

    from video_llava.model.loading import load_checkpoint
    from video_llava.model.prompts import build_prompt
    from video_llava.train.examples import IGNORE_INDEX, collate, sft_example

    model, processor = load_checkpoint(tiny_checkpoint("llava_onevision"))
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    prompt = build_prompt(processor, "What color is the circle?")
    examples = [sft_example(processor, prompt, "red", frames[:4]),
                sft_example(processor, prompt, "blue", image=tall_image)]
    batch = collate(examples, processor.tokenizer.pad_token_id)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and (batch["labels"] != IGNORE_INDEX).sum() == 4  # " red</s>", " blue</s>"
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
