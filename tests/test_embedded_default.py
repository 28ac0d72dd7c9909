"""The shipped embedded default is a trained checkpoint that answers questions about the bundled clip correctly."""

from __future__ import annotations

from pathlib import Path

import pytest

from video_llava.embedded import PACKAGED_DIR, embedded_path

SAMPLE = Path(__file__).resolve().parents[1] / "video_llava" / "assets" / "sample.mp4"


@pytest.fixture(scope="module")
def shipped(embedded_cache):
    from video_llava.model import VideoQAModel
    from video_llava.settings import ModelSettings

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


@pytest.mark.parametrize("question, answer", [("What color is the circle?", "red"), ("What color is the square?", "blue")])
def test_the_shipped_default_answers_colour_questions_about_the_bundled_clip(shipped, question, answer):
    from video_llava.video import DecodeOptions, sample_video

    frames = sample_video(SAMPLE, DecodeOptions(num_frames=shipped.settings.num_frames)).frames
    reply = shipped.answer([frames], [question], max_new_tokens=8)[0].text
    assert answer in reply.lower(), reply
