"""LLaVA's data files as released: JSON arrays and JSONL, every record shape the LLaVA family trains on, and bad
records reported by index and reason, skipped or fatal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from video_llava.data.records import media_path
from video_llava.data.record_files import (
    BadRecordsError,
    Medium,
    Message,
    TrainingRecord,
    load_training_records,
    raw_records,
)


def turns(*values: str) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


# One record of each shape, as the released files write them.
LLAVA_15 = {"id": "000000033471", "image": "coco/1.jpg", "conversations": turns("What is on the bus?\n<image>", "Ads.")}
SHAREGPT = {"id": "sharegpt-1", "conversations": [{"from": "system", "value": "Be brief."},
                                                  *turns("Hello?", "Hi.", "Bye?", "Bye.")]}
ONEVISION = {"id": "ov-1", "image": ["a.png", "b.png"],
             "conversations": turns("Image 1: <image>\nImage 2: <image>\nWhat differs?", "The colour.")}
LLAVA_VIDEO = {"id": "lv-1", "video": "clips/v.mp4", "conversations": turns("<image>\nWhat happens?", "A ball rolls.")}
NO_PLACEHOLDER = {"id": "np", "image": "coco/1.jpg", "conversations": turns("What is this?", "A bus.", "Colour?")}


@pytest.fixture
def media(tmp_path) -> Path:
    for name in ("coco/1.jpg", "a.png", "b.png", "clips/v.mp4"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")  # existence is what the driver checks; decoding happens on the workers
    return tmp_path


def write(path: Path, records: list) -> str:
    if path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_json_arrays_and_jsonl_give_the_same_records_of_every_shape(media):
    shapes = [LLAVA_15, SHAREGPT, ONEVISION, LLAVA_VIDEO, NO_PLACEHOLDER]
    from_json = load_training_records(write(media / "r.json", shapes), str(media))
    from_jsonl = load_training_records(write(media / "r.jsonl", shapes), str(media))
    assert from_json == from_jsonl and [r.index for r in from_json] == [0, 1, 2, 3, 4]
    llava, sharegpt, onevision, video, prepended = from_json
    assert llava.media == (Medium("image", str(media / "coco/1.jpg")),)
    assert llava.exchanges() == [("<image>\nWhat is on the bus?", "Ads.")]  # a lone placeholder first, as LLaVA's
    assert sharegpt.media == () and sharegpt.system == "Be brief."
    assert sharegpt.exchanges() == [("Hello?", "Hi."), ("Bye?", "Bye.")]
    assert [m.uri for m in onevision.media] == [str(media / "a.png"), str(media / "b.png")]
    assert onevision.exchanges()[0][0] == "Image 1: <image>\nImage 2: <image>\nWhat differs?"  # kept in place
    assert video.media == (Medium("video", str(media / "clips/v.mp4")),)
    assert video.exchanges()[0][0] == "<video>\nWhat happens?"  # LLaVA-Video writes <image> for its video
    assert prepended.exchanges() == [("<image>\nWhat is this?", "A bus.")]  # the unanswered last question dropped
    assert TrainingRecord.from_row(json.loads(json.dumps(video.to_row()))) == video


def test_media_paths_are_under_the_media_root_a_directory_or_an_s3_prefix():
    assert media_path("v/1.mp4", "s3://bucket/llava/") == "s3://bucket/llava/v/1.mp4"
    assert media_path("v/1.mp4", "/data") == "/data/v/1.mp4"
    assert media_path("/abs/1.mp4", "s3://bucket") == "/abs/1.mp4"
    assert media_path("s3://other/1.mp4", "/data") == "s3://other/1.mp4"


def test_media_under_an_s3_root_are_not_looked_up_on_the_driver(tmp_path):
    """(Listing a bucket of 665k images would take longer than the run's first steps: workers report them.)"""
    records = load_training_records(write(tmp_path / "r.jsonl", [LLAVA_VIDEO]), "s3://bucket/llava")
    assert records[0].media == (Medium("video", "s3://bucket/llava/clips/v.mp4"),)


BAD = [
    ("[1, 2]", "not a record object"),
    ({"id": "b1", "image": "coco/1.jpg", "video": "clips/v.mp4", "conversations": turns("<image>\nQ", "A")},
     "has both 'image' and 'video'"),
    ({"id": "b2", "conversations": []}, "no 'conversations' list"),
    ({"id": "b3", "conversations": [{"from": "robot", "value": "Q"}]}, "turn 0 is not"),
    ({"id": "b4", "conversations": turns("Q")}, "at least one answer"),
    ({"id": "b5", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]}, "must alternate"),
    ({"id": "b6", "image": ["a.png", "b.png"], "conversations": turns("<image>\nQ", "A")}, "1 placeholder(s) for 2 image(s)"),
    ({"id": "b7", "conversations": turns("<image>\nQ", "A")}, "placeholders name media it does not have"),
    ({"id": "b8", "image": "gone.jpg", "conversations": turns("<image>\nQ", "A")}, "gone.jpg not found"),
    ({"id": "b9", "image": "a.png", "conversations": turns("<video>\nQ", "A")}, "placeholders name media"),
    ({"id": "b10", "image": 7, "conversations": turns("<image>\nQ", "A")}, "'image' must be a path"),
    ({"id": "b11", "conversations": turns("Q", "<image> A")}, "assistant turn holds a media placeholder"),
    ('{"id": "b12", "conversations": [', "not JSON"),
]


