"""Published benchmarks' files as ``BenchmarkItem``s: MMBench (and MMBench-CN), MMMU, Video-MME and MVBench, read
from local files in the shapes their authors publish, so a fine-tune is scored as the published numbers are.

- ``mmbench``: the official ``.tsv`` (``index, question, hint, A..E, answer, category, image`` as base64) or the
  Parquet of the hub's copy (``image`` as ``{bytes, path}``); one image per question.
- ``mmmu``: the hub's Parquet per subject (``id, question, options`` as a Python-literal list, ``image_1..image_7``,
  ``answer``, ``question_type`` multiple-choice or open); ``<image k>`` in the text names the k-th image.
- ``videomme``: the hub's Parquet (``videoID, question_id, task_type, duration, question, options`` as ``A. ...``
  strings, ``answer``); videos are ``<media-root>/<videoID>.mp4``.
- ``mvbench``: a task's JSON (``[{video, question, candidates, answer}]``, the answer the right candidate's text),
  or a directory of them (each task a category); videos under ``--media-root``.

A multiple-choice item's prompt lists its options with letters and asks for the letter, as LLaVA's evaluation
scripts do; the letter is read back from the answer by ``feedback.choices``.
"""

from __future__ import annotations

import ast
import base64
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

BenchmarkName = Literal["mmbench", "mmmu", "videomme", "mvbench"]
Format = Literal["mc", "open"]

LETTERS = "ABCDEFGHIJ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."  # LLaVA's eval scripts' suffix


@dataclass(frozen=True)
class BenchmarkItem:
    """One question of a benchmark: its options (multiple choice) and the right letter, or an open answer."""

    id: str
    question: str
    answer: str  # the right option's letter (mc) or the reference answer (open)
    category: str
    format: Format
    options: tuple[str, ...] = ()
    images: tuple[str, ...] = ()  # paths or data: URIs, in the order the question names them
    video: str = ""
    hint: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # what the file says besides (duration, split, ...)

    def prompt(self) -> str:
        """The question as asked: hint, question, lettered options and the instruction (mc); the question (open)."""
        text = "\n".join(part for part in (self.hint, self.question) if part)
        if self.format == "open":
            return text
        return "\n".join([text, *(f"{LETTERS[k]}. {option}" for k, option in enumerate(self.options)), MC_INSTRUCTION])

    def to_row(self) -> dict[str, Any]:
        """The eval pipeline's row: ``AnswerSampler``'s columns, the item whole in ``item`` (one string column, so
        items of any shape share a schema)."""
        return {"id": self.id, "video": self.video, "image": "", "images": json.dumps(list(self.images)),
                "question": self.prompt(), "reference": self.answer, "caption": "", "qa_type": self.category,
                "item": json.dumps(asdict(self))}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "BenchmarkItem":
        data = json.loads(row["item"])
        return cls(**{**data, "options": tuple(data["options"]), "images": tuple(data["images"])})


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


