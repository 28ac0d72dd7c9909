"""The evaluation's figures: descriptions scored against the clip's specification, 95% intervals, and paired
comparisons of two checkpoints on the same questions."""

import pytest

from jobs.eval import compare
from video_llava.feedback.description import describe_figures, score_description
from video_llava.feedback.intervals import mcnemar, paired_ratio_difference, ratio_with_interval, wilson

CLIP = [{"shape": "circle", "color": "red", "direction": "left"},
        {"shape": "square", "color": "blue", "direction": "up"}]  # 7 facts: 2 shapes, 2 colours, 2 directions, two


@pytest.mark.parametrize("text, named, hallucinated, recalled, pairs, wrong_pairs", [
    ("The video shows two shapes on a light background: a red circle moving left and a blue square moving up.",
     7, 0, 7, 2, 0),
    ("A red circle.", 2, 0, 2, 1, 0),
    ("Two squares: a blue square moving up.", 4, 0, 4, 1, 0),  # a plural names the shape once
    ("A red square and a blue circle.", 4, 0, 4, 2, 2),  # every word is in the clip; both pairs are not
    ("Three shapes: a green triangle moving down.", 4, 4, 0, 0, 0),  # hallucinations, not binding errors
    ("A red circle and a blue triangle.", 4, 1, 3, 1, 0),
    ("", 0, 0, 0, 0, 0),
])
def test_a_description_is_scored_against_the_clips_specification(text, named, hallucinated, recalled, pairs,
                                                                  wrong_pairs):
    s = score_description(text, CLIP)
    assert (s.named, s.hallucinated, s.facts, s.recalled, s.pairs, s.wrong_pairs) == (
        named, hallucinated, 7, recalled, pairs, wrong_pairs)


def test_the_figures_pool_the_descriptions_with_intervals_around_them():
    scores = [score_description("a red circle moving left", CLIP), score_description("a green circle", CLIP)] * 20
    figures = describe_figures(scores)
    assert figures["n"] == 40
    rate = figures["hallucination_rate"]
    assert rate["value"] == pytest.approx(20 / 100) and rate["low"] < rate["value"] < rate["high"]
    assert figures["recall"]["value"] == pytest.approx((3 + 1) * 20 / (7 * 40), abs=1e-4)
    assert figures["descriptions_with_hallucination"]["value"] == 0.5
    assert describe_figures(scores) == figures  # seeded: a rerun gives the same intervals


def test_wilson_mcnemar_and_the_paired_bootstrap_give_the_textbook_answers():
    assert wilson(135, 200) == pytest.approx([0.6073, 0.7361], abs=1e-4)
    assert wilson(0, 10)[0] == 0 and wilson(0, 0) is None
    assert mcnemar([True] * 10 + [False] * 5, [False] * 10 + [False] * 5) == {"a_only": 10, "b_only": 0,
                                                                              "p_value": pytest.approx(2 / 1024)}
    assert mcnemar([True, False], [False, True])["p_value"] == 1.0
    same = paired_ratio_difference([1, 0] * 50, [1] * 100, [1, 0] * 50, [1] * 100)
    assert same["value"] == 0 and not same["excludes_zero"]
    better = paired_ratio_difference([1] * 90 + [0] * 10, [1] * 100, [1] * 50 + [0] * 50, [1] * 100)
    assert better["value"] == pytest.approx(0.4) and better["excludes_zero"] and 0.25 < better["low"] < 0.4
    assert ratio_with_interval([], [])["value"] is None


def test_two_checkpoints_are_compared_on_the_questions_both_answered():
    def answer(i, text, error=""):
        return {"id": f"q{i}", "question": "What color is the circle?", "reference": "red", "qa_type": "color",
                "candidates": [text] if not error else [], "error": error}

    mine = [answer(i, "red") for i in range(12)] + [answer(12, "", error="sample: broken")]
    theirs = [answer(i, "red" if i < 2 else "blue") for i in range(12)] + [answer(12, "red")]
    paired = compare(mine, theirs + [answer(99, "red")], "qa")
    assert paired["n"] == 12  # the errored and the unshared questions left out
    assert paired["mcnemar"] == {"a_only": 10, "b_only": 0, "p_value": pytest.approx(2 / 1024)}
    assert paired["accuracy_difference"]["value"] == pytest.approx(10 / 12, abs=1e-4)
    assert paired["accuracy_difference"]["excludes_zero"]
