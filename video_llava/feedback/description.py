"""Scoring a free-form description of a synthetic clip against the clip's exact specification, CHAIR-style
(Rohrbach et al. 2018): which shapes, colours, counts and directions it names that the clip does not hold
(hallucinations), which of the clip's it names (recall), and which colour-shape pairs it names that the clip does
not have (binding errors). The specification is the ground truth, so no judge's reading can move these figures."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

from video_llava.feedback.intervals import ratio_with_interval
from video_llava.feedback.words import words

KINDS = ("shape", "color", "direction", "count")  # synthetic_qa.QA_TYPES, the closed answer sets


@functools.cache
def vocabulary() -> dict[str, str]:
    """Every word a description may name a clip's property with -> its kind: the possible answers of each synthetic
    question type (``count``: the number words)."""
    from video_llava.data.synthetic_qa import answer_choices

    return {word: kind for kind in KINDS for word in answer_choices(kind)}


@dataclass(frozen=True)
class DescriptionScore:
    """One description against its clip: the distinct (kind, word) properties it names and how many the clip lacks;
    the clip's properties and how many it names; the colour-shape pairs of the clip's colours and shapes it names
    ("a red circle") and how many of them the clip does not pair so."""

    named: int
    hallucinated: int
    facts: int
    recalled: int
    pairs: int
    wrong_pairs: int
    hallucinations: tuple[str, ...] = ()


def clip_facts(shapes: Sequence[dict[str, Any]]) -> set[tuple[str, str]]:
    """The clip's properties as (kind, word): each shape's type, colour and direction, and the count."""
    from video_llava.data.synthetic_qa import NUMBER_WORDS

    facts = {(kind, str(s[kind])) for s in shapes for kind in ("shape", "color", "direction")}
    return facts | {("count", NUMBER_WORDS[len(shapes)])}


def _said(text: str, vocab: dict[str, str]) -> list[str]:
    return [w[:-1] if w.endswith("s") and vocab.get(w[:-1]) == "shape" else w for w in words(text)]  # "squares"


def named_properties(text: str) -> set[tuple[str, str]]:
    """The distinct (kind, word) properties ``text`` names."""
    vocab = vocabulary()
    return {(vocab[w], w) for w in _said(text, vocab) if w in vocab}


def score_description(text: str, shapes: Sequence[dict[str, Any]]) -> DescriptionScore:
    """Score ``text`` against the clip of ``shapes`` (make_synthetic's ``shapes`` list: shape, color, direction)."""
    vocab = vocabulary()
    said = _said(text, vocab)
    named = {(vocab[w], w) for w in said if w in vocab}
    facts = clip_facts(shapes)
    wrong = sorted(f"{kind} {word}" for kind, word in named - facts)
    real_pairs = {(str(s["color"]), str(s["shape"])) for s in shapes}
    # a binding claim: a colour and a shape the clip both holds, named together ("a red circle"); a pair with a
    # word the clip lacks is that word's hallucination, not counted twice
    claimed = {(a, b) for a, b in zip(said, said[1:]) if vocab.get(a) == "color" and vocab.get(b) == "shape"
               and ("color", a) in facts and ("shape", b) in facts}
    return DescriptionScore(named=len(named), hallucinated=len(wrong), facts=len(facts), recalled=len(named & facts),
                            pairs=len(claimed), wrong_pairs=len(claimed - real_pairs), hallucinations=tuple(wrong))


def describe_figures(scores: Sequence[DescriptionScore]) -> dict[str, Any]:
    """``hallucination_rate`` (named properties the clip lacks / named), ``recall`` (the clip's properties named /
    all of them), ``binding_error_rate`` (colour-shape pairs the clip lacks / pairs named) and
    ``descriptions_with_hallucination`` (CHAIR_s), each with its 95% interval."""
    return {
        "n": len(scores),
        "hallucination_rate": ratio_with_interval([s.hallucinated for s in scores], [s.named for s in scores]),
        "recall": ratio_with_interval([s.recalled for s in scores], [s.facts for s in scores]),
        "binding_error_rate": ratio_with_interval([s.wrong_pairs for s in scores], [s.pairs for s in scores]),
        "descriptions_with_hallucination": ratio_with_interval([int(s.hallucinated > 0) for s in scores],
                                                               [1] * len(scores)),
    }
