"""A deterministic synthetic video-QA dataset: clips of moving shapes, questions with one right answer each,
and a detailed caption per clip (the evidence an AI-feedback judge scores answers against).

Records are LLaVA-style: ``{"id", "video", "conversations": [{"from": "human", "value": "<video>\\n..."},
{"from": "gpt", "value": ...}, ...], "caption", "qa_type", "answer"}``. The first turn is the record's question
(``qa_type``/``answer``; what evaluation and AI feedback use). With ``follow_ups``, later turns ask about every other
shape and end with the detailed caption, so one pass of the (expensive) vision tower supervises every fact of the
clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from video_llava.data.synthetic_video import COLORS, DIRECTIONS, SHAPES, MovingShape

NUMBER_WORDS = ["zero", "one", "two", "three", "four"]
QA_TYPES = ("color", "shape", "count", "direction")
# Start positions that keep up to three shapes apart (fractions of width/height).
STARTS = [(0.25, 0.3), (0.7, 0.35), (0.45, 0.75)]
DESCRIBE = "Describe the video in detail."
CAPTION = "caption"  # the qa_type of a record whose one question is DESCRIBE, answered with the detailed caption


@dataclass(frozen=True)
class ClipSpec:
    """The shapes of one clip; colours and shape types are distinct within a clip so questions are unambiguous."""

    shapes: tuple[MovingShape, ...]

    def caption(self) -> str:
        parts = [f"{'an' if s.color[0] in 'aeiou' else 'a'} {s.color} {s.shape} moving {s.direction}" for s in self.shapes]
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        count = NUMBER_WORDS[len(self.shapes)]
        noun = "shape" if len(self.shapes) == 1 else "shapes"
        return f"The video shows {count} {noun} on a light background: {listed}."


def _draw_kinds(rng: np.random.Generator) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """How many shapes (1-3), their distinct colours, distinct shape types and directions."""
    count = int(rng.integers(1, 4))
    colors = rng.choice(list(COLORS), size=count, replace=False)
    shapes = rng.choice(list(SHAPES), size=count, replace=False)
    directions = rng.choice(list(DIRECTIONS), size=count, replace=True)
    return count, colors, shapes, directions


def random_clip(rng: np.random.Generator) -> ClipSpec:
    count, colors, shapes, directions = _draw_kinds(rng)
    return ClipSpec(tuple(
        MovingShape(str(shapes[i]), str(colors[i]), str(directions[i]), start=STARTS[i], size=0.22, speed=0.25)
        for i in range(count)
    ))


# Frame sizes (width, height) of varied clips: square, landscape 4:3 and 16:9, portrait 3:4 at a 112-pixel short side.
VARIED_SIZES = ((112, 112), (150, 112), (200, 112), (112, 150))


def parse_frame_sizes(text: str) -> tuple[tuple[int, ...], ...]:
    """``"320x240,640x360"`` -> ``((320, 240), (640, 360))``; ``ValueError`` when an item is not numbers joined by x."""
    try:
        return tuple(tuple(int(n) for n in item.lower().split("x")) for item in text.split(",") if item.strip())
    except ValueError:
        raise ValueError(f"frame sizes are WIDTHxHEIGHT[,WIDTHxHEIGHT...], got {text!r}") from None


def check_frame_sizes(sizes: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """``sizes`` if there is one or more and each is a (width, height) pair of 32-1920 pixels, else ``ValueError``."""
    if not sizes or any(len(s) != 2 or not (32 <= min(s) and max(s) <= 1920) for s in sizes):
        raise ValueError(f"frame sizes must be WIDTHxHEIGHT pairs of 32-1920 pixels, got {sizes}")
    return tuple((int(w), int(h)) for w, h in sizes)


def random_varied_clip(rng: np.random.Generator, frame_sizes: Sequence[tuple[int, int]] = VARIED_SIZES,
                       ) -> tuple[ClipSpec, tuple[int, int]]:
    """A clip drawn from a wider distribution than ``random_clip``: any start position, shape sizes 0.14-0.3, speeds
    0.1-0.55 (shapes may wrap out of the centre crop the model sees for a while), and a frame size (width, height)
    from ``frame_sizes``. Returns the clip and its (width, height). Shapes start apart so none hides another at first."""
    count, colors, shapes, directions = _draw_kinds(rng)
    width, height = frame_sizes[int(rng.integers(len(frame_sizes)))]
    sizes = rng.uniform(0.14, 0.3, size=count)
    short = min(width, height)
    crop = short / 2
    x_range = (0.5 - 0.4 * crop / (width / 2), 0.5 + 0.4 * crop / (width / 2))  # start centres inside the centre crop
    y_range = (0.5 - 0.4 * crop / (height / 2), 0.5 + 0.4 * crop / (height / 2))
    starts: list[tuple[float, float]] = []
    for i in range(count):
        while True:  # centres at least the two radii apart (in pixels)
            x, y = rng.uniform(*x_range), rng.uniform(*y_range)
            if all(np.hypot((x - sx) * width, (y - sy) * height) > (sizes[i] + sizes[j]) * short / 2 * 1.2
                   for j, (sx, sy) in enumerate(starts)):
                starts.append((round(float(x), 3), round(float(y), 3)))
                break
    return ClipSpec(tuple(
        MovingShape(str(shapes[i]), str(colors[i]), str(directions[i]), start=starts[i],
                    size=round(float(sizes[i]), 3), speed=round(float(rng.uniform(0.1, 0.55)), 3))
        for i in range(count)
    )), (width, height)


def center_crop(frames: np.ndarray) -> np.ndarray:
    """The centred square of ``frames`` (..., H, W, 3): the part the processor keeps (shortest edge, centre crop)."""
    h, w = frames.shape[-3:-1]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return frames[..., top:top + side, left:left + side, :]


def color_pixels(frames: np.ndarray, color: str, tolerance: int = 30) -> np.ndarray:
    """Pixels of ``color`` per frame of ``frames`` (T, H, W, 3)."""
    target = np.array(COLORS[color], dtype=np.int16)
    return (np.abs(frames.astype(np.int16) - target).sum(-1) < tolerance).sum(axis=(1, 2))


def all_visible(spec: ClipSpec, frames: np.ndarray, min_pixels: int = 40, min_fraction: float = 1.0) -> bool:
    """Every shape's colour shows (at least ``min_pixels``) in at least ``min_fraction`` of the frames of the centre
    crop the model sees; with the default 1.0, in every frame (no shape hidden behind another or off-screen)."""
    crop = center_crop(frames)
    return all((color_pixels(crop, s.color) >= min_pixels).mean() >= min_fraction for s in spec.shapes)


def question_for(spec: ClipSpec, qa_type: str, rng: np.random.Generator) -> tuple[str, str]:
    """(question, short answer) of the given type about the clip (about a random one of its shapes)."""
    return question_about(spec, spec.shapes[int(rng.integers(len(spec.shapes)))], qa_type)


def question_about(spec: ClipSpec, target: MovingShape, qa_type: str) -> tuple[str, str]:
    """(question, short answer) of the given type about ``target``, one of the clip's shapes."""
    if qa_type == "color":
        return f"What color is the {target.shape}?", target.color
    if qa_type == "shape":
        return f"What shape is the {target.color} object?", target.shape
    if qa_type == "count":
        return "How many shapes are in the video?", NUMBER_WORDS[len(spec.shapes)]
    if qa_type == "direction":
        return f"Which way does the {target.color} {target.shape} move?", target.direction
    raise ValueError(f"unknown qa_type {qa_type!r}")


