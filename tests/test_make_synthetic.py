"""The synthetic video-QA dataset: deterministic, LLaVA-style, and its answers are true of its pixels."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jobs.make_synthetic import SyntheticConfig, main
from video_llava.data.records import conversation_turns
from video_llava.data.synthetic_qa import DESCRIBE, NUMBER_WORDS, QA_TYPES, answer_choices
from video_llava.data.synthetic_video import COLORS, FORMATS, SAMPLE_SHAPES, render_frames, video_bytes
from video_llava.video.decode import DecodeOptions, sample_video


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    main(SyntheticConfig(output=out, train=16, val=8, test=8, seed=3, follow_ups=True))
    return out


def _records(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_give_identical_files_in_one_process(dataset, tmp_path):
    again = tmp_path / "again"
    main(SyntheticConfig(output=again, train=16, val=8, test=8, seed=3, follow_ups=True))
    assert _digest(again) == _digest(dataset)


def test_same_arguments_give_identical_files_from_a_fresh_process(dataset, tmp_path):
    root = Path(__file__).resolve().parents[1]
    argv = ["--output", str(tmp_path), "--train", "16", "--val", "8", "--test", "8", "--seed", "3", "--follow-ups"]
    subprocess.run([sys.executable, "-m", "jobs.make_synthetic", *argv], cwd=root, check=True, capture_output=True)
    assert _digest(tmp_path) == _digest(dataset)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_encodes_the_same_frames_to_the_same_bytes(fmt):
    frames = render_frames(SAMPLE_SHAPES, num_frames=12, width=112, height=112)
    first = video_bytes(frames, fmt=fmt)
    # dirty the heap between encodes: the x264 fault this guards against read memory it never wrote
    junk = [np.random.default_rng(k).integers(0, 255, 1 << 20, dtype=np.uint8).tobytes() for k in range(4)]
    assert all(video_bytes(frames, fmt=fmt) == first for _ in range(3)), fmt
    del junk


def test_records_are_llava_style_with_a_caption_and_balanced_question_types(dataset):
    records = _records(dataset, "train")
    assert len(records) == 16
    for r in records:
        human, gpt, *follow_ups = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<video>\n")
        assert gpt == {"from": "gpt", "value": r["answer"]}
        assert [t["from"] for t in follow_ups] == ["human", "gpt"] * (len(follow_ups) // 2)
        assert follow_ups[-2:] == [{"from": "human", "value": DESCRIBE}, {"from": "gpt", "value": r["caption"]}]
        assert r["answer"] in answer_choices(r["qa_type"])
        assert r["caption"].startswith("The video shows") and (dataset / r["video"]).exists()
    assert Counter(r["qa_type"] for r in records) == {t: 4 for t in QA_TYPES}
    ids = [r["id"] for split in ("train", "val", "test") for r in _records(dataset, split)]
    assert len(ids) == len(set(ids)) == 32


def test_follow_up_turns_ask_about_every_shape_and_none_can_be_copied_from_an_earlier_turn(dataset):
    for r in _records(dataset, "train") + _records(dataset, "test"):
        turns = conversation_turns(r)
        asked = " ".join(q for q, _ in turns[:-1])
        for shape in r["shapes"]:  # every shape is named by some question before the caption
            assert shape["shape"] in asked or shape["color"] in asked, r["id"]
        for i, (_, answer) in enumerate(turns[:-1]):
            earlier = set(" ".join(q + " " + a for q, a in turns[:i]).replace("?", "").split())
            assert answer not in earlier, (r["id"], i)


def _has_color(frame: np.ndarray, color: str) -> bool:
    return bool((np.abs(frame.astype(int) - COLORS[color]).sum(-1) < 60).sum() > 30)


def test_answers_are_true_of_the_decoded_pixels(dataset):
    for split in ("train", "val", "test"):
        for r in _records(dataset, split):
            frame = sample_video(dataset / r["video"], DecodeOptions(num_frames=1)).frames[0]
            present = {c for c in COLORS if _has_color(frame, c)}
            assert present == {s["color"] for s in r["shapes"]}, r["id"]
            if r["qa_type"] == "color":
                assert r["answer"] in present
            if r["qa_type"] == "count":
                assert NUMBER_WORDS.index(r["answer"]) == len(present)


def test_varied_clips_span_frame_sizes_shape_sizes_and_speeds_and_every_shape_stays_mostly_in_view(tmp_path):
    from video_llava.data.synthetic_qa import VARIED_SIZES, center_crop, color_pixels

    main(SyntheticConfig(output=tmp_path, train=24, val=0, test=0, seed=4, varied=True))
    records = _records(tmp_path, "train")
    sizes, speeds, frame_sizes = set(), set(), set()
    for r in records:
        frames = sample_video(tmp_path / r["video"], DecodeOptions(num_frames=16)).frames
        frame_sizes.add((frames.shape[2], frames.shape[1]))
        crop = center_crop(frames)
        for shape in r["shapes"]:
            sizes.add(shape["size"])
            speeds.add(shape["speed"])
            # every shape is in the part the processor keeps in at least 3/4 of the frames
            assert (color_pixels(crop, shape["color"], tolerance=60) >= 30).mean() >= 0.75, r["id"]
        others = set(COLORS) - {s["color"] for s in r["shapes"]}
        assert not any(_has_color(f, c) for f in frames for c in others), r["id"]  # no colour that is not in the answer
    assert frame_sizes == set(VARIED_SIZES)
    assert min(sizes) < 0.18 and max(sizes) > 0.26 and min(speeds) < 0.2 and max(speeds) > 0.45


def test_varied_clips_take_their_frame_sizes_from_the_command_line(tmp_path):
    from jobs.make_synthetic import cli

    assert cli(["--output", str(tmp_path), "--train", "12", "--val", "0", "--test", "0", "--seed", "6", "--varied",
                "--frame-sizes", "320x240,240x320"]) == 0
    shapes = {sample_video(tmp_path / r["video"], DecodeOptions(num_frames=2)).frames.shape[1:3]
              for r in _records(tmp_path, "train")}
    assert shapes == {(240, 320), (320, 240)}  # (height, width): both sizes drawn, no other


@pytest.mark.parametrize("argv, reason", [
    (["--frame-sizes", "320x240"], "--varied"),  # fixed clips have one size; the option would be silently ignored
    (["--varied", "--frame-sizes", "320by240"], "WIDTHxHEIGHT"),
    (["--varied", "--frame-sizes", "8x8"], "32-1920"),
])
def test_bad_frame_sizes_are_refused_with_the_reason(tmp_path, capsys, argv, reason):
    from jobs.make_synthetic import cli

    assert cli(["--output", str(tmp_path), "--train", "1", *argv]) != 0
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "train.jsonl").exists()
