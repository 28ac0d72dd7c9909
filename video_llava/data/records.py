"""LLaVA-style records (``id``, ``video`` or ``image``, ``conversations``, ``caption``): reading them, their turns,
the flat rows the Ray Data steps use, and their media as frames."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def load_records(path: str | Path) -> list[dict]:
    """LLaVA-style records of a ``.jsonl`` file (``id``, ``video``, ``conversations``)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def conversation_turns(record: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs of a record's conversation in order: each human turn (media placeholders removed)
    with the gpt turn that follows it. A human turn with no answer after it is dropped."""
    turns, question = [], None
    for turn in record["conversations"]:
        if turn["from"] == "human":
            question = turn["value"].replace("<video>", "").replace("<image>", "").strip()
        elif turn["from"] == "gpt" and question is not None:
            turns.append((question, turn["value"].strip()))
            question = None
    if not turns:
        raise ValueError(f"record {record.get('id')!r} has no human turn followed by a gpt answer")
    return turns


def question_answer(record: dict) -> tuple[str, str]:
    """The first human turn (without its ``<video>``/``<image>`` placeholder) and the gpt answer that follows it."""
    return conversation_turns(record)[0]


def media_path(value: Any, root: Path | str) -> str:
    """A record's ``video``/``image`` as an absolute path or URI: relative ones are under ``root`` (a directory or
    an ``s3://`` prefix); absolute paths and URIs are kept."""
    if not value:
        return ""
    value = str(value)
    if "://" in value or Path(value).is_absolute():
        return value
    if "://" in str(root):
        return str(root).rstrip("/") + "/" + value.lstrip("/")
    return str((Path(root) / value).resolve())


def flatten_record(record: dict[str, Any], root: Path) -> dict[str, Any]:
    """One LLaVA-style record as the flat row the steps use: id, media (absolute paths; relative ones are under
    ``root``; ``s3://`` URIs are kept), question, reference answer, caption, qa_type."""
    question, reference = question_answer(record)
    return {
        "id": str(record["id"]),
        "video": media_path(record.get("video"), root),
        "image": media_path(record.get("image"), root),
        "question": question,
        "reference": reference,
        "caption": str(record.get("caption") or ""),
        "qa_type": str(record.get("qa_type") or ""),
    }


def read_s3_uri(uri: str) -> bytes:
    """An ``s3://bucket/key`` object's bytes (credentials and ``AWS_ENDPOINT_URL`` the usual boto3 way)."""
    from urllib.parse import urlsplit

    from video_llava.data.storage import s3_client

    parts = urlsplit(uri)
    return s3_client().get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))["Body"].read()


def load_media(video: str, image: str, num_frames: int) -> np.ndarray:
    """Frames ``(N, H, W, 3)`` of a row's video, or its image as one frame; local paths, ``s3://`` or ``data:``
    URIs."""
    from video_llava.video.decode import DecodeOptions, sample_video

    if video:
        source = read_s3_uri(video) if video.startswith("s3://") else video
        return sample_video(source, DecodeOptions(num_frames=num_frames)).frames
    return open_image(image)[None]


def open_image(uri: str) -> np.ndarray:
    """An image ``(H, W, 3)`` from a path, an ``s3://`` URI or a ``data:...;base64,`` URI (benchmarks that embed
    their images: ``data.benchmarks``)."""
    import base64
    import io

    from PIL import Image

    if uri.startswith("data:"):
        source = io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))
    else:
        source = io.BytesIO(read_s3_uri(uri)) if uri.startswith("s3://") else uri
    with Image.open(source) as img:
        return np.asarray(img.convert("RGB"))
