"""Training examples shared by the SFT and DPO jobs: prompt + answer token ids with answer-only labels, and collation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from video_llava.data.record_files import TrainingRecord

IGNORE_INDEX = -100
MEDIA_KEYS = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos")  # what feeds the vision tower
VIDEO_KEPT = "video_kept"  # each video's tokens in the prompt when a video token budget pruned it (train.pruned)


def sft_example(processor, prompt: str, answer: str, frames: np.ndarray | None = None, image: np.ndarray | None = None,
                follow_ups: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Token ids of prompt + answer + EOS with labels only on the answer (the prompt and media are context).

    ``prompt`` carries one ``<video>`` placeholder; give ``frames`` ``(N, H, W, 3)`` for a video record or ``image``
    ``(H, W, 3)`` for an image record (the placeholder becomes ``<image>``, processed LLaVA-NeXT's anyres way).
    ``follow_ups``: later (question, answer) turns of the conversation, each appended as a text-only user turn
    (``follow_up_prompt``) and its answer + EOS, with labels on every answer.
    """
    from video_llava.model.prompts import follow_up_prompt

    if image is not None:
        prompt = prompt.replace(processor.video_token, processor.image_token)
    media = [image] if image is not None else [frames]
    return tokenized_turns(processor, [(prompt, media, answer),
                                       *((follow_up_prompt(processor, q), [], a) for q, a in follow_ups)])


def conversation_example(processor, record: TrainingRecord, media: Sequence[np.ndarray]) -> dict[str, Any]:
    """A checked record (``data.record_files``) as one example: its system turn and first user turn rendered with the
    checkpoint's chat template, later user turns as ``follow_up_prompt``s, each medium where its placeholder stands
    (``media``: the record's, in order: images ``(H, W, 3)``, a video ``(N, H, W, 3)``), labels on every answer."""
    from video_llava.data.record_files import PLACEHOLDERS
    from video_llava.model.prompts import Turn, build_conversation, follow_up_prompt

    tokens = {PLACEHOLDERS["image"]: processor.image_token,
              PLACEHOLDERS["video"]: getattr(processor, "video_token", PLACEHOLDERS["video"])}
    system = [Turn("system", record.system)] if record.system else []
    turns, used = [], 0
    for i, (question, answer) in enumerate(record.exchanges()):
        count = sum(question.count(p) for p in tokens)
        for placeholder, token in tokens.items():
            question = question.replace(placeholder, token)
        context = build_conversation(processor, [*system, Turn("user", question)]) if i == 0 else (
            follow_up_prompt(processor, question))
        turns.append((context, media[used:used + count], answer))
        used += count
    return tokenized_turns(processor, turns)


