"""LLaVA's training files as released: a ``.json`` array (``llava_v1_5_mix665k.json``, LLaVA-Video-178K,
OneVision's sets) or ``.jsonl``, local or ``s3://``, each record checked into a ``TrainingRecord`` or reported as a
``BadRecord`` (its index in the file and the reason), skipped or fatal as the user chose (``--on-bad-record``).

The shapes read: ``image`` as one path or a list (OneVision: one ``<image>`` placeholder per image, anywhere in the
human turns), ``video`` as one path (its placeholder written ``<video>`` or, as LLaVA-Video's files do, ``<image>``),
neither for a text-only (ShareGPT) record; ``conversations`` alternating ``human``/``gpt`` turns (``user``/
``assistant`` also read), an optional leading ``system`` turn. A record with media and no placeholder gets them at
the start of its first human turn, and a turn's lone placeholder moves to its start (LLaVA's trainers do both); a
human turn left without an answer at the end is dropped.
Media paths are relative to the media root (a directory or an ``s3://`` prefix); absolute paths and URIs are kept.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from video_llava.data.records import media_path

OnBadRecord = Literal["skip", "fail"]
MediaKind = Literal["image", "video"]
Role = Literal["system", "user", "assistant"]

PLACEHOLDERS = {"image": "<image>", "video": "<video>"}
ROLES: dict[str, Role] = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                          "system": "system"}
REPORTED = 20  # bad records printed one by one; the rest are counted (all of them are in the report file)


@dataclass(frozen=True)
class Medium:
    kind: MediaKind
    uri: str  # an absolute path or a URI


@dataclass(frozen=True)
class Message:
    """One turn; a user turn's text holds one ``<image>``/``<video>`` placeholder per medium it carries, in place."""

    role: Role
    text: str


@dataclass(frozen=True)
class TrainingRecord:
    """One checked record: its index in the file, its id, its media in placeholder order, and its turns (an optional
    system turn, then user/assistant pairs)."""

    index: int
    id: str
    media: tuple[Medium, ...]
    messages: tuple[Message, ...]

    def to_row(self) -> dict[str, Any]:
        """The Ray Data row: one string column holds the record, so records of any shape share a schema."""
        return {"id": self.id, "index": self.index, "record": json.dumps(asdict(self))}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "TrainingRecord":
        data = json.loads(row["record"])
        return cls(data["index"], data["id"], tuple(Medium(**m) for m in data["media"]),
                   tuple(Message(**m) for m in data["messages"]))

    def exchanges(self) -> list[tuple[str, str]]:
        """(user text, assistant text) pairs in order."""
        turns = [m for m in self.messages if m.role != "system"]
        return [(q.text, a.text) for q, a in zip(turns[::2], turns[1::2])]

    @property
    def system(self) -> str | None:
        return next((m.text for m in self.messages if m.role == "system"), None)


@dataclass(frozen=True)
class BadRecord:
    index: int  # the record's position in the file, from 0 (JSONL: its non-blank line's)
    id: str
    reason: str

    def describe(self) -> str:
        return f"record {self.index}" + (f" (id {self.id!r})" if self.id else "") + f": {self.reason}"


class BadRecordError(ValueError):
    """One record that cannot be trained on, and why."""


class BadRecordsError(ValueError):
    """``--on-bad-record fail`` and the file has bad records: the first ones named, all of them counted."""

    def __init__(self, source: str, bad: list[BadRecord]):
        self.bad = bad
        shown = "\n".join(f"  {b.describe()}" for b in bad[:REPORTED])
        more = f"\n  ... and {len(bad) - REPORTED} more" if len(bad) > REPORTED else ""
        super().__init__(f"{len(bad)} bad record(s) in {source}:\n{shown}{more}\n"
                         "fix them, or pass --on-bad-record skip to train on the others")


def read_text(uri: str) -> str:
    """A local file's or an ``s3://`` object's text."""
    if uri.startswith("s3://"):
        from video_llava.data.records import read_s3_uri

        return read_s3_uri(uri).decode("utf-8")
    return Path(uri).read_text(encoding="utf-8")


def raw_records(uri: str) -> Iterator[tuple[int, Any]]:
    """(index, record or the ``BadRecordError`` of a line that is not JSON) of a ``.json`` array or a ``.jsonl``
    file. A ``.json`` file that is not an array of records fails whole (there is no record to skip)."""
    text = read_text(uri)
    if uri.endswith(".json"):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri} is not JSON ({e}); LLaVA's files are one array of records") from None
        if not isinstance(records, list):
            raise ValueError(f"{uri} holds a JSON {type(records).__name__}, not an array of records")
        yield from enumerate(records)
        return
    if not uri.endswith(".jsonl"):
        raise ValueError(f"{uri}: records are read from .json (an array) or .jsonl (one per line) files")
    lines = (line for line in text.splitlines() if line.strip())
    for index, line in enumerate(lines):
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as e:
            yield index, BadRecordError(f"not JSON ({e.msg} at column {e.colno})")


