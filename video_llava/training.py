"""Training pieces shared by the SFT and DPO jobs: examples with answer-only labels, collation, freezing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

IGNORE_INDEX = -100


def load_records(path: str | Path) -> list[dict]:
    """LLaVA-style records of a ``.jsonl`` file (``id``, ``video``, ``conversations``)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def question_answer(record: dict) -> tuple[str, str]:
    """The first human turn (without its ``<video>`` placeholder) and the gpt answer that follows it."""
    turns = record["conversations"]
    human = next(t["value"] for t in turns if t["from"] == "human")
    answer = next(t["value"] for t in turns if t["from"] == "gpt")
    return human.replace("<video>", "").strip(), answer.strip()


def sft_example(processor, prompt: str, answer: str, frames: np.ndarray) -> dict[str, Any]:
    """Token ids of prompt + answer + EOS with labels only on the answer (the prompt and video are context)."""
    tokenizer = processor.tokenizer
    prompt_inputs = processor(text=[prompt], videos=[frames], return_tensors="pt")
    prompt_ids = prompt_inputs["input_ids"][0]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    import torch

    eos = torch.tensor([tokenizer.eos_token_id])
    input_ids = torch.cat([prompt_ids, answer_ids, eos])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[len(prompt_ids):] = input_ids[len(prompt_ids):]
    return {"input_ids": input_ids, "labels": labels, "pixel_values_videos": prompt_inputs["pixel_values_videos"][0]}


def collate(examples: list[dict], pad_id: int) -> dict[str, Any]:
    """Right-pad a list of ``sft_example`` outputs into a batch (all videos must have the same frame count)."""
    import torch

    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = e["input_ids"], e["labels"], 1
    pixels = torch.stack([e["pixel_values_videos"] for e in examples])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values_videos": pixels}


def freeze_vision_tower(model) -> dict[str, int]:
    """Freeze the CLIP tower (LLaVA-NeXT-Video's recipe); projector and LLM stay trainable. Returns counts."""
    for param in model.model.vision_tower.parameters():
        param.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}


def answer_logprobs(model, batch: dict[str, Any]):
    """Summed log-probability of each row's labelled (answer) tokens under ``model``: shape ``(rows,)``."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values_videos=batch["pixel_values_videos"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with its diagnostics.

    Returns (mean loss, per-pair log-ratio margin (pi_c - ref_c) - (pi_r - ref_r), per-pair reward accuracy).
    """
    import torch.nn.functional as F

    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean(), margin.detach(), (margin > 0).float().detach()
