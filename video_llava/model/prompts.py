"""Chat templates of the LLaVA-NeXT-Video family, and the prompt for one video question.

Named templates follow LLaVA-NeXT's ``conversation.py``: ``vicuna_v1`` (7B, 7B-DPO), ``mistral_direct``
(34B-DPO), ``qwen_1_5`` (32B-Qwen). ``auto`` uses the chat template saved with the checkpoint's processor
(llava-hf checkpoints and our embedded default carry one), falling back to ``vicuna_v1``.
"""

from __future__ import annotations

from typing import Literal

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


def _user_content(question: str, video_token: str, num_videos: int = 1) -> str:
    return f"{video_token}\n" * num_videos + question.strip()


def render_named(template: ChatTemplateName, question: str, video_token: str = "<video>", num_videos: int = 1) -> str:
    """The generation prompt for a question about ``num_videos`` videos in a LLaVA-NeXT conversation style."""
    user = _user_content(question, video_token, num_videos)
    if template == "vicuna_v1":
        return f"{VICUNA_SYSTEM} USER: {user} ASSISTANT:"
    if template == "mistral_direct":
        return f"<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if template == "qwen_1_5":
        return (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        )
    raise ValueError(f"unknown chat template {template!r}")


def count_prompt_tokens(processor, prompt: str) -> int:
    """Text tokens of a rendered prompt, the ``<video>`` placeholders excluded (they become visual tokens)."""
    ids = processor.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return len(ids) - ids.count(processor.video_token_id)


def follow_up_prompt(processor, question: str) -> str:
    """A later user turn of a conversation (no media), ready for the answer: what follows the previous answer's EOS.

    Rendered with the processor's chat template as a one-message conversation (llava-hf templates add no system
    text), else in ``vicuna_v1``'s ``USER: ... ASSISTANT:`` form.
    """
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "text", "text": question.strip()}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return f"USER: {question.strip()} ASSISTANT:"


def build_prompt(processor, question: str, template: ChatTemplateName = "auto", num_videos: int = 1) -> str:
    """Prompt text with ``num_videos`` ``<video>`` placeholders (videos first, in order), in the asked template."""
    video_token = getattr(processor, "video_token", "<video>")
    if template == "auto":
        if getattr(processor, "chat_template", None):
            parts = [{"type": "video"}] * num_videos + [{"type": "text", "text": question.strip()}]
            conversation = [{"role": "user", "content": parts}]
            return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        template = "vicuna_v1"
    return render_named(template, question, video_token, num_videos)
