"""Frames reach each family at its own size: a 1280x720 video is decoded at the size the checkpoint's processor
reads (``CheckpointInputs.frame_short_side``), and the pixel values that reach the vision tower equal those of
transformers' processor given the full-size frames, within what swapping the processor's resize filter changes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from video_llava.data.synthetic_video import SAMPLE_SHAPES, render_frames, video_bytes

VIDEO_FAMILIES = ["llava_next_video", "llava_onevision"]
TOWER_SIDE = {"llava_next_video": 336, "llava_onevision": 384}  # CLIP-L/336, SigLIP/384


@pytest.fixture(scope="module")
def hd_clip(tmp_path_factory):
    """A 1280x720 mp4 of moving shapes over a band of 6-pixel checks (detail that a blurring resize loses)."""
    frames = render_frames(SAMPLE_SHAPES, num_frames=8, fps=8, width=1280, height=720)
    rows, cols = np.mgrid[0:200, 0:1280]
    frames[:, :200][:, ((rows // 6) + (cols // 6)) % 2 == 1] = (60, 60, 60)
    path = tmp_path_factory.mktemp("hd") / "clip.mp4"
    path.write_bytes(video_bytes(frames, fps=8))
    return path


def full_size_frames(path, num_frames: int) -> np.ndarray:
    from video_llava.video.decode import DecodeOptions, sample_video

    return sample_video(str(path), DecodeOptions(num_frames=num_frames, short_side=None)).frames


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_pixels_reaching_the_vision_tower_equal_the_processors_on_full_size_frames(tiny_checkpoint, hd_clip, family):
    import torch
    from transformers.image_utils import PILImageResampling

    from video_llava.model.loading import checkpoint_inputs
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings
    from video_llava.video.decode import DecodeOptions
    from video_llava.video.isolated import decode_video

    settings = ModelSettings(model=str(tiny_checkpoint(family)), device="cpu", num_frames=4, max_new_tokens=2)
    short_side = checkpoint_inputs(settings).frame_short_side
    assert short_side == 2 * TOWER_SIDE[family]
    video = decode_video(str(hd_clip), DecodeOptions(num_frames=4, short_side=short_side))  # as the CLI does
    assert min(video.frames.shape[1:3]) == min(720, short_side)

    qa = VideoQAModel(settings)
    seen: list = []
    hook = qa.model.model.vision_tower.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    try:
        qa.answer([video], ["What happens?"])
    finally:
        hook.remove()
    reached = torch.cat(seen)

    full = full_size_frames(hd_clip, 4)
    processor = qa.processor.video_processor
    reference = processor(videos=[full], return_tensors="pt")["pixel_values_videos"][0]
    other_filter = processor(videos=[full], return_tensors="pt",
                             resample=PILImageResampling.BILINEAR)["pixel_values_videos"][0]
    assert reached.shape == reference.shape
    tolerance = (other_filter - reference).abs().mean().item()
    difference = (reached - reference).abs().mean().item()
    assert difference <= tolerance, (difference, tolerance)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_the_cli_decodes_a_video_at_its_checkpoints_size(tiny_checkpoint, hd_clip, family, capsys):
    from video_llava.cli import main

    code = main(["info", str(hd_clip), "--frames", "2", "--model", str(tiny_checkpoint(family)), "--json"])
    assert code == 0, capsys.readouterr().err
    height, width, _ = json.loads(capsys.readouterr().out)["frame_shape"]
    side = min(720, 2 * TOWER_SIDE[family])
    assert height == side and abs(width - 1280 * side / 720) <= 2


def test_image_only_families_size_frames_by_their_image_processor(tiny_checkpoint):
    from video_llava.model.loading import checkpoint_inputs
    from video_llava.model.settings import ModelSettings

    llava = checkpoint_inputs(ModelSettings(model=str(tiny_checkpoint("llava"))))
    yi = checkpoint_inputs(ModelSettings(model=str(tiny_checkpoint("yi_vl"))))
    assert (llava.media, llava.frame_short_side) == (frozenset({"image"}), 2 * 336)
    assert (yi.media, yi.frame_short_side) == (frozenset({"image"}), 2 * 448)