def image_uri(value: Any, media_root: Path | None) -> str:
    """An image cell as a path or a ``data:`` URI: base64 text (MMBench's TSV: any text not named like an image
    file), ``{bytes, path}`` (the hub's Parquet), or a path (under ``media_root`` when relative)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return "data:image;base64," + base64.b64encode(value["bytes"]).decode()
        value = value.get("path") or ""
    if isinstance(value, (bytes, bytearray)):
        return "data:image;base64," + base64.b64encode(value).decode()
    value = str(value or "")
    if not value:
        return ""
    if not value.lower().endswith(IMAGE_SUFFIXES):
        return "data:image;base64," + value
    return value if "://" in value or Path(value).is_absolute() or media_root is None else str(media_root / value)


def _table(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    if path.suffix == ".tsv":
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    elif path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        raise ValueError(f"{path}: expected the .tsv or .parquet the benchmark publishes")
    return frame.to_dict("records")


def _present(value: Any) -> bool:
    return value is not None and str(value).strip() not in ("", "nan", "None")


def read_mmbench(path: Path, media_root: Path | None = None) -> list[BenchmarkItem]:
    items = []
    for row in _table(path):
        options = [str(row[letter]) for letter in LETTERS[:5] if letter in row and _present(row[letter])]
        items.append(BenchmarkItem(
            id=str(row["index"]), question=str(row["question"]), answer=str(row.get("answer", "")).strip(),
            category=str(row.get("category") or "all"), format="mc", options=tuple(options),
            images=(image_uri(row["image"], media_root),), hint=str(row["hint"]) if _present(row.get("hint")) else "",
            extra={k: str(row[k]) for k in ("l2-category", "split", "source") if _present(row.get(k))}))
    return items


def read_mmmu(path: Path, media_root: Path | None = None) -> list[BenchmarkItem]:
    items = []
    for row in _table(path):
        images = [image_uri(row[f"image_{k}"], media_root) for k in range(1, 8) if _present(row.get(f"image_{k}"))]
        question = str(row["question"])
        for k in range(1, 8):
            question = question.replace(f"<image {k}>", f"[image {k}]")  # the images go first, in order
        is_mc = str(row.get("question_type", "multiple-choice")) == "multiple-choice"
        options = row.get("options")
        options = ast.literal_eval(options) if isinstance(options, str) else list(options if options is not None else [])
        subject = str(row["id"]).split("_")[1:-1]  # validation_Art_Theory_12 -> Art_Theory
        items.append(BenchmarkItem(
            id=str(row["id"]), question=question, answer=str(row["answer"]).strip(),
            category="_".join(subject) or "all", format="mc" if is_mc else "open",
            options=tuple(str(o) for o in options) if is_mc else (), images=tuple(images),
            extra={k: str(row[k]) for k in ("subfield", "topic_difficulty", "img_type") if _present(row.get(k))}))
    return items


def read_videomme(path: Path, media_root: Path | None = None) -> list[BenchmarkItem]:
    items = []
    root = media_root or path.parent
    for row in _table(path):
        options = [str(o) for o in row["options"]]
        options = [o[3:] if len(o) > 2 and o[0] in LETTERS and o[1:3] == ". " else o for o in options]  # "A. x" -> x
        items.append(BenchmarkItem(
            id=str(row["question_id"]), question=str(row["question"]), answer=str(row["answer"]).strip(),
            category=str(row.get("task_type") or "all"), format="mc", options=tuple(options),
            video=str(root / f"{row['videoID']}.mp4"),
            extra={k: str(row[k]) for k in ("duration", "domain", "sub_category") if _present(row.get(k))}))
    return items


def read_mvbench(path: Path, media_root: Path | None = None) -> list[BenchmarkItem]:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    root = media_root or (path if path.is_dir() else path.parent)
    items = []
    for file in files:
        for k, row in enumerate(json.loads(file.read_text())):
            candidates = [str(c) for c in row["candidates"]]
            if str(row["answer"]) not in candidates:
                raise ValueError(f"{file} item {k}: its answer {row['answer']!r} is not one of its candidates")
            video = str(row["video"])
            items.append(BenchmarkItem(
                id=f"{file.stem}/{k}", question=str(row["question"]),
                answer=LETTERS[candidates.index(str(row["answer"]))], category=file.stem, format="mc",
                options=tuple(candidates), video=video if Path(video).is_absolute() else str(root / video)))
    return items


READERS = {"mmbench": read_mmbench, "mmmu": read_mmmu, "videomme": read_videomme, "mvbench": read_mvbench}


def read_benchmark(name: BenchmarkName, path: Path, media_root: Path | None = None) -> list[BenchmarkItem]:
    """Every item of a benchmark's file (or MVBench's directory), in file order."""
    if not path.exists():
        raise FileNotFoundError(f"no {name} file {path}")
    items = READERS[name](path, media_root)
    bad = [i.id for i in items if i.format == "mc" and (len(i.options) < 2 or i.answer not in LETTERS[:len(i.options)])]
    if bad:
        raise ValueError(f"{len(bad)} {name} item(s) whose answer is not one of their option letters: {bad[:5]}")
    return items
