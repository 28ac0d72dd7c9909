"""Other families through the REST API with the ``openai`` client: a tiny LLaVA-OneVision (videos, images, both in
one message) and a tiny Yi-VL (images only, its weights named as transformers' ``save_pretrained`` writes them)
served from their checkpoint directories, over real HTTP."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest

from tests.conftest import HEIGHT, WIDTH
from tests.live_service import error_of, running_service
from video_llava.data.synthetic_video import SAMPLE_SHAPES, render_frames, video_bytes
from video_llava.model.prompts import Turn

pytestmark = pytest.mark.slow

DECODE_MEMORY_MB = 400
FRAMES = render_frames(SAMPLE_SHAPES, num_frames=12, width=WIDTH, height=HEIGHT)


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


IMAGE = png(FRAMES[0])
TALL = png(np.random.default_rng(3).integers(0, 256, (400, 240, 3), dtype=np.uint8))
VIDEO = video_bytes(FRAMES, fps=12.0)


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data, "image/png")}}


def video_part(data: bytes) -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(data, "video/mp4")}}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


@pytest.fixture(scope="module", params=["llava_onevision", "yi_vl"])
def served(request, tiny_checkpoint):
    """(base URL, family, the same checkpoint loaded here to count what the service should count)."""
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    path = str(tiny_checkpoint(request.param))
    settings = {"model": path, "max_new_tokens": 6, "num_frames": 4, "max_frames": 16, "device": "cpu"}
    args = {
        "model": settings,
        "served_model_names": ["m"],  # what the clients below name it (its path otherwise)
        "limits": {"max_question_chars": 4000},
        "batching": {"max_batch_size": 4},
        "deployment": {"num_cpus": 1, "ingress_num_cpus": 0.5, "decode_worker_memory_mb": DECODE_MEMORY_MB},
    }
    with running_service(args) as base:
        yield base, request.param, VideoQAModel(ModelSettings(**settings))


def client_of(base: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="unused")


def decoded(data: bytes) -> np.ndarray:
    from video_llava.video.image import load_image

    return load_image(data).pixels


def expected_prompt_tokens(local, turns: list[Turn]) -> int:
    """What the service should report as prompt tokens: text + visual tokens of the rendered conversation."""
    prepared = local.prepare_conversation(turns)
    return prepared.prompt_tokens + prepared.visual_tokens


def test_an_image_question_is_answered_and_counted_as_the_processor_expands_it(served):
    base, _, local = served
    completion = client_of(base).chat.completions.create(
        model="m", messages=[{"role": "user", "content": [image_part(TALL), text("What is in the image?")]}])
    assert completion.choices[0].message.content is not None
    assert completion.usage.prompt_tokens == expected_prompt_tokens(
        local, [Turn("user", "What is in the image?", (decoded(TALL),))])
    assert completion.model_extra["video_llava"]["images"] == [
        {"width": 240, "height": 400, "format": "PNG", "frames_in_file": 1}]


def test_the_service_answers_as_the_library_does_from_the_same_checkpoint(served):
    """Greedy, the same tokens as the library (itself token-identical to transformers' class: test_checkpoint_loading):
    a replica that initialised any weight at random would answer otherwise."""
    base, _, local = served
    completion = client_of(base).chat.completions.create(
        model="m", max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": [image_part(IMAGE), text("What is in the image?")]}])
    (answer,) = local.answer([decoded(IMAGE)], ["What is in the image?"], max_new_tokens=6)
    assert completion.choices[0].message.content == answer.text


def test_a_seeded_sampled_answer_from_the_service_is_the_librarys(served):
    """One generation path: the library's ``answer`` runs on the same engine as the replica, so a sampled answer
    with a seed is the same from either."""
    base, _, local = served
    completion = client_of(base).chat.completions.create(
        model="m", max_tokens=8, temperature=1.0, top_p=0.9, seed=11,
        messages=[{"role": "user", "content": [image_part(IMAGE), text("What is in the image?")]}])
    (answer,) = local.answer([decoded(IMAGE)], ["What is in the image?"], max_new_tokens=8, temperature=1.0,
                             top_p=0.9, seed=11)
    assert completion.choices[0].message.content == answer.text


def test_several_images_in_one_message(served):
    base, _, local = served
    completion = client_of(base).chat.completions.create(
        model="m", messages=[{"role": "user", "content": [image_part(IMAGE), image_part(TALL), text("Compare them.")]}])
    assert completion.usage.prompt_tokens == expected_prompt_tokens(
        local, [Turn("user", "Compare them.", (decoded(IMAGE), decoded(TALL)))])


def test_a_conversations_system_message_and_earlier_turns_reach_the_prompt(served):
    base, _, local = served
    messages = [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": [image_part(IMAGE), text("What color is the circle?")]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And the square?"},
    ]
    completion = client_of(base).chat.completions.create(model="m", messages=messages)
    turns = [Turn("system", "Answer with one word."), Turn("user", "What color is the circle?", (decoded(IMAGE),)),
             Turn("assistant", "Red."), Turn("user", "And the square?")]
    assert completion.usage.prompt_tokens == expected_prompt_tokens(local, turns)
    assert completion.usage.prompt_tokens > expected_prompt_tokens(local, turns[1:])  # the system text counted


def test_videos_and_images_where_the_family_takes_them_else_unsupported_media(served):
    base, family, local = served
    messages = [{"role": "user", "content": [image_part(IMAGE), video_part(VIDEO), text("What happens?")]}]
    if family == "yi_vl":
        response = httpx.post(f"{base}/v1/chat/completions", json={"messages": messages}, timeout=60)
        body = error_of(response, 400, "unsupported_media")
        assert "takes images, not videos" in body["message"]
        return
    completion = client_of(base).chat.completions.create(model="m", messages=messages)
    extra = completion.model_extra["video_llava"]
    assert extra["num_frames"] == 4 and len(extra["videos"]) == 1 and len(extra["images"]) == 1
    frames = FRAMES[np.asarray(extra["videos"][0]["sampled_indices"])]  # the service decoded these frames
    assert completion.usage.prompt_tokens == expected_prompt_tokens(
        local, [Turn("user", "What happens?", (decoded(IMAGE), frames))])


def test_qa_endpoint_takes_an_image_upload_and_an_image_url(served):
    base, _, _ = served
    upload = httpx.post(f"{base}/v1/video/qa", files={"image": ("a.png", IMAGE, "image/png")},
                        data={"question": "What is it?"}, timeout=120)
    assert upload.status_code == 200, upload.text
    assert upload.json()["image"]["width"] == WIDTH and upload.json()["video"] is None
    by_url = httpx.post(f"{base}/v1/video/qa", json={"image_url": data_url(IMAGE, "image/png"), "question": "What is it?"},
                        timeout=120)
    assert by_url.status_code == 200, by_url.text
    assert by_url.json()["answer"] == upload.json()["answer"]
    both = httpx.post(f"{base}/v1/video/qa", json={"image_url": "data:,x", "video_url": "data:,x", "question": "Hi"})
    error_of(both, 400)


def test_corrupt_or_huge_image_is_422_and_the_service_keeps_answering(served):
    base, _, _ = served
    post = lambda part: httpx.post(f"{base}/v1/chat/completions", timeout=60,  # noqa: E731
                                   json={"messages": [{"role": "user", "content": [part, text("What is it?")]}]})
    error_of(post(image_part(b"\x89PNG\r\n\x1a\n garbage")), 422, "invalid_image")
    error_of(post(image_part(IMAGE[: len(IMAGE) // 2])), 422, "invalid_image")  # truncated
    from PIL import Image

    bomb = io.BytesIO()
    Image.new("L", (20000, 20000)).save(bomb, format="PNG")  # 400 MP declared in about 50 KB
    error_of(post(image_part(bomb.getvalue())), 422, "invalid_image_dimensions")
    ok = post(image_part(IMAGE))
    assert ok.status_code == 200, ok.text


def test_an_image_that_needs_more_than_the_decoders_memory_is_422_and_the_worker_is_replaced(served):
    """30 MP is within the area limit; decoding it needs more than the 400 MB a decode process may hold."""
    from PIL import Image

    base, _, _ = served
    dense = io.BytesIO()
    Image.new("RGB", (6000, 5000), (90, 120, 30)).save(dense, format="PNG")  # about 100 KB
    post = lambda data: httpx.post(f"{base}/v1/video/qa", files={"image": ("a.png", data, "image/png")},  # noqa: E731
                                   data={"question": "What is it?"}, timeout=120)
    body = error_of(post(dense.getvalue()), 422, "decode_out_of_memory")
    assert f"{DECODE_MEMORY_MB} MB" in body["message"]
    assert post(IMAGE).status_code == 200  # a fresh decode process answers the next request


def test_malformed_conversations_are_400_naming_the_message(served):
    base, _, _ = served
    post = lambda messages: httpx.post(f"{base}/v1/chat/completions", json={"messages": messages}, timeout=60)  # noqa: E731
    user = {"role": "user", "content": [image_part(IMAGE), text("What is it?")]}
    error_of(post([user, {"role": "tool", "content": "42", "tool_call_id": "x"}]), 400)
    body = error_of(post([{"role": "assistant", "content": [image_part(IMAGE), text("Look")]}, user]), 400)
    assert body["param"] == "messages.0.content"
    error_of(post([user, {"role": "assistant", "content": "Red."}]), 400)  # ends with the assistant
    detail = [{"type": "image_url", "image_url": {"url": data_url(IMAGE, "image/png"), "detail": "high"}}, text("Hi")]
    body = error_of(post([{"role": "user", "content": detail}]), 400)
    assert "detail" in body["param"]


def test_a_replica_whose_checkpoint_lacks_a_weight_does_not_start_and_says_which(served, tmp_path):
    """Deployed beside the running application: its model deployment fails to start, naming the weight, and the
    running application keeps answering."""
    import shutil

    from ray import serve
    from safetensors.torch import load_file, save_file

    from video_llava.serve.app import build_app
    from video_llava.serve.config import ServeArgs

    base, family, local = served
    if family != "yi_vl":
        pytest.skip("one broken deployment is enough")
    broken = tmp_path / "broken"
    shutil.copytree(local.source, broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights["multi_modal_projector.linear_2.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    args = {"model": {"model": str(broken), "device": "cpu"}, "deployment": {"num_cpus": 0, "ingress_num_cpus": 0}}
    try:
        with pytest.raises(RuntimeError, match="Deploying application broken failed"):
            serve.run(build_app(ServeArgs.model_validate(args)), name="broken", route_prefix="/broken")
        model = serve.status().applications["broken"].deployments["ModelServer"]
        assert model.status == "DEPLOY_FAILED"
        assert "IncompleteCheckpointError" in model.message
        assert "model.multi_modal_projector.linear_2.weight" in model.message
    finally:
        serve.delete("broken")
    ok = httpx.post(f"{base}/v1/video/qa", files={"image": ("a.png", IMAGE, "image/png")},
                    data={"question": "What is it?"}, timeout=120)
    assert ok.status_code == 200, ok.text


def test_every_family_and_every_layout_serves_the_answers_the_library_gives(served, tmp_path):
    """Each tiny checkpoint, its weights named as one of the layouts transformers reads (in turn: every family and
    every layout served at least once; every pair goes through the CLI in test_checkpoint_loading), deployed beside
    the running application and asked an image question over HTTP: greedy, the tokens the library gives from the same
    directory (itself equal to transformers' own class: test_checkpoint_loading)."""
    from ray import serve

    from tests.checkpoint_layouts import FAMILIES, LAYOUTS, saved_weights, write_layout
    from video_llava.model.families.tiny import build_tiny
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings
    from video_llava.serve.app import build_app
    from video_llava.serve.config import ServeArgs

    base, family, _ = served
    if family != "yi_vl":
        pytest.skip("deployed once, beside one of the running applications")
    question = [{"role": "user", "content": [image_part(IMAGE), text("What is in the image?")]}]
    assert len(FAMILIES) >= len(LAYOUTS)
    for i, name in enumerate(FAMILIES):
        layout = LAYOUTS[i % len(LAYOUTS)]
        source = build_tiny(name, tmp_path / name / "saved")
        _, weights = saved_weights(source)
        path = write_layout(source, weights, tmp_path / name / layout, layout)
        settings = {"model": str(path), "max_new_tokens": 6, "device": "cpu"}
        args = {"model": settings, "served_model_names": ["m"],
                "deployment": {"num_cpus": 0, "ingress_num_cpus": 0, "decode_workers": 1}}
        app = f"{name}-{layout}"
        try:
            serve.run(build_app(ServeArgs.model_validate(args)), name=app, route_prefix=f"/{app}")
            reply = client_of(f"{base}/{app}").chat.completions.create(model="m", messages=question, max_tokens=6,
                                                                        temperature=0)
        finally:
            serve.delete(app)
        (expected,) = VideoQAModel(ModelSettings(**settings)).answer([decoded(IMAGE)], ["What is in the image?"])
        assert reply.choices[0].message.content == expected.text, app
