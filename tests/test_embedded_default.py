"""The shipped embedded default is a trained checkpoint that answers questions about the bundled clip correctly."""

from __future__ import annotations

from pathlib import Path

import pytest

from video_llava.model.embedded import PACKAGED_DIR, embedded_path

SAMPLE = Path(__file__).resolve().parents[1] / "video_llava" / "assets" / "sample.mp4"


@pytest.fixture(scope="module")
def shipped(embedded_cache):
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    return VideoQAModel(ModelSettings())


def test_the_package_ships_a_small_trained_checkpoint_that_embedded_resolves_to(shipped):
    assert (PACKAGED_DIR / "config.json").exists() and (PACKAGED_DIR / "model.safetensors").exists()
    size = sum(f.stat().st_size for f in PACKAGED_DIR.iterdir())
    assert size < 5 * 2**20
    assert Path(shipped.source) == PACKAGED_DIR
    assert embedded_path(packaged=False) != PACKAGED_DIR  # the untrained starting point is built separately


def test_trained_weights_differ_from_the_untrained_starting_point(shipped):
    import torch
    from transformers import LlavaNextVideoForConditionalGeneration

    init = LlavaNextVideoForConditionalGeneration.from_pretrained(embedded_path(packaged=False)).state_dict()
    trained = shipped.model.state_dict()
    projector = [k for k in init if "multi_modal_projector" in k]
    assert projector and all(not torch.equal(init[k], trained[k].to(init[k].dtype)) for k in projector)


def _answer(model, frames, question: str) -> str:
    return model.answer([frames], [question], max_new_tokens=8)[0].text.lower()


def test_the_shipped_default_names_a_colour_that_is_in_the_bundled_clip(shipped):
    from video_llava.video.decode import DecodeOptions, sample_video

    frames = sample_video(SAMPLE, DecodeOptions(num_frames=shipped.settings.num_frames)).frames
    assert _answer(shipped, frames, "What color is the circle?") in {"red", "blue"}  # the clip's two colours


@pytest.mark.parametrize("color, shape", [("red", "circle"), ("green", "triangle"), ("purple", "square")])
def test_the_shipped_default_answers_the_colour_of_a_single_shape(shipped, color, shape):
    from video_llava.data.synthetic_video import MovingShape, render_frames

    frames = render_frames([MovingShape(shape, color, "right", start=(0.25, 0.45), size=0.22, speed=0.12)],
                           num_frames=8, fps=8, width=112, height=112)
    assert _answer(shipped, frames, f"What color is the {shape}?") == color


def test_the_shipped_default_answers_colour_questions_about_each_shape_of_the_bundled_clip(shipped):
    from video_llava.video.decode import DecodeOptions, sample_video

    frames = sample_video(SAMPLE, DecodeOptions(num_frames=shipped.settings.num_frames)).frames
    assert _answer(shipped, frames, "What color is the circle?") == "red"
    assert _answer(shipped, frames, "What color is the square?") == "blue"