def answer_choices(qa_type: str) -> list[str]:
    """Every possible answer of a question type (for accuracy and for sampling wrong answers)."""
    return {
        "color": list(COLORS),
        "shape": list(SHAPES),
        "count": NUMBER_WORDS[1:4],
        "direction": list(DIRECTIONS),
    }[qa_type]


def follow_up_turns(spec: ClipSpec, first: tuple[str, str], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Turns after the first: a colour or shape question about each shape the first turn did not name, the count
    (unless asked), then the caption. None of them states an earlier turn's answer, so none can be copied from the
    conversation; direction questions are left out because they name a shape's colour and type together."""
    turns = []
    for target in rng.permutation(len(spec.shapes)):
        shape = spec.shapes[int(target)]
        if shape.shape in first[0] or shape.color in first[0]:
            continue
        turns.append(question_about(spec, shape, str(rng.choice(["color", "shape"]))))
    if not first[0].startswith("How many"):
        turns.append(question_about(spec, spec.shapes[0], "count"))
    return turns + [(DESCRIBE, spec.caption())]


def make_record(record_id: str, video_path: str, spec: ClipSpec, qa_type: str, rng: np.random.Generator,
                follow_ups: bool = False) -> dict:
    """One record; ``qa_type`` ``CAPTION`` asks only for the detailed caption (no follow-ups: it states every answer)."""
    if qa_type == CAPTION:
        question, answer = DESCRIBE, spec.caption()
        turns = [(question, answer)]
    else:
        question, answer = question_for(spec, qa_type, rng)
        turns = [(question, answer)] + (follow_up_turns(spec, (question, answer), rng) if follow_ups else [])
    conversations = []
    for i, (q, a) in enumerate(turns):
        conversations += [{"from": "human", "value": f"<video>\n{q}" if i == 0 else q}, {"from": "gpt", "value": a}]
    return {
        "id": record_id,
        "video": video_path,
        "conversations": conversations,
        "caption": spec.caption(),
        "qa_type": qa_type,
        "answer": answer,
        "shapes": [{"shape": s.shape, "color": s.color, "direction": s.direction, "start": list(s.start), "size": s.size,
                    "speed": s.speed} for s in spec.shapes],
    }
