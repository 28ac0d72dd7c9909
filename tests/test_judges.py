"""Judges score answers 1-5 against the caption; preference pairs always prefer the higher score."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fake_chat import fake_chat_endpoint
from video_llava.feedback.judges import (
    CaptionJudge,
    JudgeConfig,
    JudgeError,
    OpenAIJudge,
    check_judge,
    make_judge,
    parse_judgement,
)
from video_llava.feedback.steps import pick_pair

CAPTION = "The video shows two shapes on a light background: a red circle moving right and a blue square moving down."
QUESTION = "What color is the circle?"
CAPTION_ZH = "视频中有两个形状：一个红色的圆向右移动，一个蓝色的方块向下移动。"
EN = (CAPTION, QUESTION, "red")
ZH = (CAPTION_ZH, "圆是什么颜色？", "红色")  # Chinese: its characters are its words (it was scored as no words)


@pytest.mark.parametrize(
    "asked, candidate, expected",
    [
        (EN, "red", 5), (ZH, "红色", 5),
        (EN, "The circle is red.", 5), (ZH, "圆是红色的。", 5),
        (EN, "red and purple", 4), (ZH, "红色和紫色", 4),  # right, plus a claim the caption does not support
        (EN, "blue", 2), (ZH, "蓝色", 2),  # wrong, but blue is in the video
        (EN, "green", 1), (ZH, "绿色", 1),  # wrong and not in the video
        (EN, "circle", 1),  # repeats the question
        (EN, "", 1), (ZH, "", 1),
    ],
)
def test_caption_judge_grades_answers_against_the_reference_and_the_caption(asked, candidate, expected):
    caption, question, reference = asked
    verdict = CaptionJudge().judge(caption, question, reference, candidate)
    assert verdict.score == expected
    assert verdict.reason


@pytest.mark.parametrize(
    "answer, reference, correct",
    [
        ("是红色的", "红色", True),
        ("绿色", "红色", False),  # before: every answer passed a reference with no [a-z0-9] in it
        ("Круг красный.", "красный", True),
        ("синий", "красный", False),
        ("ＲＥＤ", "red", True),  # full-width letters are the same letters
        ("anything", "？", False),  # a reference with no words matches nothing
    ],
)
def test_is_correct_reads_every_script(answer, reference, correct):
    from video_llava.feedback.scoring import is_correct

    assert is_correct(answer, reference, "open") is correct


def test_caption_judge_gives_partial_credit_for_part_of_a_multi_word_answer():
    verdict = CaptionJudge().judge(CAPTION, "What moves right?", "red circle", "a red one")
    assert verdict.score == 3


def test_judge_replies_are_parsed_from_json_or_a_bare_score_and_garbage_is_an_error():
    assert parse_judgement('Sure! {"score": 4, "reason": "mostly right"}').score == 4
    assert parse_judgement("Score: 2. The colour is wrong.").score == 2
    with pytest.raises(JudgeError):
        parse_judgement("I cannot decide.")
    with pytest.raises(JudgeError):
        parse_judgement('{"score": 9}')


@given(st.lists(st.tuples(st.sampled_from(["red", "blue", "a red circle", "green", ""]), st.integers(1, 5)), max_size=8),
       st.integers(1, 4))
def test_a_pair_always_has_the_chosen_score_above_the_rejected_by_the_margin(scored, margin):
    candidates, scores = [c for c, _ in scored], [s for _, s in scored]
    pair = pick_pair(candidates, scores, margin)
    if pair is None:
        return
    best, worst = pair
    assert scores[best] - scores[worst] >= margin
    assert scores[best] == max(scores) and scores[worst] == min(scores)
    assert candidates[best].strip() != candidates[worst].strip()


SPEC = json.dumps([{"shape": "circle", "color": "red", "direction": "right"},
                   {"shape": "square", "color": "blue", "direction": "down"}])


@pytest.mark.parametrize("candidate, expected", [
    (CAPTION, 5),  # every property, nothing else
    ("Two shapes: a red circle moving right and a blue square.", 4),  # faithful, misses the square's direction
    ("A red circle.", 4),
    ("Two shapes: a red circle moving right and a blue triangle moving down.", 3),  # one property the clip lacks
    ("Two shapes: a blue circle moving right and a red square moving down.", 2),  # two colours on the wrong shapes
    ("Three shapes: a green triangle moving up.", 1),
    ("Something moves.", 1), ("", 1),
])
def test_the_spec_judge_scores_descriptions_by_what_they_name_that_the_clip_lacks(candidate, expected):
    verdict = make_judge(JudgeConfig(judge="spec")).judge(CAPTION, "Describe the video in detail.", CAPTION,
                                                          candidate, spec=SPEC)
    assert verdict.score == expected, verdict.reason
    assert verdict.reason


def test_the_spec_judge_needs_a_specification_and_the_describe_task():
    from video_llava.feedback.pipeline import GenerationConfig

    with pytest.raises(JudgeError, match="no specification"):
        make_judge(JudgeConfig(judge="spec")).judge(CAPTION, QUESTION, "red", "red")
    with pytest.raises(ValueError, match="goes with --task describe"):
        GenerationConfig(data="d", judge="spec")
    assert GenerationConfig(data="d", task="describe").with_task_defaults(judge="spec").judge == "spec"
    assert GenerationConfig(data="d", task="describe", judge="caption").with_task_defaults(judge="spec").judge == "caption"
    assert GenerationConfig(data="d", task="describe").with_task_defaults().max_new_tokens == 64
    assert GenerationConfig(data="d", task="describe", max_new_tokens=20).with_task_defaults().max_new_tokens == 20


def test_a_description_pair_sets_a_faithful_description_against_one_that_hallucinates():
    candidates = ["a", "b", "c", "d"]
    assert pick_pair(candidates, [5, 4, 4, 2], 1, faithful=4) == (0, 3)
    assert pick_pair(candidates, [5, 4, 4, 4], 1, faithful=4) is None  # all faithful: nothing to contrast
    assert pick_pair(candidates, [3, 2, 1, 1], 1, faithful=4) is None  # none faithful
    assert pick_pair(candidates, [5, 4, 4, 4], 1) == (0, 1)  # without the rule, a margin is enough


SENT: list[dict] = []  # what the fake judge endpoint received


def _judge_reply(body: dict) -> str | None:
    """Scores 5 for the candidate "red", 2 otherwise; fails (500) on a candidate that says "broken"."""
    if "broken" in body["messages"][-1]["content"]:
        return None
    candidate = body["messages"][-1]["content"].rsplit("Candidate answer:", 1)[1].strip()
    return json.dumps({"score": 5 if candidate == "red" else 2, "reason": f"judged {candidate}"})


@pytest.fixture
def fake_llm():
    with fake_chat_endpoint(_judge_reply, SENT) as url:
        yield url


def test_openai_judge_sends_caption_question_reference_and_candidate_and_reads_the_score(fake_llm):
    judge = OpenAIJudge(fake_llm, "judge-model", max_retries=0)
    assert judge.judge(CAPTION, QUESTION, "red", "red").score == 5
    verdict = judge.judge(CAPTION, QUESTION, "red", "blue")
    assert (verdict.score, verdict.reason) == (2, "judged blue")
    sent = SENT[-1]
    assert sent["model"] == "judge-model" and sent["temperature"] == 0.0
    assert all(part in sent["messages"][-1]["content"] for part in (CAPTION, QUESTION, "Reference answer: red"))
    schema = sent["response_format"]["json_schema"]["schema"]  # asked as JSON of a schema: any model's reply parses
    assert sent["response_format"]["type"] == "json_schema" and schema["required"] == ["score", "reason"]
    assert schema["properties"]["score"]["enum"] == [1, 2, 3, 4, 5]
    OpenAIJudge(fake_llm, "judge-model", max_retries=0, structured=False).judge(CAPTION, QUESTION, "red", "red")
    assert "response_format" not in SENT[-1]  # --judge-plain-text, for endpoints without it


def test_openai_judge_failures_are_judge_errors_not_crashes(fake_llm):
    judge = OpenAIJudge(fake_llm, "judge-model", max_retries=0)
    with pytest.raises(JudgeError, match="judge endpoint failed"):
        judge.judge(CAPTION, QUESTION, "red", "broken")


def test_judge_config_needs_an_endpoint_for_the_openai_backend():
    assert isinstance(make_judge(JudgeConfig()), CaptionJudge)
    with pytest.raises(ValueError, match="judge-url"):
        JudgeConfig(judge="openai")


def test_the_openai_judge_without_its_key_is_refused_before_any_answer_is_sampled(tmp_path, capsys, monkeypatch):
    from jobs.make_preferences import cli

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    (tmp_path / "train.jsonl").write_text("{}\n")
    argv = ["--data", str(tmp_path), "--output", str(tmp_path / "prefs"), "--judge", "openai",
            "--judge-url", "http://127.0.0.1:9/v1"]
    assert cli(argv) == 2
    assert "$OPENAI_API_KEY, which is not set" in capsys.readouterr().err
    assert not (tmp_path / "prefs").exists()


def test_an_unreachable_judge_endpoint_is_refused_before_any_answer_is_sampled(monkeypatch):
    from video_llava.ray_runtime import free_port

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with pytest.raises(JudgeError, match="cannot reach the judge endpoint"):
        check_judge(JudgeConfig(judge="openai", judge_url=f"http://127.0.0.1:{free_port()}/v1"))


def test_a_reachable_judge_endpoint_with_a_key_passes_the_check(fake_llm, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    check_judge(JudgeConfig(judge="openai", judge_url=fake_llm))  # it lists no models (501): reached is enough
