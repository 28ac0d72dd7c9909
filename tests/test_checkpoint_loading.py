"""Checkpoints load exactly or not at all: every family's tiny checkpoint, written in each weight layout transformers
reads, loads through the library, the CLI and the training jobs' loader to the very weights transformers' own class
holds and answers token for token as it does; a checkpoint missing a weight is refused, naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.checkpoint_layouts import FAMILIES, LAYOUTS, saved_weights, write_layout
from tests.conftest import HEIGHT, WIDTH
from video_llava.data.synthetic_video import SAMPLE_SHAPES, render_frames

QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_checkpoint):
    """``checkpoints(family, layout)``: (directory, the reference model holding the same weights) for that layout."""
    root = tmp_path_factory.mktemp("layouts")
    references: dict = {}
    built: dict = {}

    def get(family: str, layout: str):
        source = Path(tiny_checkpoint(family))
        if family not in references:
            references[family] = saved_weights(source)
        reference, weights = references[family]
        if (family, layout) not in built:
            built[(family, layout)] = write_layout(source, weights, root / family / layout, layout)
        return built[(family, layout)], reference

    return get


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return render_frames(SAMPLE_SHAPES, num_frames=1, width=WIDTH, height=HEIGHT)[0]


def reference_answer(reference, qa, image: np.ndarray, new_tokens: int = 6) -> str:
    """transformers' own ``generate`` on the processor's inputs for the prompt our library builds."""
    import torch

    prompt = qa.prepare(image, QUESTION).prompt
    inputs = qa.processor(text=[prompt], images=[[image]], return_tensors="pt")
    with torch.inference_mode():
        out = reference.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return qa.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).lstrip()


def assert_same_weights(model, reference) -> None:
    import torch

    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    different = [name for name in theirs if not torch.equal(ours[name], theirs[name])]
    assert not different, different[:5]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_library_loads_every_layout_to_transformers_weights_and_answers(checkpoints, image, family, layout):
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    path, reference = checkpoints(family, layout)
    qa = VideoQAModel(ModelSettings(model=str(path), device="cpu", max_new_tokens=6))
    assert qa.family.name == family
    (answer,) = qa.answer([image], [QUESTION], max_new_tokens=6)
    assert answer.text == reference_answer(reference, qa, image)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_training_jobs_loader_reads_every_layout_to_transformers_weights(checkpoints, family, layout):
    from video_llava.model.loading import load_checkpoint

    path, reference = checkpoints(family, layout)
    model, _ = load_checkpoint(path)
    assert_same_weights(model, reference)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_cli_answers_from_every_layout_as_transformers_does(checkpoints, image, family, layout, tmp_path, capsys):
    """Yi-VL loaded with a random ``lm_head`` from the layout ``save_pretrained`` writes ("legacy")."""
    from PIL import Image

    from video_llava.cli import main
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    path, reference = checkpoints(family, layout)
    photo = tmp_path / "photo.png"
    Image.fromarray(image).save(photo)
    code = main(["ask", str(photo), QUESTION, "--model", str(path), "--device", "cpu", "--max-new-tokens", "6",
                 "--json"])
    assert code == 0, capsys.readouterr().err
    answer = json.loads(capsys.readouterr().out)["answer"]
    qa = VideoQAModel(ModelSettings(model=str(path), device="cpu"))
    assert answer == reference_answer(reference, qa, image)


@pytest.fixture(scope="module")
def without_a_weight(checkpoints, tmp_path_factory):
    """The Yi-VL checkpoint as saved, less one layer norm of its projector."""
    from safetensors.torch import load_file, save_file

    path, _ = checkpoints("yi_vl", "legacy")
    dest = tmp_path_factory.mktemp("broken") / "yi_vl"
    shutil.copytree(path, dest)
    weights = load_file(str(dest / "model.safetensors"))
    del weights["multi_modal_projector.linear_2.weight"]
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


MISSING = "model.multi_modal_projector.linear_2.weight"


def test_a_missing_weight_is_refused_naming_it_by_the_library_and_the_jobs_loader(without_a_weight):
    from video_llava.model.loading import IncompleteCheckpointError, load_checkpoint
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    with pytest.raises(IncompleteCheckpointError, match="1 weight") as refused:
        VideoQAModel(ModelSettings(model=str(without_a_weight), device="cpu"))
    assert refused.value.missing == [MISSING]
    with pytest.raises(IncompleteCheckpointError, match=MISSING.replace(".", r"\.")):
        load_checkpoint(without_a_weight)
    model, _ = load_checkpoint(without_a_weight, new_weights=("model.multi_modal_projector.",))  # asked for
    assert model.model.multi_modal_projector.linear_2.weight.shape == (64,)


def test_the_cli_refuses_a_checkpoint_missing_a_weight_in_one_line_with_exit_1(without_a_weight, image, tmp_path,
                                                                               capsys):
    from PIL import Image

    from video_llava.cli import EXIT_FAILED, main

    photo = tmp_path / "photo.png"
    Image.fromarray(image).save(photo)
    assert main(["ask", str(photo), QUESTION, "--model", str(without_a_weight), "--device", "cpu"]) == EXIT_FAILED
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and MISSING in err


def test_auto_runtime_is_fp16_where_bf16_is_only_emulated_and_sdpa_even_with_flash_attention_installed(monkeypatch):
    """What a pre-Ampere GPU with the gpu extra installed would be given (torch's answers set here: no GPU in CI).
    flash-attention's decode path over the batch's padded rows unpads with host syncs in every layer."""
    import importlib.util

    import torch

    from video_llava.model.loading import resolve_runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    runtime = resolve_runtime("cuda", "auto", "auto")
    assert (runtime.dtype, runtime.attn_implementation) == (torch.float16, "sdpa")
    assert resolve_runtime("cuda", "auto", "flash_attention_2").attn_implementation == "flash_attention_2"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_runtime("cuda", "auto", "auto").dtype == torch.bfloat16
