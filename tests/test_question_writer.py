"""The captions-to-DPO hops before the model: caption rows into records (jobs.make_records) and questions written
from each caption by an OpenAI-compatible LLM (feedback.questions, jobs.make_questions), with their failure paths."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.fake_chat import fake_chat_endpoint
from video_llava.feedback.endpoint import EndpointError
from video_llava.feedback.questions import QuestionWriter, parse_questions

CAPTION = "A red circle moves right while a blue square moves down."


SENT: list[dict] = []  # what the fake question writer received


def _questions_reply(body: dict) -> str:
    """Three questions (the writer keeps --questions of them); prose for a caption that says 'prose'."""
    if "prose" in body["messages"][-1]["content"]:
        return "Sure! Here are some questions about the video."
    return json.dumps({"questions": [{"question": "What color is the circle?", "answer": "red"},
                                     {"question": "Which way does the square move?", "answer": "down"},
                                     {"question": "How many shapes?", "answer": "two"}]})


@pytest.fixture
def fake_writer():
    with fake_chat_endpoint(_questions_reply, SENT) as url:
        yield url


def test_a_writers_reply_is_read_as_json_even_inside_prose_and_anything_else_is_an_error():
    reply = 'Here you go: {"questions": [{"question": "Q1?", "answer": "A1"}, {"question": "", "answer": "x"}]} Done.'
    assert parse_questions(reply, 3) == [("Q1?", "A1")]  # a question without text is dropped
    assert len(parse_questions(json.dumps({"questions": [{"question": f"Q{k}", "answer": "a"} for k in range(5)]}), 2)) == 2
    for bad in ('{"questions": [{"question": "Q1?", "answer": "A', "no json", '{"questions": []}', '{"q": 1}'):
        with pytest.raises(EndpointError, match="question writer's reply"):
            parse_questions(bad, 3)


def test_each_caption_becomes_question_records_under_its_media_placeholder(fake_writer):
    writer = QuestionWriter(fake_writer, "writer", "OPENAI_API_KEY", count=2)
    rows = writer({"id": "clips/v0.mp4", "video": "/data/clips/v0.mp4", "caption": CAPTION})
    assert [r["id"] for r in rows] == ["clips/v0.mp4/q0", "clips/v0.mp4/q1"] and not any(r["error"] for r in rows)
    assert json.loads(rows[1]["conversations"]) == [{"from": "human", "value": "<video>\nWhich way does the square move?"},
                                                    {"from": "gpt", "value": "down"}]
    assert rows[0]["caption"] == CAPTION and rows[0]["source"] == "clips/v0.mp4"
    sent = SENT[-1]
    assert CAPTION in sent["messages"][-1]["content"] and sent["temperature"] == 0.0
    assert sent["response_format"]["json_schema"]["schema"]["properties"]["questions"]["maxItems"] == 2
    image = writer({"id": "i", "image": "/data/i.png", "caption": CAPTION})
    assert json.loads(image[0]["conversations"])[0]["value"].startswith("<image>\n")


def test_a_record_that_gets_no_questions_is_one_error_row_with_the_reason(fake_writer):
    from video_llava.ray_runtime import free_port

    writer = QuestionWriter(fake_writer, "writer", "OPENAI_API_KEY", count=2)
    (prose,) = writer({"id": "p", "video": "/v.mp4", "caption": "prose only"})
    assert prose["id"] == "p" and "not the JSON asked for" in prose["error"]
    (empty,) = writer({"id": "e", "video": "/v.mp4", "caption": " "})
    assert "no caption" in empty["error"]
    down = QuestionWriter(f"http://127.0.0.1:{free_port()}/v1", "writer", "OPENAI_API_KEY", count=2, timeout_s=2)
    down.client = down.client.with_options(max_retries=0)
    (failed,) = down({"id": "d", "video": "/v.mp4", "caption": CAPTION})
    assert failed["error"].startswith("question writer failed: APIConnectionError")


def write_caption_output(root: Path, input_dir: str) -> None:
    """A jobs.caption output as it writes one: Parquet shards (one row per object, an error among them, a repeated
    object whose newer ok row wins) and its manifest."""
    (root / "shards").mkdir(parents=True)
    rows = [("clips/a.mp4", "e1", "ok", "A red circle.", 1.0), ("clips/b.mp4", "e2", "error", "", 1.0),
            ("c.png", "e3", "ok", "A blue square.", 1.0), ("clips/d.mp4", "e4", "error", "", 1.0),
            ("clips/d.mp4", "e4", "ok", "A green triangle.", 2.0)]
    table = pa.table({"key": [r[0] for r in rows], "etag": [r[1] for r in rows], "status": [r[2] for r in rows],
                      "caption": [r[3] for r in rows], "captioned_at": [r[4] for r in rows]})
    pq.write_table(table, root / "shards" / "0.parquet")
    (root / "_manifest.json").write_text(json.dumps({"input": input_dir}))


def test_caption_rows_become_records_split_by_their_key_and_errors_are_counted(tmp_path, capsys):
    from jobs.make_records import cli

    write_caption_output(tmp_path / "captions", "/data/bucket")
    argv = ["--captions", str(tmp_path / "captions"), "--output", str(tmp_path / "records"), "--val-fraction", "0.5"]
    assert cli(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["rows"], summary["records"], summary["left_out"]) == (4, 3, 1)
    records = {r["id"]: r for split in ("train", "val")
               for r in map(json.loads, (tmp_path / "records" / f"{split}.jsonl").read_text().splitlines())}
    assert set(records) == {"clips/a.mp4", "c.png", "clips/d.mp4"}
    assert records["clips/d.mp4"]["video"] == "/data/bucket/clips/d.mp4" and records["c.png"]["image"] == "/data/bucket/c.png"
    assert records["clips/d.mp4"]["conversations"] == [
        {"from": "human", "value": "<video>\nDescribe the video in detail."}, {"from": "gpt", "value": "A green triangle."}]
    first = (tmp_path / "records" / "val.jsonl").read_text()
    assert cli(argv) == 2 and "--overwrite" in capsys.readouterr().err  # nothing replaced by accident
    assert cli(argv + ["--overwrite"]) == 0 and (tmp_path / "records" / "val.jsonl").read_text() == first  # stable
    assert cli(["--captions", str(tmp_path / "none"), "--output", str(tmp_path / "r2")]) == 2
    assert "no _manifest.json" in capsys.readouterr().err


def test_make_questions_refuses_before_any_work_without_records_or_a_key(tmp_path, capsys, monkeypatch):
    from jobs.make_questions import cli

    argv = ["--data", str(tmp_path), "--output", str(tmp_path / "qa"), "--llm-url", "http://127.0.0.1:9/v1"]
    assert cli(argv) == 2 and "no train.jsonl, val.jsonl in" in capsys.readouterr().err
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert cli(argv) == 2 and "$OPENAI_API_KEY, which is not set" in capsys.readouterr().err
    assert not (tmp_path / "qa").exists()
