"""Training examples: answer-only labels, and image and video records mixed in one batch."""

from __future__ import annotations

import numpy as np
import pytest

from video_llava.data.records import conversation_turns
from video_llava.data.synthetic_video import SAMPLE_SHAPES, render_frames
from video_llava.model.prompts import build_prompt
from video_llava.train.examples import IGNORE_INDEX, collate, fixed_length, sft_example
from video_llava.train.objectives import answer_logprobs, dpo_loss


@pytest.fixture(scope="module")
def model_and_processor(embedded_cache):
    from video_llava.model.embedded import embedded_path
    from video_llava.model.loading import load_checkpoint

    return load_checkpoint(embedded_path())


def test_labels_cover_only_the_answer_and_eos(model_and_processor):
    _, processor = model_and_processor
    frames = render_frames(SAMPLE_SHAPES, num_frames=2, width=64, height=48)
    example = sft_example(processor, build_prompt(processor, "What color is the circle?"), "red", frames)
    labelled = example["input_ids"][example["labels"] != IGNORE_INDEX].tolist()
    assert processor.tokenizer.decode(labelled[:-1]).strip() == "red"
    assert labelled[-1] == processor.tokenizer.eos_token_id


def test_every_answer_of_a_multi_turn_conversation_is_labelled_and_no_question_is(model_and_processor):
    _, processor = model_and_processor
    record = {"id": "r", "conversations": [
        {"from": "human", "value": "<video>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "What color is the square?"}, {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "Describe the video in detail."}, {"from": "gpt", "value": "A red circle and a blue square."}]}
    turns = conversation_turns(record)
    assert turns[0] == ("What color is the circle?", "red") and len(turns) == 3
    frames = render_frames(SAMPLE_SHAPES, num_frames=2, width=64, height=48)
    example = sft_example(processor, build_prompt(processor, turns[0][0]), turns[0][1], frames, follow_ups=turns[1:])
    tokenizer = processor.tokenizer
    labelled = example["input_ids"][example["labels"] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(labelled) == " red</s> blue</s> A red circle and a blue square.</s>"
    text = tokenizer.decode(example["input_ids"][example["input_ids"] != processor.video_token_id])
    assert text.endswith("ASSISTANT: red</s>USER: What color is the square? ASSISTANT: blue</s>"
                         "USER: Describe the video in detail. ASSISTANT: A red circle and a blue square.</s>")
    assert text.count("<video>") == 0 and (example["input_ids"] == processor.video_token_id).sum() == 2 * 144


def test_a_video_shorter_than_the_frame_count_repeats_frames_evenly():
    frames = np.arange(4)[:, None, None, None] * np.ones((4, 2, 2, 3), np.uint8)
    assert fixed_length(frames, 8)[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert fixed_length(frames, 4) is frames


def test_image_and_video_records_share_one_batch(model_and_processor):
    import torch

    model, processor = model_and_processor
    video = render_frames(SAMPLE_SHAPES, num_frames=2, width=64, height=48)
    image = render_frames(SAMPLE_SHAPES, num_frames=1, width=96, height=40)[0]  # an odd aspect: anyres tiles
    prompt = build_prompt(processor, "What color is the circle?")
    examples = [sft_example(processor, prompt, "red", video), sft_example(processor, prompt, "red", image=image),
                sft_example(processor, prompt, "blue", video), sft_example(processor, prompt, "red", image=image[:20])]
    batch = collate(examples, processor.tokenizer.pad_token_id)
    assert batch["pixel_values_videos"].shape[:2] == (2, 2) and batch["pixel_values"].shape[0] == 2
    assert (batch["input_ids"] == processor.image_token_id).any(1).tolist() == [False, True, False, True]
    assert (batch["input_ids"] == processor.video_token_id).any(1).tolist() == [True, False, True, False]
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()  # gradients flow through both the image and the video path
    logps = answer_logprobs(model, batch)
    assert logps.shape == (4,) and bool((logps < 0).all())


def test_dpo_loss_is_log_two_at_the_start_and_falls_as_the_margin_grows():
    import torch

    zero = torch.zeros(3)
    loss, margin, accuracy = dpo_loss(zero, zero, zero, zero, beta=0.1)
    assert loss.item() == pytest.approx(np.log(2)) and margin.abs().max().item() == 0
    better, _, acc = dpo_loss(zero + 2, zero - 2, zero, zero, beta=0.1)
    assert better.item() < loss.item() and acc.mean().item() == 1.0


def test_the_parts_asked_train_and_under_lora_the_llms_weights_stay_frozen(model_and_processor):
    import copy

    from peft import LoraConfig, get_peft_model

    from video_llava.train.parts import param_groups, part_of, select_trained
    from video_llava.train.run import LORA_TARGETS

    model = copy.deepcopy(model_and_processor[0])
    select_trained(model, ["projector"])
    assert {part_of(n) for n, p in model.named_parameters() if p.requires_grad} == {"projector"}
    groups = param_groups(model, {"vision": 1.0, "projector": 2.0, "llm": 3.0}, weight_decay=0.1)
    assert [(g["part"], g["lr"], g["base_lr"], g["weight_decay"]) for g in groups] == [("projector", 2.0, 2.0, 0.1)]
    lora = get_peft_model(copy.deepcopy(model_and_processor[0]),
                          LoraConfig(r=2, target_modules=LORA_TARGETS, modules_to_save=["multi_modal_projector"]))
    select_trained(lora, ["vision", "llm"], lora=True)
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any(part_of(n) == "vision" for n in trained)  # asked for: trained whole, though PEFT froze it
    assert not any(part_of(n) == "projector" for n in trained)  # not asked for: its saved copy frozen too
    assert all("lora_" in n for n in trained if part_of(n) == "llm") and any("lora_" in n for n in trained)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_conservative_and_robust_dpo_are_log_two_at_an_even_margin_and_weigh_label_noise(smoothing):
    import torch

    from video_llava.train.objectives import preference_losses

    even, wide = torch.zeros(1), torch.tensor([20.0])
    for loss_type in ("sigmoid", "robust"):
        assert preference_losses(even, 0.1, loss_type, smoothing).item() == pytest.approx(np.log(2))
    # conservative DPO with smoothing e: a pair won by a wide margin still costs e x its loss were the label wrong
    conservative = preference_losses(wide, 0.1, "sigmoid", smoothing).item()
    assert conservative == pytest.approx(-(1 - smoothing) * np.log(1 / (1 + np.exp(-2))) -
                                         smoothing * np.log(1 / (1 + np.exp(2))), rel=1e-5)
    robust = preference_losses(wide, 0.1, "robust", smoothing).item()
    assert (robust < conservative) if smoothing else robust == pytest.approx(conservative)


def test_ipo_pulls_the_per_token_margin_to_one_over_two_beta_and_rpo_adds_the_chosen_answers_nll():
    import torch

    from video_llava.train.objectives import PairScores, PreferenceObjective, preference_losses

    assert preference_losses(torch.tensor([5.0]), 0.1, "ipo").item() == 0  # 1 / (2 x 0.1)
    assert preference_losses(torch.tensor([7.0]), 0.1, "ipo").item() == pytest.approx(4.0)
    # two pairs, chosen answers of 2 and 4 tokens, rejected of 1 and 5: IPO takes per-token means
    scores = PairScores(policy=torch.tensor([[-2.0, -3.0], [-4.0, -10.0]]),
                        reference=torch.tensor([[-4.0, -2.0], [-8.0, -5.0]]), lengths=torch.tensor([[2, 1], [4, 5]]))
    loss, figures = PreferenceObjective(beta=0.1, loss_type="ipo")(scores)
    margins = torch.tensor([(-1 + 2) - (-3 + 2), (-1 + 2) - (-2 + 1)], dtype=torch.float32)  # per-token: (pi_c - ref_c) - (pi_r - ref_r)
    assert loss.item() == pytest.approx(float(((margins - 5) ** 2).mean()))
    assert figures["rewards/chosen"].tolist() == pytest.approx([0.1, 0.1])
    assert figures["logps/chosen"].tolist() == [-1.0, -1.0] and "nll_loss" not in figures
    plain, _ = PreferenceObjective(beta=0.1)(scores)
    rpo, figures = PreferenceObjective(beta=0.1, rpo_alpha=0.5)(scores)
    assert figures["nll_loss"].tolist() == [1.0, 1.0]  # the chosen answers' per-token NLL: 2/2 and 4/4
    assert rpo.item() == pytest.approx(plain.item() + 0.5)
    assert figures["logps/chosen"].tolist() == [-2.0, -4.0] and figures["loss"].shape == (2,)


def test_records_may_name_their_media_by_s3_uri(tmp_path, monkeypatch):
    import io

    import boto3
    from moto.server import ThreadedMotoServer
    from PIL import Image

    from video_llava.data.records import flatten_record, load_media
    from video_llava.data.synthetic_video import write_video
    from video_llava.ray_runtime import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        client = boto3.client("s3")
        client.create_bucket(Bucket="train")
        write_video(tmp_path / "clip.mp4", render_frames(SAMPLE_SHAPES, num_frames=6, width=64, height=48))
        client.put_object(Bucket="train", Key="v/clip.mp4", Body=(tmp_path / "clip.mp4").read_bytes())
        png = io.BytesIO()
        Image.fromarray(render_frames(SAMPLE_SHAPES, num_frames=1, width=40, height=30)[0]).save(png, format="PNG")
        client.put_object(Bucket="train", Key="i/frame.png", Body=png.getvalue())

        record = {"id": "a", "video": "s3://train/v/clip.mp4",
                  "conversations": [{"from": "human", "value": "<video>\nQ?"}, {"from": "gpt", "value": "A"}]}
        row = flatten_record(record, tmp_path)
        assert row["video"] == "s3://train/v/clip.mp4"  # not joined to the dataset directory
        assert load_media(row["video"], "", 3).shape == (3, 48, 64, 3)
        assert load_media("", "s3://train/i/frame.png", 3).shape == (1, 30, 40, 3)
    finally:
        server.stop()


def record_of(raw: dict, root):
    from video_llava.data.record_files import parse_record

    return parse_record(raw, 0, str(root))


def test_images_sit_where_their_placeholders_stand_in_any_turn_and_only_answers_are_labelled(
        model_and_processor, tmp_path):
    import torch

    from video_llava.train.examples import conversation_example

    model, processor = model_and_processor
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    record = record_of({"id": "ov", "image": ["a.png", "b.png", "c.png"], "conversations": [
        {"from": "human", "value": "First: <image> second: <image>\nWhat color is the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And here? <image>"}, {"from": "gpt", "value": "blue"}]}, tmp_path)
    wide = render_frames(SAMPLE_SHAPES, num_frames=1, width=96, height=40)[0]
    tall = render_frames(SAMPLE_SHAPES, num_frames=1, width=40, height=96)[0]
    example = conversation_example(processor, record, [wide, tall, wide])
    ids, tokenizer = example["input_ids"], processor.tokenizer
    image = (ids == processor.image_token_id).int()
    assert torch.nonzero(torch.diff(image)).numel() == 6  # three runs of image tokens, one per placeholder
    text = tokenizer.decode(ids[ids != processor.image_token_id])
    assert ("USER: First:  second: \nWhat color is the circle? ASSISTANT: red</s>"
            "USER: \nAnd here? ASSISTANT: blue</s>") in text  # several in place; a lone one first, as LLaVA's trainers
    assert tokenizer.decode(ids[example["labels"] != IGNORE_INDEX]) == " red</s> blue</s>"
    assert example["image_sizes"].tolist() == [[40, 96], [96, 40], [40, 96]]
    text_only = record_of({"id": "t", "conversations": [{"from": "system", "value": "Be brief."},
                                                         {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."}]},
                          tmp_path)
    video = record_of({"id": "v", "video": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"}]}, tmp_path)
    frames = render_frames(SAMPLE_SHAPES, num_frames=2, width=64, height=48)
    chat = conversation_example(processor, text_only, [])
    assert tokenizer.decode(chat["input_ids"]) == "<s>Be brief. USER: Hi? ASSISTANT: Hi.</s>"
    assert not set(chat) & {"pixel_values", "pixel_values_videos"}
    batch = collate([example, chat, conversation_example(processor, video, [frames])], tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 3 and batch["pixel_values_videos"].shape[0] == 1
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()


@pytest.mark.parametrize("family", ["llava_onevision", "llava"])
def test_several_images_of_one_record_train_on_every_family_shape(family, tiny_checkpoint, tmp_path):
    """OneVision takes a turn's images together at base resolution (batch_num_images), LLaVA-1.5 one tensor per
    image: the processor's token counts and the model's features agree (the forward would fail otherwise)."""
    import torch

    from video_llava.model.loading import load_checkpoint
    from video_llava.train.examples import conversation_example

    model, processor = load_checkpoint(tiny_checkpoint(family))
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    images = [render_frames(SAMPLE_SHAPES, num_frames=1, width=w, height=h)[0] for w, h in ((96, 40), (40, 96), (64, 64))]
    together = record_of({"id": "a", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich is wider?"}, {"from": "gpt", "value": "The first."}]}, tmp_path)
    alone = record_of({"id": "b", "image": "c.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "circle"}]}, tmp_path)
    examples = [conversation_example(processor, together, images[:2]), conversation_example(processor, alone, images[2:])]
    batch = collate(examples, processor.tokenizer.pad_token_id)
    if family == "llava_onevision":
        assert batch["batch_num_images"].tolist() == [2, 1]
    assert batch["pixel_values"].shape[0] == 3
    loss = model(**batch).loss
    assert torch.isfinite(loss)
