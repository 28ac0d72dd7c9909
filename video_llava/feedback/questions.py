"""Questions written from captions by an LLM (LLaVA-Hound's second hop): each detailed caption of a video becomes
a few questions with short reference answers, which make_preferences then samples answers to and judges against
the caption. Any OpenAI-compatible endpoint writes them (a hosted LLM, vLLM, this service itself); the reply is
asked as JSON of a schema, so any model's reply parses, and a reply that still does not is an error row."""

from __future__ import annotations

import json
from typing import Any

from video_llava.feedback.endpoint import EndpointError, chat_client, json_schema_format

QUESTION_SYSTEM = (
    "You write questions about a video for testing a model that watches it. You cannot see the video; its detailed "
    "description is all you know. Write questions a viewer could answer from the video alone (what, how many, which "
    "colour, where, in what order), each with a short answer the description supports. Reply with JSON only: "
    '{"questions": [{"question": "...", "answer": "..."}]}.'
)


def question_format(count: int) -> dict[str, Any]:
    pair = {"type": "object", "additionalProperties": False, "required": ["question", "answer"],
            "properties": {"question": {"type": "string", "maxLength": 200}, "answer": {"type": "string", "maxLength": 100}}}
    return json_schema_format("questions", {
        "type": "object", "additionalProperties": False, "required": ["questions"],
        "properties": {"questions": {"type": "array", "items": pair, "minItems": 1, "maxItems": count}}})


def parse_questions(reply: str, count: int) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a writer's reply, at most ``count``; ``EndpointError`` if there are none."""
    try:
        start = reply.index("{")
        data = json.loads(reply[start:reply.rindex("}") + 1])
        pairs = [(str(q["question"]).strip(), str(q["answer"]).strip()) for q in data["questions"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise EndpointError(f"the question writer's reply is not the JSON asked for: {reply.strip()[:200]!r}") from exc
    pairs = [(q, a) for q, a in pairs if q and a][:count]
    if not pairs:
        raise EndpointError(f"the question writer's reply has no question with an answer: {reply.strip()[:200]!r}")
    return pairs


class QuestionWriter:
    """A Ray Data step: each record's caption -> ``count`` question records (or one error row with the reason)."""

    def __init__(self, url: str, model: str, key_env: str, count: int, timeout_s: float = 120.0,
                 max_tokens: int = 512, structured: bool = True):
        self.client = chat_client(url, key_env, timeout_s)
        self.model, self.count, self.max_tokens, self.structured = model, count, max_tokens, structured

    def questions(self, caption: str) -> list[tuple[str, str]]:
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.model, temperature=0.0, max_tokens=self.max_tokens,
                messages=[{"role": "system", "content": QUESTION_SYSTEM},
                          {"role": "user", "content": f"Description: {caption}\nWrite {self.count} questions."}],
                **({"response_format": question_format(self.count)} if self.structured else {}))
        except openai.OpenAIError as exc:
            raise EndpointError(f"question writer failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
        return parse_questions(reply.choices[0].message.content or "", self.count)

    def __call__(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        kind = "video" if record.get("video") else "image"
        base = {"source": str(record["id"]), "caption": str(record.get("caption") or ""),
                "video": str(record.get("video") or ""), "image": str(record.get("image") or "")}
        if not base["caption"].strip():
            return [{**base, "id": str(record["id"]), "conversations": "",
                     "error": "the record has no caption to write questions from"}]
        try:
            pairs = self.questions(base["caption"])
        except EndpointError as exc:
            return [{**base, "id": str(record["id"]), "conversations": "", "error": str(exc)}]
        return [{**base, "id": f"{record['id']}/q{k}", "error": "",
                 "conversations": json.dumps([{"from": "human", "value": f"<{kind}>\n{question}"},
                                              {"from": "gpt", "value": answer}])}
                for k, (question, answer) in enumerate(pairs)]
