"""Benchmark evaluation: the files MMBench, MMMU, Video-MME and MVBench publish (written here in their shapes), the
option letter read back from an answer as lmms-eval reads it, and jobs.eval's per-category accuracy."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest

from video_llava.data.benchmarks import MC_INSTRUCTION, BenchmarkItem, read_benchmark
from video_llava.data.records import open_image
from video_llava.data.synthetic_video import MovingShape, render_frames, write_video
from video_llava.feedback.choices import choice_figures, extract_letter
from video_llava.feedback.steps import row_media

OPTIONS = ["blue", "red", "green", "yellow"]


@pytest.mark.parametrize("response, letter", [
    ("B", "B"), ("B.", "B"), ("(B) red", "B"), ("The best answer is C", "C"), ("Answer: D. yellow", "D"),
    ("red", "B"), ("Red.", "B"), ("The circle in the video is red and it moves right.", "B"),
    ("I think it is (A), no, (C)", "C"),  # several: the last said, as MMMU's parser
    ("A red circle", "A"), ("a red circle", ""),  # a lone capital counts (an article too), as in lmms-eval
    ("purple", ""), ("", ""), ("E", ""),  # no letter: wrong, never a random pick
])
def test_the_option_letter_is_read_back_as_lmms_eval_reads_it(response, letter):
    assert extract_letter(response, OPTIONS) == letter


def png(width: int, height: int, value: int = 90) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_mmbench_tsv_and_parquet_give_lettered_prompts_with_their_hint_and_embedded_image(tmp_path):
    rows = [{"index": 7, "question": "What colour is the square?", "hint": "Look closely.", "A": "red", "B": "blue",
             "C": "green", "D": "", "answer": "B", "category": "attribute_recognition", "l2-category": "FP-S",
             "split": "dev", "image": base64.b64encode(png(40, 30)).decode()},
            {"index": 8, "question": "这是什么形状？", "hint": "nan", "A": "圆", "B": "方", "C": "nan", "D": "nan",
             "answer": "A", "category": "shape", "l2-category": "FP-S", "split": "dev",
             "image": base64.b64encode(png(20, 20)).decode()}]
    pd.DataFrame(rows).to_csv(tmp_path / "MMBench_DEV.tsv", sep="\t", index=False)
    pd.DataFrame([{**r, "image": {"bytes": base64.b64decode(r["image"]), "path": None}} for r in rows]).to_parquet(
        tmp_path / "mmbench.parquet")
    from_tsv = read_benchmark("mmbench", tmp_path / "MMBench_DEV.tsv")
    assert from_tsv == read_benchmark("mmbench", tmp_path / "mmbench.parquet")
    first, chinese = from_tsv
    assert first.options == ("red", "blue", "green") and first.answer == "B" and first.extra["l2-category"] == "FP-S"
    assert first.prompt() == f"Look closely.\nWhat colour is the square?\nA. red\nB. blue\nC. green\n{MC_INSTRUCTION}"
    assert chinese.options == ("圆", "方") and chinese.hint == ""
    assert open_image(first.images[0]).shape == (30, 40, 3)
    assert [m.shape for m in row_media({"images": [first.to_row()["images"]]}, 0, 4)] == [(30, 40, 3)]


def test_mmmu_parquet_keeps_every_image_in_order_and_tells_multiple_choice_from_open(tmp_path):
    blank = {f"image_{k}": None for k in range(1, 8)}
    pd.DataFrame([
        {**blank, "id": "validation_Art_Theory_1", "question": "Compare <image 1> with <image 2>. Which is brighter?",
         "options": "['the first', 'the second']", "answer": "B", "question_type": "multiple-choice",
         "image_1": {"bytes": png(10, 10, 50), "path": "a.png"}, "image_2": {"bytes": png(12, 8, 200), "path": "b.png"},
         "subfield": "Painting"},
        {**blank, "id": "validation_Math_2", "question": "How many sides has <image 1>?", "options": "[]",
         "answer": "4", "question_type": "open", "image_1": {"bytes": png(10, 10), "path": "c.png"}},
    ]).to_parquet(tmp_path / "validation.parquet")
    mc, open_item = read_benchmark("mmmu", tmp_path / "validation.parquet")
    assert mc.category == "Art_Theory" and mc.format == "mc" and mc.options == ("the first", "the second")
    assert mc.question == "Compare [image 1] with [image 2]. Which is brighter?"
    media = row_media({"images": [mc.to_row()["images"]]}, 0, 4)
    assert [m.shape for m in media] == [(10, 10, 3), (8, 12, 3)] and media[1][0, 0, 0] == 200
    assert open_item.format == "open" and open_item.answer == "4" and open_item.prompt() == "How many sides has [image 1]?"
    assert BenchmarkItem.from_row(open_item.to_row()) == open_item


def test_videomme_and_mvbench_name_their_videos_under_the_media_root(tmp_path):
    pd.DataFrame([{"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity",
                   "url": "https://example.invalid/v", "videoID": "fFjv93ACGo8", "question_id": "001-1",
                   "task_type": "Counting Problem", "question": "How many shapes?",
                   "options": ["A. one", "B. two", "C. three", "D. four"], "answer": "C"}]).to_parquet(tmp_path / "vm.parquet")
    (item,) = read_benchmark("videomme", tmp_path / "vm.parquet", tmp_path / "videos")
    assert item.video == str(tmp_path / "videos" / "fFjv93ACGo8.mp4") and item.options == ("one", "two", "three", "four")
    assert item.category == "Counting Problem" and item.extra["duration"] == "short"
    (tmp_path / "mvbench").mkdir()
    (tmp_path / "mvbench" / "action_sequence.json").write_text(json.dumps([
        {"video": "clip.mp4", "question": "What happened first?", "candidates": ["sat", "stood"], "answer": "stood"}]))
    (item,) = read_benchmark("mvbench", tmp_path / "mvbench", tmp_path / "star")
    assert (item.id, item.category, item.answer, item.video) == (
        "action_sequence/0", "action_sequence", "B", str(tmp_path / "star" / "clip.mp4"))
    (tmp_path / "mvbench" / "bad.json").write_text(json.dumps([
        {"video": "c.mp4", "question": "Q?", "candidates": ["a", "b"], "answer": "c"}]))
    with pytest.raises(ValueError, match="bad.json item 0: its answer 'c' is not one of its candidates"):
        read_benchmark("mvbench", tmp_path / "mvbench")


def test_accuracy_per_category_counts_unread_letters_and_errors_as_wrong():
    def row(item_id: str, category: str, answer: str, said: str, error: str = "") -> dict:
        item = BenchmarkItem(item_id, "Q?", answer, category, "mc", options=tuple(OPTIONS))
        return {**item.to_row(), "candidates": [said] if not error else [], "error": error}

    figures = choice_figures([row("1", "colour", "B", "red"), row("2", "colour", "A", "B"), row("3", "count", "C", "C"),
                              row("4", "count", "D", "purple"), row("5", "count", "D", "", error="sample: broken")])
    assert figures["all"]["n"] == 5 and figures["all"]["accuracy"] == 0.4
    assert figures["colour"] | {"accuracy_interval": None} == {"n": 2, "accuracy": 0.5, "accuracy_interval": None,
                                                                "unparsed": 0, "errors": 0}
    assert (figures["count"]["unparsed"], figures["count"]["errors"]) == (1, 1)
    low, high = figures["all"]["accuracy_interval"]
    assert low < 0.4 < high


@pytest.mark.slow
def test_eval_scores_a_videomme_file_per_category_on_real_videos(tmp_path, embedded_cache):
    from tests.test_preferences_dpo import run_job

    shapes = {"red": MovingShape("circle", "red", "right"), "blue": MovingShape("square", "blue", "down")}
    (tmp_path / "videos").mkdir()
    rows = []
    for k, (color, shape) in enumerate(shapes.items()):
        write_video(tmp_path / "videos" / f"v{k}.mp4", render_frames([shape], num_frames=8, width=96, height=72))
        rows += [{"videoID": f"v{k}", "question_id": f"v{k}-colour", "task_type": "Attribute Perception",
                  "duration": "short", "question": f"What color is the {shape.shape}?",
                  "options": [f"{letter}. {c}" for letter, c in zip("ABCD", ["blue", "red", "green", "yellow"])],
                  "answer": "ABCD"[["blue", "red", "green", "yellow"].index(color)]},
                 {"videoID": f"v{k}", "question_id": f"v{k}-shape", "task_type": "Object Recognition",
                  "duration": "short", "question": f"What shape is the {color} object?",
                  "options": ["A. circle", "B. square", "C. triangle"], "answer": "AB"[k]}]
    rows.append({**rows[0], "question_id": "missing", "videoID": "gone"})  # a video not there: an error, counted
    pd.DataFrame(rows).to_parquet(tmp_path / "videomme.parquet")
    out = tmp_path / "eval.json"
    result = run_job("jobs.eval", "--benchmark", "videomme", "--bench-file", str(tmp_path / "videomme.parquet"),
                     "--media-root", str(tmp_path / "videos"), "--frames", "4", "--json-out", str(out),
                     cache=embedded_cache)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["task"] == "videomme-mc" and figures["all"]["n"] == 5 and figures["all"]["errors"] == 1
    assert figures["Object Recognition"]["n"] == 2 and figures["Attribute Perception"]["n"] == 3
    assert "Attribute Perception" in result.stdout and "95% interval" in result.stdout
    answers = {a["id"]: a for a in json.loads(out.read_text())["answers"]}
    assert answers["missing"]["error"] and answers["missing"]["right"] is False
    for a in answers.values():
        if not a["error"]:
            options = [line[3:] for line in a["question"].splitlines() if line[1:3] == ". "]
            assert a["said"] == extract_letter(a["candidates"][0], options) and a["right"] == (a["said"] == a["reference"])
    right = sum(a["right"] for a in answers.values())
    assert figures["all"]["accuracy"] == round(right / 5, 4)
