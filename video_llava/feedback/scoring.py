"""Scoring evaluation answers: correct by question type, accuracy (with its 95% interval) and mean judge reward per
type, and the ``--binding`` figures (clips with every answer right, per clip shape set)."""

from __future__ import annotations

from collections import defaultdict

from video_llava.feedback.intervals import ratio_with_interval, wilson
from video_llava.feedback.words import words


def is_correct(answer: str, reference: str, qa_type: str) -> bool:
    """Whether ``answer`` says ``reference``: for the synthetic question types, the first possible answer of the
    type it names is the reference ("red, not blue" counts as red); otherwise every word of the reference appears (in any script: ``words``)."""
    from video_llava.data.synthetic_qa import QA_TYPES, answer_choices

    said = words(answer)
    if qa_type in QA_TYPES:
        choices = set(answer_choices(qa_type))
        named = next((w for w in said if w in choices), None)
        return named == reference.lower()
    wanted = words(reference)
    return bool(wanted) and all(w in said for w in wanted)  # a reference with no words is never matched


def score(rows: list[dict]) -> dict:
    """Accuracy and mean judge reward, overall and per question type."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups["all"].append(row)
        groups[row["qa_type"] or "other"].append(row)
    figures = {}
    for name, group in sorted(groups.items()):
        answered = [r for r in group if not r["error"]]
        rewards = [r["scores"][0] for r in answered if r["scores"]]
        right = sum(is_correct(r["candidates"][0], r["reference"], r["qa_type"]) for r in answered)
        figures[name] = {
            "n": len(group),
            "errors": len(group) - len(answered),
            "accuracy": round(right / len(group), 4) if group else None,
            "accuracy_interval": wilson(right, len(group)),  # 95%
            "mean_reward": round(sum(rewards) / len(rewards), 4) if rewards else None,
        }
        probs = [r["correct_option_prob"] for r in answered if r.get("correct_option_prob") is not None]
        if probs:  # the probability the model gives the right answer among the possible ones, with its interval
            figures[name]["correct_option_probability"] = ratio_with_interval(probs, [1] * len(probs))
    return figures


def clips_all_right(rows: list[dict]) -> dict:
    """Of the clips ``--binding`` asked about (row ids ``<record id>/<question>``), how many got every answer right."""
    clips: dict[str, bool] = {}
    failed: set[str] = set()
    for r in rows:
        clip = r["id"].rsplit("/", 1)[0]
        if r["error"]:
            failed.add(clip)
        right = not r["error"] and is_correct(r["candidates"][0], r["reference"], r["qa_type"])
        clips[clip] = clips.get(clip, True) and right
    return {"n": len(clips), "errors": len(failed), "accuracy": round(sum(clips.values()) / len(clips), 4),
            "mean_reward": None}


def binding_by_shapes(rows: list[dict]) -> dict[str, dict]:
    """``--binding`` figures (colour, shape, clips_all_right) per clip shape set, e.g. ``circle+square``."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["clip_shapes"]].append(r)
    return {shapes: {**{k: v for k, v in score(group).items() if k != "all"}, "clips_all_right": clips_all_right(group)}
            for shapes, group in sorted(groups.items())}
