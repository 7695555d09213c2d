"""Pure preference losses (torch only, imported inside): sigmoid DPO with label smoothing (cDPO) and IPO.

Inputs are per-pair summed log-probabilities of the completion tokens under the policy and the frozen reference.
"""

from __future__ import annotations

from typing import Any


def sequence_logps(logits, labels):
    """Sum and count of next-token log-probs over label tokens (-100 elsewhere), per sequence."""
    import torch

    logits, target = logits[:, :-1].float(), labels[:, 1:]
    mask = target != -100
    logps = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1), mask.sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, chosen_tokens=None,
             rejected_tokens=None) -> dict[str, Any]:
    """Per-pair losses and implicit rewards.

    sigmoid: -(1-ε)·logσ(β·Δ) - ε·logσ(-β·Δ), Δ = (πc - rc) - (πr - rr)   (ε = label_smoothing: cDPO)
    ipo:     (Δ' - 1/(2β))², Δ' the same difference with each side averaged per completion token (as TRL does)
    """
    import torch.nn.functional as F

    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  - label_smoothing * F.logsigmoid(-beta * delta))
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the completion token counts")
        avg = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return {"losses": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "margins": chosen_rewards - rejected_rewards,
            "accuracy": (chosen_rewards > rejected_rewards).float()}
