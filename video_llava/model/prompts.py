"""Chat templates of the LLaVA family, conversations (system text, earlier turns, media in any turn) rendered to a
prompt, and the check that user text stays text.

Named templates follow LLaVA-NeXT's ``conversation.py``: ``vicuna_v1`` (7B, 7B-DPO), ``mistral_direct``
(34B-DPO), ``qwen_1_5`` (32B-Qwen). ``auto`` uses the chat template saved with the checkpoint's processor
(llava-hf checkpoints and our embedded default carry one), falling back to ``vicuna_v1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

ChatTemplateName = Literal["auto", "vicuna_v1", "mistral_direct", "qwen_1_5"]

# Turn markers of the templates above and of llava-hf's (plain text in Vicuna's, special tokens in ChatML's).
ROLE_MARKERS = ("USER:", "ASSISTANT:", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]")


class InvalidQuestionError(ValueError):
    """User text holds what the prompt would read as structure: a media placeholder, a special token, a turn."""


def check_user_text(processor, text: str) -> None:
    """User text is text: a client cannot type a media slot, a special token or a new turn into the prompt.

    ``<video>`` typed in a question became a slot with no frames behind it, and the prompt was cut there (the
    model saw ``USER: <video x576>\nDescribe the scene`` and nothing after). Refused, naming the marker.
    """
    markers = {getattr(processor, "video_token", "<video>"), getattr(processor, "image_token", "<image>"), *ROLE_MARKERS}
    tokenizer = getattr(processor, "tokenizer", processor)
    markers.update(t for t in getattr(tokenizer, "all_special_tokens", []) if len(t) > 1)
    found = sorted(m for m in markers if m and m in text)
    if found:
        raise InvalidQuestionError(
            f"the question contains {', '.join(repr(m) for m in found)}, which the prompt uses as a media "
            "placeholder, special token or turn marker; remove it (send media as content parts, turns as messages)"
        )

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# Jinja template saved with the embedded model's processor: the llava-hf layout (USER:/ASSISTANT:, media first).
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'video' %}{{ '<video>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# ChatML, as Qwen2-based checkpoints (LLaVA-OneVision) render a conversation: media first in each user turn.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'video' %}{{ '<video>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: its role, its text and the media it carries (in order).

    ``media``: images as (H, W, 3) and videos as (N, H, W, 3) uint8 arrays; the chat template places them before
    the turn's text (images first, then videos, each kind in order).
    """

    role: Literal["system", "user", "assistant"]
    text: str
    media: tuple = ()
    name: str | None = None  # a participant's name: the checkpoint's chat template renders it where it has a place


def media_kinds(media: Sequence) -> list[str]:
    return ["image" if np.ndim(m) == 3 else "video" for m in media]


def _placeholders(processor, kinds: Sequence[str]) -> str:
    tokens = {"image": getattr(processor, "image_token", "<image>"), "video": getattr(processor, "video_token", "<video>")}
    ordered = [k for k in kinds if k == "image"] + [k for k in kinds if k == "video"]  # as the chat templates do
    return "".join(f"{tokens[k]}\n" for k in ordered)


def render_named(template: ChatTemplateName, turns: Sequence[Turn], processor=None) -> str:
    """The generation prompt of a conversation in one of LLaVA-NeXT's named conversation styles."""
    system = next((t.text.strip() for t in turns if t.role == "system"), None)
    rest = [t for t in turns if t.role != "system"]

    def content(turn: Turn) -> str:
        return _placeholders(processor, media_kinds(turn.media)) + turn.text.strip()

    if template == "vicuna_v1":
        out = system if system is not None else VICUNA_SYSTEM
        for turn in rest:
            out += f" USER: {content(turn)}" if turn.role == "user" else f" ASSISTANT: {content(turn)}</s>"
        return out + " ASSISTANT:"
    if template in ("mistral_direct", "qwen_1_5"):
        default = "Answer the questions." if template == "mistral_direct" else "You are a helpful assistant."
        out = f"<|im_start|>system\n{system if system is not None else default}<|im_end|>\n"
        for turn in rest:
            out += f"<|im_start|>{turn.role}\n{content(turn)}<|im_end|>\n"
        return out + "<|im_start|>assistant\n"
    raise ValueError(f"unknown chat template {template!r}")


def build_conversation(processor, turns: Sequence[Turn], template: ChatTemplateName = "auto") -> str:
    """The generation prompt of a whole conversation, with one placeholder per medium, in the asked template
    (``auto``: the checkpoint's own chat template, else ``vicuna_v1``)."""
    if template == "auto":
        if getattr(processor, "chat_template", None):
            conversation = [
                {"role": t.role, "content": [{"type": k} for k in media_kinds(t.media)] + [{"type": "text", "text": t.text.strip()}],
                 **({"name": t.name} if t.name else {})}
                for t in turns
            ]
            return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        template = "vicuna_v1"
    return render_named(template, turns, processor)


def count_prompt_tokens(processor, prompt: str) -> int:
    """Text tokens of a rendered prompt, the ``<image>``/``<video>`` placeholders excluded (they become visual
    tokens)."""
    ids = processor.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    placeholders = {getattr(processor, name, None) for name in ("image_token_id", "video_token_id")} - {None}
    return len(ids) - sum(ids.count(t) for t in placeholders)


def follow_up_prompt(processor, question: str) -> str:
    """A later user turn of a conversation (no media), ready for the answer: what follows the previous answer's EOS.

    Rendered with the processor's chat template as a one-message conversation (llava-hf templates add no system
    text), else in ``vicuna_v1``'s ``USER: ... ASSISTANT:`` form.
    """
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "text", "text": question.strip()}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return f"USER: {question.strip()} ASSISTANT:"


def build_prompt(processor, question: str, template: ChatTemplateName = "auto", num_videos: int = 1,
                 num_images: int = 0) -> str:
    """Prompt of one question about ``num_images`` images and ``num_videos`` videos (media first, in order)."""
    media = tuple(np.zeros((1, 1, 3)) for _ in range(num_images)) + tuple(np.zeros((1, 1, 1, 3)) for _ in range(num_videos))
    return build_conversation(processor, [Turn("user", question, media)], template)