def tokenized_turns(processor, turns: Sequence[tuple[str, Sequence[np.ndarray], str]]) -> dict[str, Any]:
    """(context, its media, reply) turns as one example: each context (the first with the tokenizer's special
    tokens) with its placeholders expanded by the processor over its media, then `` reply`` + EOS labelled.

    Images of one turn go to the processor together (OneVision reads several images of one sample at base
    resolution, a lone one anyres) and the model gets the same grouping through ``batch_num_images``."""
    import torch

    tokenizer = processor.tokenizer
    eos = torch.tensor([tokenizer.eos_token_id])

    def text_ids(text: str, special: bool = False):
        return tokenizer(text, add_special_tokens=special, return_tensors="pt")["input_ids"][0]

    pieces, labels, media = [], [], []
    for i, (context, turn_media, reply) in enumerate(turns):
        if len(turn_media):
            images = [m for m in turn_media if np.ndim(m) == 3]
            videos = [m for m in turn_media if np.ndim(m) == 4]
            inputs = processor(text=[context], return_tensors="pt", add_special_tokens=i == 0,
                               **({"images": [images]} if images else {}), **({"videos": videos} if videos else {}))
            context_ids = inputs["input_ids"][0]
            media.append({k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")})
        else:
            context_ids = text_ids(context, special=i == 0)
        reply_ids = torch.cat([text_ids(" " + reply), eos])
        pieces += [context_ids, reply_ids]
        labels += [torch.full_like(context_ids, IGNORE_INDEX), reply_ids]
    return {"input_ids": torch.cat(pieces), "labels": torch.cat(labels), **joined_media(media)}


def joined_media(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Media inputs of several turns or examples as one: each key concatenated along its first (medium) axis;
    anyres patch stacks ``(images, patches, C, H, W)`` zero-padded to the most patches (the model reads each
    image's real patch count from ``image_sizes``). Videos must share a frame count."""
    import torch

    joined: dict[str, Any] = {}
    for key in dict.fromkeys(k for part in parts for k in part):
        values = [part[key] for part in parts if key in part]
        if key == "pixel_values" and values[0].dim() == 5:
            patches = max(v.shape[1] for v in values)
            values = [torch.nn.functional.pad(v, (0, 0, 0, 0, 0, 0, 0, patches - v.shape[1])) for v in values]
        joined[key] = torch.cat(values)
    return joined


def pruned_example(example: dict[str, Any], video_token_id: int, kept: int) -> dict[str, Any]:
    """An example of one video with its video tokens cut to ``kept`` (``model.pruning``'s count, closing tokens
    included) and ``video_kept`` saying so: which of them the features fill is decided in the forward
    (``train.pruned``), as serving decides it; the placeholder ids are all alike, so the last ones go."""
    import torch

    ids, labels = example["input_ids"], example["labels"]
    positions = torch.nonzero(ids == video_token_id).flatten()
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[positions[kept:]] = False
    return {**example, "input_ids": ids[keep], "labels": labels[keep],
            VIDEO_KEPT: torch.tensor([min(kept, len(positions))])}


def fixed_length(frames: np.ndarray, count: int, is_image: bool = False) -> np.ndarray:
    """``count`` frames: a video shorter than asked repeats frames evenly (videos in a batch share a length)."""
    if is_image or len(frames) == count:
        return frames
    return frames[np.linspace(0, len(frames) - 1, count).round().astype(int)]


class ExampleMaker:
    """``sft_example``s for flat training rows (``video``/``image``, ``question``; see ``data.records.flatten_record``),
    decoding each row's media once at the base frame count (other counts are decoded when asked, not kept)."""

    def __init__(self, processor, frames: int):
        self.processor, self.frames = processor, frames
        self._media: dict[str, np.ndarray] = {}

    def media(self, video: str, image: str, frames: int | None = None) -> np.ndarray:
        from video_llava.data.records import load_media

        count = frames or self.frames
        key = video or image
        if count == self.frames and key in self._media:
            return self._media[key]
        media = fixed_length(load_media(video, image, count), count, is_image=bool(image))
        if count == self.frames:
            self._media[key] = media
        return media

    def __call__(self, row: dict, answer: str, frames: int | None = None,
                 follow_ups: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        """The example of ``row``'s question answered with ``answer`` (then ``follow_ups``)."""
        from video_llava.model.prompts import build_prompt

        media = self.media(row["video"], row["image"], frames)
        prompt = build_prompt(self.processor, row["question"])
        if row["image"]:
            return sft_example(self.processor, prompt, answer, image=media[0], follow_ups=follow_ups)
        return sft_example(self.processor, prompt, answer, media, follow_ups=follow_ups)

    def record_media(self, record: TrainingRecord, frames: int | None = None) -> list[np.ndarray]:
        """A checked record's media (``data.record_files``) in order, for ``conversation_example``: images
        ``(H, W, 3)``, a video ``(frames, H, W, 3)``."""
        return [self.media(m.uri, "", frames) if m.kind == "video" else self.media("", m.uri, frames)[0]
                for m in record.media]


def collate(examples: list[dict], pad_id: int) -> dict[str, Any]:
    """Right-pad examples into one batch; image, video and text-only examples may be mixed (media: ``joined_media``)."""
    import torch

    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = e["input_ids"], e["labels"], 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    batch.update(joined_media([{k: v for k, v in e.items() if k in MEDIA_KEYS or k == VIDEO_KEPT} for e in examples]))
    return batch


def answer_tokens(batch: dict[str, Any]) -> int:
    """The tokens a collated batch's loss averages over: labelled positions after the first (transformers' causal
    loss predicts position k + 1 from k)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
