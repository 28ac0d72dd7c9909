"""AI-feedback judges: score a candidate answer 1-5 against a detailed caption of the video (LLaVA-Hound).

A judge never sees the video. It gets the caption (the evidence), the question, the reference answer and one
candidate, and returns a ``Judgement`` (integer score 1-5 and a one-sentence reason).

Two backends:

* ``OpenAIJudge``: any OpenAI-compatible chat endpoint (a hosted LLM, vLLM, our own Serve app) - what a
  production user points at a large model.
* ``CaptionJudge``: an offline scorer grounded in the caption, for machines with no LLM at hand (CI, this
  project's own pipeline). We chose it over a sentence-embedding similarity model because the synthetic
  captions state every fact about a clip, so checking the candidate's words against the reference and the
  caption is exact there, needs no download, and gives the graded scores (not just right/wrong) that make
  preference margins; an embedding model would score "red" and "blue" as near neighbours.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from video_llava.feedback.endpoint import EndpointError, chat_client, check_endpoint, json_schema_format
from video_llava.feedback.words import words

JUDGE_SYSTEM = (
    "You judge answers to questions about a video. You cannot see the video; a detailed caption of it is your "
    "evidence. Score the candidate answer for relevance to the question, accuracy against the caption and the "
    "reference answer, clarity and completeness, as an integer from 1 (wrong, unrelated or empty) to 5 (fully "
    'correct and clear). Reply with JSON only: {"score": <1-5>, "reason": "<one sentence>"}.'
)

# Words that carry no claim about the video; everything else a candidate says must be backed by the evidence.
FILLER = set(
    "a an the is are was were be it its this that there these those of in on at to from with and or as by "
    "i think answer video shows shown object objects shape shapes color colour moving moves move toward "
    "towards frame frames scene background light one".split()
) | set("的 是 了 在 有 一 个 这 那 和 与 它 吗 呢 吧 啊 视 频 中 颜 色".split())  # Chinese: function characters, "video", "colour"


class JudgeError(EndpointError):
    """The judge could not produce a score (endpoint down, unparseable reply)."""


@dataclass(frozen=True)
class Judgement:
    score: int
    reason: str


class Judge(Protocol):
    def judge(self, caption: str, question: str, reference: str, candidate: str, spec: str = "") -> Judgement:
        """``spec``: the clip's specification (JSON of make_synthetic's ``shapes``) where the row has one."""
        ...


def _words(text: str) -> list[str]:
    return words(text)


class CaptionJudge:
    """Offline judge: a candidate's claims checked against the reference answer and the caption.

    5  states the reference answer and claims nothing the caption does not support;
    4  states the reference answer but adds claims the caption does not support;
    3  states part of a multi-word reference answer;
    2  wrong, but names something the caption does show (e.g. the colour of another shape);
    1  empty, or names things the caption does not show.
    """

    def judge(self, caption: str, question: str, reference: str, candidate: str, spec: str = "") -> Judgement:
        said = _words(candidate)
        if not said:
            return Judgement(1, "The answer is empty.")
        claims = [w for w in said if w not in FILLER]
        wanted = [w for w in _words(reference) if w not in FILLER] or _words(reference)
        evidence = set(_words(caption)) | set(_words(question)) | set(wanted)
        unsupported = sorted({w for w in claims if w not in evidence})
        hits = [w for w in wanted if w in said]
        if len(hits) == len(wanted):
            if not unsupported:
                return Judgement(5, f"States the reference answer '{reference}', consistent with the caption.")
            return Judgement(4, f"States '{reference}' but also claims {', '.join(unsupported)}, which the caption does not show.")
        if hits:
            return Judgement(3, f"Only part of the reference answer '{reference}' ({', '.join(hits)}).")
        grounded = [w for w in claims if w in evidence and w not in set(_words(question))]
        if grounded and not unsupported:
            return Judgement(2, f"Wrong: says {', '.join(dict.fromkeys(grounded))} where the answer is '{reference}', though the caption mentions it.")
        what = ", ".join(unsupported) if unsupported else "nothing relevant"
        return Judgement(1, f"Wrong: says {what}, which the caption does not support; the answer is '{reference}'.")


class SpecJudge:
    """Scores a detailed description of a synthetic clip against the clip's exact specification
    (``feedback.description``), for the free-form task where feedback carries what SFT's labels do not: which
    descriptions name things the clip does not hold.

    5  faithful and complete: names every shape, colour, direction and the count, and nothing the clip lacks;
    4  faithful but incomplete: names nothing the clip lacks, misses some of what it holds;
    3  one hallucination: a property the clip lacks, or a colour on the wrong shape;
    2  two;  1  more, or empty.
    A score of 4 or more is faithful (``FAITHFUL``), 3 or less hallucinates.
    """

    FAITHFUL = 4

    def judge(self, caption: str, question: str, reference: str, candidate: str, spec: str = "") -> Judgement:
        from video_llava.feedback.description import clip_facts, named_properties, score_description

        if not spec:
            raise JudgeError("--judge spec scores descriptions of make_synthetic clips; this row has no specification")
        shapes = json.loads(spec)
        s = score_description(candidate, shapes)
        if s.named == 0:
            return Judgement(1, "The description names no shape, colour, direction or count.")
        wrong = s.hallucinated + s.wrong_pairs
        if wrong:
            said = list(s.hallucinations) + ([f"{s.wrong_pairs} colour-shape pair(s) the clip lacks"] if s.wrong_pairs
                                             else [])
            return Judgement(max(1, 4 - wrong), f"Names what the clip does not hold: {', '.join(said)}.")
        missing = sorted(f"{kind} {word}" for kind, word in clip_facts(shapes) - named_properties(candidate))
        if missing:
            return Judgement(4, f"Faithful but misses {', '.join(missing)}.")
        return Judgement(5, "Faithful and complete: every shape, colour, direction and the count, nothing else.")


# The reply's shape, asked of the endpoint: a model that follows it always gives a score parse_judgement reads.
JUDGEMENT_FORMAT = json_schema_format("judgement", {
    "type": "object", "additionalProperties": False, "required": ["score", "reason"],
    "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}, "reason": {"type": "string", "maxLength": 300}}})


def parse_judgement(reply: str) -> Judgement:
    """Read a judge model's reply: the JSON object we ask for, or failing that a bare 'score: N'."""
    match = re.search(r"\{.*\}", reply, re.S)
    if match:
        try:
            data = json.loads(match.group(0))
            score = int(data["score"])
            if 1 <= score <= 5:
                return Judgement(score, str(data.get("reason", "")).strip())
        except (ValueError, KeyError, TypeError):
            pass
    match = re.search(r"score\D{0,5}([1-5])\b", reply, re.I)
    if match:
        return Judgement(int(match.group(1)), reply.strip()[:300])
    raise JudgeError(f"judge reply has no 1-5 score: {reply.strip()[:200]!r}")


