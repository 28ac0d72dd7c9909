"""Training examples shared by the SFT and DPO jobs: prompt + answer token ids with answer-only labels, and collation."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

IGNORE_INDEX = -100
MEDIA_KEYS = ("pixel_values", "image_sizes", "pixel_values_videos")  # what a batch feeds the vision tower


def sft_example(processor, prompt: str, answer: str, frames: np.ndarray | None = None, image: np.ndarray | None = None,
                follow_ups: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Token ids of prompt + answer + EOS with labels only on the answer (the prompt and media are context).

    ``prompt`` carries one ``<video>`` placeholder; give ``frames`` ``(N, H, W, 3)`` for a video record or ``image``
    ``(H, W, 3)`` for an image record (the placeholder becomes ``<image>``, processed LLaVA-NeXT's anyres way).
    ``follow_ups``: later (question, answer) turns of the conversation, each appended as a text-only user turn
    (``follow_up_prompt``) and its answer + EOS, with labels on every answer.
    """
    import torch

    from video_llava.model.prompts import follow_up_prompt

    tokenizer = processor.tokenizer
    if image is not None:
        prompt = prompt.replace(processor.video_token, processor.image_token)
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        media = {"pixel_values": inputs["pixel_values"][0], "image_sizes": inputs["image_sizes"][0]}
    else:
        inputs = processor(text=[prompt], videos=[frames], return_tensors="pt")
        media = {"pixel_values_videos": inputs["pixel_values_videos"][0]}
    eos = torch.tensor([tokenizer.eos_token_id])

    def text_ids(text: str):
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]

    pieces, labels = [], []
    for i, (context, reply) in enumerate([(None, answer), *follow_ups]):
        context_ids = inputs["input_ids"][0] if i == 0 else text_ids(follow_up_prompt(processor, context))
        reply_ids = torch.cat([text_ids(" " + reply), eos])
        pieces += [context_ids, reply_ids]
        labels += [torch.full_like(context_ids, IGNORE_INDEX), reply_ids]
    return {"input_ids": torch.cat(pieces), "labels": torch.cat(labels), **media}


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


def collate(examples: list[dict], pad_id: int) -> dict[str, Any]:
    """Right-pad ``sft_example`` outputs into one batch; image and video examples may be mixed.

    Videos must share a frame count. Images' anyres patch stacks are zero-padded to the longest (the model reads
    each image's real patch count from ``image_sizes``).
    """
    import torch

    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = e["input_ids"], e["labels"], 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    videos = [e["pixel_values_videos"] for e in examples if "pixel_values_videos" in e]
    if videos:
        batch["pixel_values_videos"] = torch.stack(videos)
    images = [e for e in examples if "pixel_values" in e]
    if images:
        patches = max(e["pixel_values"].shape[0] for e in images)
        stack = torch.zeros((len(images), patches, *images[0]["pixel_values"].shape[1:]), dtype=images[0]["pixel_values"].dtype)
        for i, e in enumerate(images):
            stack[i, : e["pixel_values"].shape[0]] = e["pixel_values"]
        batch["pixel_values"] = stack
        batch["image_sizes"] = torch.stack([e["image_sizes"] for e in images])
    return batch



def answer_tokens(batch: dict[str, Any]) -> int:
    """The tokens a collated batch's loss averages over: labelled positions after the first (transformers' causal
    loss predicts position k + 1 from k)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
