"""Training objectives: which parameters train, answer log-probabilities, and the DPO loss."""

from __future__ import annotations

from typing import Any

from video_llava.train.examples import IGNORE_INDEX, MEDIA_KEYS


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

    media = {k: batch[k] for k in MEDIA_KEYS if k in batch}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **media).logits[:, :-1].float()
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