class OpenAIJudge:
    """A judge behind any OpenAI-compatible ``/v1/chat/completions`` endpoint (the ``openai`` client)."""

    def __init__(self, base_url: str, model: str, key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 max_retries: int = 3, structured: bool = True):
        self.model, self.structured = model, structured
        self.client = chat_client(base_url, key_env, timeout_s, max_retries)

    def judge(self, caption: str, question: str, reference: str, candidate: str, spec: str = "") -> Judgement:
        import openai

        user = f"Caption: {caption}\nQuestion: {question}\nReference answer: {reference}\nCandidate answer: {candidate}"
        try:
            reply = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}],
                temperature=0.0,
                max_tokens=200,
                **({"response_format": JUDGEMENT_FORMAT} if self.structured else {}),
            )
        except openai.OpenAIError as exc:
            raise JudgeError(f"judge endpoint failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
        return parse_judgement(reply.choices[0].message.content or "")


class JudgeConfig(BaseModel):
    """Which judge scores the candidates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    judge: Literal["caption", "openai", "spec"] = Field("caption", description="'caption' (offline), 'openai' (an "
                                                        "endpoint) or 'spec' (descriptions of make_synthetic clips "
                                                        "against their specification)")
    judge_url: str | None = Field(None, description="base URL of the OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    judge_model: str = Field("gpt-4o-mini", description="model name sent to the endpoint")
    judge_api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the endpoint's key")
    judge_timeout_s: float = Field(60.0, gt=0)
    judge_plain_text: bool = Field(False, description="ask the judge endpoint for free text (for one without "
                                   "structured output); by default its reply is asked as JSON of a schema "
                                   "(response_format json_schema: OpenAI, vLLM, SGLang and this service serve it)")

    def model_post_init(self, __context) -> None:
        if self.judge == "openai" and not self.judge_url:
            raise ValueError("--judge openai needs --judge-url (the endpoint's base URL, ending in /v1)")


def check_judge(cfg: JudgeConfig) -> None:
    """Before any answer is sampled: the openai judge's key is set and its endpoint answers (``JudgeError`` if not)."""
    if cfg.judge == "openai":
        check_endpoint(cfg.judge_url, cfg.judge_api_key_env, "judge", "--judge-api-key-env", cfg.judge_timeout_s,
                       JudgeError)


def make_judge(cfg: JudgeConfig) -> Judge:
    if cfg.judge == "caption":
        return CaptionJudge()
    if cfg.judge == "spec":
        return SpecJudge()
    return OpenAIJudge(cfg.judge_url, cfg.judge_model, cfg.judge_api_key_env, cfg.judge_timeout_s,
                       structured=not cfg.judge_plain_text)
