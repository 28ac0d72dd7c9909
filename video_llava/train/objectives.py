"""Training objectives: which parameters train, answer log-probabilities, and the DPO loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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


def answer_lengths(batch: dict[str, Any]):
    """Each row's number of labelled (answer) tokens: shape ``(rows,)``."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)


PreferenceLossType = Literal["sigmoid", "ipo", "robust"]


def preference_losses(margin, beta: float, loss_type: PreferenceLossType = "sigmoid", label_smoothing: float = 0.0):
    """Each pair's loss from its log-ratio margin ``(pi_c - ref_c) - (pi_r - ref_r)``, as TRL's ``DPOTrainer`` defines
    them: ``sigmoid`` is DPO (Rafailov et al. 2023), with ``label_smoothing`` e the conservative DPO of Mitchell
    (2023) that takes each label as wrong with probability e; ``robust`` the unbiased loss under label noise e of
    Chowdhury et al. (2024); ``ipo`` the squared loss of Azar et al. (2023), which pulls the margin to 1/(2 beta)
    rather than to infinity (its margins are of per-token mean log-probabilities: the caller's to give)."""
    import torch.nn.functional as F

    e = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - e) * F.logsigmoid(beta * margin) - e * F.logsigmoid(-beta * margin)
    if loss_type == "robust":
        return (-(1 - e) * F.logsigmoid(beta * margin) + e * F.logsigmoid(-beta * margin)) / (1 - 2 * e)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown preference loss {loss_type!r}: sigmoid, ipo or robust")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             loss_type: PreferenceLossType = "sigmoid", label_smoothing: float = 0.0):
    """The mean preference loss of a batch of pairs (``preference_losses``), with its diagnostics.

    Returns (mean loss, per-pair log-ratio margin (pi_c - ref_c) - (pi_r - ref_r), per-pair reward accuracy).
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = preference_losses(margin, beta, loss_type, label_smoothing)
    return losses.mean(), margin.detach(), (margin > 0).float().detach()


@dataclass(frozen=True)
class PairScores:
    """A batch of pairs' summed answer log-probabilities under the policy and the reference, and their answers'
    token counts: each of shape ``(pairs, 2)``, chosen then rejected."""

    policy: Any
    reference: Any
    lengths: Any


@dataclass(frozen=True)
class PreferenceObjective:
    """The DPO job's objective: a preference loss (``preference_losses``) plus, with ``rpo_alpha`` > 0, that weight of
    the chosen answer's per-token negative log-likelihood (RPO, Pang et al. 2024: keeps the chosen answer's
    probability from falling with the rejected one's)."""

    beta: float
    loss_type: PreferenceLossType = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0

    def __call__(self, scores: PairScores) -> tuple[Any, dict[str, Any]]:
        """(the batch's mean loss, each pair's figures as TRL logs them, detached: ``loss``, ``rewards/chosen`` and
        ``rewards/rejected`` (beta x the log-ratio to the reference), ``logps/chosen``, ``logps/rejected`` and, with
        RPO, ``nll_loss``)."""
        policy, reference = scores.policy, scores.reference
        if self.loss_type == "ipo":  # IPO's margins are of per-token means (Azar et al.; TRL does the same)
            policy, reference = policy / scores.lengths, reference / scores.lengths
        chosen, rejected = policy[:, 0] - reference[:, 0], policy[:, 1] - reference[:, 1]
        losses = preference_losses(chosen - rejected, self.beta, self.loss_type, self.label_smoothing)
        figures = {"rewards/chosen": self.beta * chosen, "rewards/rejected": self.beta * rejected,
                   "logps/chosen": policy[:, 0], "logps/rejected": policy[:, 1]}
        if self.rpo_alpha > 0:
            nll = -scores.policy[:, 0] / scores.lengths[:, 0].clamp(min=1)
            losses = losses + self.rpo_alpha * nll
            figures["nll_loss"] = nll
        figures["loss"] = losses
        return losses.mean(), {name: value.detach().float() for name, value in figures.items()}


def summarize_pairs(figures: list[dict[str, Any]]) -> dict[str, float]:
    """The mean of each per-pair figure over every pair of ``figures`` (a list of ``PreferenceObjective`` outputs),
    with TRL's ``rewards/accuracies`` (the share whose chosen reward is higher) and ``rewards/margins``."""
    import torch

    joined = {name: torch.cat([f[name].flatten().cpu() for f in figures]) for name in figures[0]}
    out = {name: float(values.mean()) for name, values in joined.items()}
    out["rewards/accuracies"] = float((joined["rewards/chosen"] > joined["rewards/rejected"]).float().mean())
    out["rewards/margins"] = float((joined["rewards/chosen"] - joined["rewards/rejected"]).mean())
    return out
