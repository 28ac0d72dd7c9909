"""jobs.expand_llm: a checkpoint's LLM grown by identity blocks answers exactly as before, and the new blocks train."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.expand_llm import cli

SAMPLE = Path(__file__).resolve().parents[1] / "video_llava" / "assets" / "sample.mp4"
QUESTION = "What color is the circle?"


@pytest.fixture(scope="module")
def grown(tmp_path_factory, embedded_cache) -> Path:
    out = tmp_path_factory.mktemp("expand") / "grown"
    assert cli(["--model", "embedded", "--layers", "4", "--output", str(out)]) == 0
    return out


def _inputs(source):
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings
    from video_llava.video.decode import DecodeOptions, sample_video

    qa = VideoQAModel(ModelSettings(model=str(source)))
    frames = sample_video(SAMPLE, DecodeOptions(num_frames=8)).frames
    embeds, mask, _, _ = qa.embedder([qa.prepare(frames, QUESTION)])
    return qa, embeds, mask, frames


def test_the_grown_checkpoint_has_the_new_depth_and_computes_what_the_old_one_did(grown):
    import torch

    from video_llava.model.embedded import PACKAGED_DIR

    old, embeds, mask, frames = _inputs(PACKAGED_DIR)
    new, _, _, _ = _inputs(grown)
    assert new.model.config.text_config.num_hidden_layers == 4 == old.model.config.text_config.num_hidden_layers + 2
    with torch.inference_mode():
        before = old.model(inputs_embeds=embeds, attention_mask=mask).logits
        after = new.model(inputs_embeds=embeds, attention_mask=mask).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert new.answer([frames], [QUESTION])[0].text == old.answer([frames], [QUESTION])[0].text


def test_the_new_blocks_get_gradients_so_training_can_use_them(grown):
    qa, embeds, mask, _ = _inputs(grown)
    model = qa.model.float().train()
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    logits[0, -1].logsumexp(-1).backward()
    new_block = model.model.language_model.layers[3]
    assert new_block.self_attn.o_proj.weight.grad.abs().sum() > 0  # zero weights, non-zero gradient
    assert new_block.mlp.down_proj.weight.grad.abs().sum() > 0


def test_growing_to_no_more_blocks_is_refused_with_the_reason(tmp_path, embedded_cache, capsys):
    assert cli(["--model", "embedded", "--layers", "2", "--output", str(tmp_path / "same")]) == 2
    assert "already has 2 blocks" in capsys.readouterr().err
    assert not (tmp_path / "same").exists()


def test_an_existing_output_directory_is_never_overwritten(grown, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in grown.iterdir()}
    assert cli(["--model", "embedded", "--layers", "6", "--output", str(grown)]) == 2
    assert "exists" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in grown.iterdir()} == before
