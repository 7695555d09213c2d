"""The GRPO family's pure parts (torch only, imported inside): per-token log-probs of sampled completions, group
advantages from per-function rewards, the clipped policy loss with its three aggregations, and the trainer-vs-
rollout parity figures.

Shapes: B completions (n prompts × G each, a prompt's G completions adjacent), T completion positions (padded),
`mask` [B, T] 1 on real completion tokens. Log-probs are of the sampled tokens.

    ratio  = exp(logp - old_logp)                       (old: the policy that sampled: the rollout version)
    token  = -min(ratio · A, clip(ratio, 1 - eps, 1 + eps_high) · A) + beta · KL_k3(ref || policy)
    grpo    : mean over sequences of the per-sequence token mean
    dapo    : token-level: sum over every token of the batch / tokens in the batch
    dr_grpo : sum over every token / (B · L_max), L_max the configured max completion length (no length bias;
              advantages without std normalisation)

The same formulas as TRL's GRPOTrainer (`_compute_loss`, `_generate_and_score_completions`, trl 1.16), which the
unit tests call on the same tensors.
"""

from __future__ import annotations

from typing import Any

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


def completion_logps(logits, completion_ids, temperature: float = 1.0):
    """log π(token) of each completion token from the logits that predict them ([B, T, V] → [B, T]), float32,
    with the logits divided by the sampling temperature (the distribution the rollout drew from, as TRL and
    vLLM's processed_logprobs compute it)."""
    import torch

    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.gather(logits.log_softmax(-1), 2, completion_ids.unsqueeze(-1)).squeeze(-1)


def combine_rewards(per_function, weights):
    """[B, F] rewards (NaN where a function returned None: not applicable) → [B] weighted sums over the
    functions that applied; NaN where none applied (an unscorable completion)."""
    import torch

    per_function = torch.as_tensor(per_function, dtype=torch.float32)
    w = torch.as_tensor(weights, dtype=torch.float32)
    total = (per_function * w.unsqueeze(0)).nansum(dim=1)
    total[torch.isnan(per_function).all(dim=1)] = float("nan")
    return total


def _nanstd(x, dim: int):
    import torch

    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    n = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    return (var * n / (n - 1)).sqrt().squeeze(dim)  # unbiased, as torch.std


def group_advantages(rewards, group_size: int, scale: bool = True, eps: float = 1e-4):
    """[B] rewards, G consecutive completions per prompt → [B] advantages: reward minus its group's mean, divided
    by the group's (unbiased) std + eps when `scale` (grpo, dapo; dr_grpo does not scale). An unscorable
    completion (NaN reward) is left out of its group's statistics and gets advantage 0."""
    import torch

    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    grouped = r.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    adv = r - mean
    if scale:
        std = _nanstd(grouped, 1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(r)
        adv = adv / (std + eps)
    return torch.nan_to_num(adv, nan=0.0)


def grpo_loss(logps, old_logps, advantages, mask, *, ref_logps=None, beta: float = 0.0, eps: float = 0.2,
              eps_high: float | None = None, aggregation: str = "grpo", max_completion_length: int | None = None,
              is_weights=None, token_normalizer: float | None = None) -> dict[str, Any]:
    """The clipped surrogate loss and its figures.

    logps [B, T] (the policy being trained, with gradient), old_logps [B, T] (the sampling policy), advantages
    [B], mask [B, T]; ref_logps [B, T] with beta > 0 (k3 estimator, as TRL). is_weights [B, T]: truncated
    importance-sampling weights (detached) multiplying each token's policy term. token_normalizer: dapo's token
    count when the batch is split over ranks or micro-batches (default: this batch's tokens).
    Returns {"loss", "clip_low", "clip_high", "clip_region", "kl"} (figures detached, token means)."""
    import torch

    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")
    if beta and ref_logps is None:
        raise ValueError("beta > 0 needs the reference log-probs")
    eps_high = eps if eps_high is None else eps_high
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = None
    if beta:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
    if aggregation == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif aggregation == "dapo":
        norm = mask.sum().clamp(min=1.0) if token_normalizer is None else max(float(token_normalizer), 1.0)
        loss = (per_token * mask).sum() / norm
    else:
        if not max_completion_length:
            raise ValueError("dr_grpo divides by B · max_completion_length: give max_completion_length")
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    n = mask.sum().clamp(min=1.0)
    with torch.no_grad():
        low = ((ratio < 1 - eps) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
        figures = {"clip_low": float((low * mask).sum() / n), "clip_high": float((high * mask).sum() / n),
                   "clip_region": float((torch.maximum(low, high) * mask).sum() / n),
                   "kl": float((kl * mask).sum() / n) if kl is not None else 0.0}
    return {"loss": loss, **figures}


def truncated_is_weights(old_logps, rollout_logps, mask, cap: float):
    """Truncated importance-sampling weights min(π_trainer_old / π_rollout, cap) per token (TRL's token_truncate):
    they correct for the rollout engine sampling from a slightly different distribution than the trainer's."""
    import torch

    diff = torch.nan_to_num((old_logps - rollout_logps) * mask, nan=0.0)
    return torch.clamp(torch.exp(diff), max=cap).detach()


def parity(trainer_logps, rollout_logps, mask) -> dict[str, float]:
    """Mean and max |log π_trainer − log π_rollout| over the sampled tokens (mask), and how many tokens."""

    m = mask.bool()
    diff = (trainer_logps.detach().float() - rollout_logps.float()).abs()[m]
    if not diff.numel():
        return {"mean": 0.0, "max": 0.0, "tokens": 0}
    return {"mean": float(diff.mean()), "max": float(diff.max()), "tokens": int(diff.numel())}