def test_each_bad_record_is_reported_with_its_index_and_reason_and_skip_trains_on_the_others(media, capsys):
    lines = [LLAVA_15] + [r if isinstance(r, dict) else r for r, _ in BAD] + [SHAREGPT]
    path = write(media / "r.jsonl", lines)
    report = media / "out" / "bad_records.jsonl"
    good = load_training_records(path, str(media), "skip", report=report)
    assert [r.id for r in good] == ["000000033471", "sharegpt-1"] and [r.index for r in good] == [0, len(BAD) + 1]
    listed = [json.loads(line) for line in report.read_text().splitlines()]
    assert [b["index"] for b in listed] == list(range(1, len(BAD) + 1))
    for bad, (_, reason) in zip(listed, BAD):
        assert reason in bad["reason"], (bad, reason)
    printed = capsys.readouterr().err
    assert "skipped record 2 (id 'b1'): has both 'image' and 'video'" in printed
    assert printed.count("skipped record") == len(BAD)


def test_fail_stops_before_training_naming_every_bad_record(media):
    path = write(media / "r.json", [LLAVA_15, BAD[1][0], BAD[8][0]])
    with pytest.raises(BadRecordsError) as raised:
        load_training_records(path, str(media), "fail")
    message = str(raised.value)
    assert message.startswith(f"2 bad record(s) in {path}:")
    assert "record 1 (id 'b1'): has both" in message and "record 2 (id 'b8'): image" in message
    assert "--on-bad-record skip" in message


def test_a_file_that_is_not_records_fails_whole_with_what_it_is(tmp_path):
    (tmp_path / "obj.json").write_text('{"data": []}')
    with pytest.raises(ValueError, match="a JSON dict, not an array of records"):
        list(raw_records(str(tmp_path / "obj.json")))
    (tmp_path / "r.csv").write_text("id\n")
    with pytest.raises(ValueError, match=r"\.json \(an array\) or \.jsonl"):
        list(raw_records(str(tmp_path / "r.csv")))
    with pytest.raises(ValueError, match="no record of .* can be trained on \\(1 bad\\)"):
        load_training_records(write(tmp_path / "r.jsonl", [BAD[2][0]]), str(tmp_path), "skip")


def test_a_records_file_and_its_media_may_live_in_s3(tmp_path, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    from video_llava.ray_runtime import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket="llava")
        boto3.client("s3").put_object(Bucket="llava", Key="sets/mix.json", Body=json.dumps([LLAVA_15, SHAREGPT]))
        records = load_training_records("s3://llava/sets/mix.json", "s3://llava/media")
    finally:
        server.stop()
    assert records[0].media == (Medium("image", "s3://llava/media/coco/1.jpg"),)
    assert records[1].messages[0] == Message("system", "Be brief.")