def _media(raw: dict, root: str) -> tuple[Medium, ...]:
    images, video = raw.get("image"), raw.get("video")
    if images and video:
        raise BadRecordError("has both 'image' and 'video' (one kind of medium per record)")
    if video:
        if not isinstance(video, str):
            raise BadRecordError(f"'video' must be one path, got {type(video).__name__}")
        return (Medium("video", media_path(video, root)),)
    if not images:
        return ()
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise BadRecordError("'image' must be a path or a list of paths")
    return tuple(Medium("image", media_path(i, root)) for i in images)


def _messages(raw: dict, media: tuple[Medium, ...]) -> tuple[Message, ...]:
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecordError("no 'conversations' list")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise BadRecordError(f"turn {k} is not {{'from': human|gpt|system, 'value': text}}")
        messages.append(Message(ROLES[turn["from"]], turn["value"]))
    system = messages[:1] if messages[0].role == "system" else []
    rest = messages[len(system):]
    if rest and rest[-1].role == "user":
        rest = rest[:-1]  # a question left without an answer teaches nothing
    if not rest or [m.role for m in rest] != ["user", "assistant"] * (len(rest) // 2):
        raise BadRecordError("turns must alternate human, gpt (after an optional system turn), with at least one answer")
    kind = media[0].kind if media else None
    placed = []
    for m in rest:
        text = m.text
        if m.role == "user" and kind == "video":
            text = text.replace(PLACEHOLDERS["image"], PLACEHOLDERS["video"])  # LLaVA-Video writes <image> for a video
        elif m.role != "user" and any(p in text for p in PLACEHOLDERS.values()):
            raise BadRecordError(f"a {m.role} turn holds a media placeholder")
        placed.append(Message(m.role, _lone_placeholder_first(text) if m.role == "user" else text))
    count = sum(m.text.count(p) for m in placed for p in PLACEHOLDERS.values() if m.role == "user")
    wrong_kind = kind and sum(m.text.count(p) for m in placed for k, p in PLACEHOLDERS.items() if k != kind)
    if wrong_kind or (kind is None and count):
        raise BadRecordError(f"its placeholders name media it does not have ({count} placeholder(s), "
                             f"{len(media)} {kind or 'media'})")
    if count == 0 and media:
        first = placed[0]
        placed[0] = Message("user", "".join(f"{PLACEHOLDERS[m.kind]}\n" for m in media) + first.text)
    elif count != len(media):
        raise BadRecordError(f"{count} placeholder(s) for {len(media)} {kind}(s)")
    return (*system, *placed)


def _lone_placeholder_first(text: str) -> str:
    """A turn's lone placeholder moved to its start, as LLaVA's and LLaVA-NeXT's trainers do (``preprocess_multimodal``:
    the pretraining captions write ``...\n<image>``); several stay where they are (interleaved, OneVision)."""
    for placeholder in PLACEHOLDERS.values():
        if text.count(placeholder) == 1 and sum(text.count(p) for p in PLACEHOLDERS.values()) == 1 and (
                not text.startswith(placeholder)):
            return f"{placeholder}\n" + text.replace(placeholder, "").strip()
    return text


def parse_record(raw: Any, index: int, media_root: str) -> TrainingRecord:
    """One raw record checked (``BadRecordError`` says why not); local media must exist."""
    if isinstance(raw, BadRecordError):
        raise raw
    if not isinstance(raw, dict):
        raise BadRecordError(f"a JSON {type(raw).__name__}, not a record object")
    media = _media(raw, media_root)
    messages = _messages(raw, media)
    for medium in media:
        if "://" not in medium.uri and not Path(medium.uri).is_file():
            raise BadRecordError(f"{medium.kind} {medium.uri} not found")
    return TrainingRecord(index, str(raw.get("id", f"#{index}")), media, messages)


def load_training_records(uri: str, media_root: str, on_bad: OnBadRecord = "fail",
                          report: Path | None = None) -> list[TrainingRecord]:
    """Every good record of ``uri``. Bad ones are written to ``report`` (JSONL: index, id, reason), the first
    ``REPORTED`` printed to stderr; under ``fail`` any bad record raises ``BadRecordsError`` after all were checked."""
    good, bad = [], []
    for index, raw in raw_records(uri):
        try:
            good.append(parse_record(raw, index, media_root))
        except BadRecordError as e:
            bad.append(BadRecord(index, str(raw.get("id", "")) if isinstance(raw, dict) else "", str(e)))
    if report is not None and bad:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("".join(json.dumps(asdict(b)) + "\n" for b in bad))
    if bad and on_bad == "fail":
        raise BadRecordsError(uri, bad)
    for b in bad[:REPORTED]:
        print(f"skipped {b.describe()}", file=sys.stderr)
    if len(bad) > REPORTED:
        print(f"skipped {len(bad) - REPORTED} more bad record(s)" + (f"; all listed in {report}" if report else ""),
              file=sys.stderr)
    if not good:
        raise ValueError(f"no record of {uri} can be trained on ({len(bad)} bad)")
    return good
