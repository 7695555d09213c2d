"""Pure training losses (torch only, imported inside): the lean next-token loss over label tokens (SFT's
cross-entropy and DPO's per-sequence log-probs, from hidden states, chunked), the plain full-logits form it is
exact against, and the preference losses: sigmoid DPO with label smoothing (cDPO) and IPO, ORPO, SimPO and KTO.

Their inputs are per-sequence summed log-probabilities of the completion tokens (and the token counts where a
method averages them) under the policy and, for DPO and KTO, the frozen reference. Each equals TRL's own loss on
the same batch (tests/unit/train/test_align_losses.py calls TRL's code).
"""

from __future__ import annotations

from typing import Any

from pipelines.data.packing import IGNORE_INDEX


def sequence_logps(logits, labels):
    """Sum and count of next-token log-probs over label tokens (-100 elsewhere), per sequence."""
    import torch

    logits, target = logits[:, :-1].float(), labels[:, 1:]
    mask = target != IGNORE_INDEX
    logps = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1), mask.sum(-1)


# Lean next-token loss: only label positions reach the LM head, a chunk at a time, each chunk recomputed in
# backward (torch.utils.checkpoint), so no [tokens, vocab] float32 logits exist for the whole micro-batch.
LEAN_CHUNK_TOKENS = 128  # TrainSection.loss_chunk_tokens' default; the DPO reference pass uses it too


def label_positions(labels):
    """(row, position, target) of every predicting token: position t predicts labels[t + 1]; -100 is ignored."""
    target = labels[:, 1:]
    rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols, target[rows, cols]


def _chunk_logps(head, hidden, target):
    import torch.nn.functional as F

    return -F.cross_entropy(head(hidden).float(), target, reduction="none")


def label_logps(hidden, head, labels, chunk_tokens: int = LEAN_CHUNK_TOKENS):
    """Log-prob of each label token from the final hidden states [B, T, H] and the LM head (the module, called,
    so ZeRO-3's gathering hooks and tied embeddings work); returns (logps [N], row of each [N]).
    chunk_tokens <= 0: one chunk (the whole selection at once)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    rows, cols, target = label_positions(labels)
    picked = hidden[rows, cols]  # prompt and padding positions never reach the head
    n = picked.shape[0]
    step = chunk_tokens if chunk_tokens > 0 else max(n, 1)
    recompute = torch.is_grad_enabled() and picked.requires_grad
    parts = []
    for s in range(0, n, step) if n else [0]:  # an empty selection still yields a loss tied to the graph
        h, t = picked[s:s + step], target[s:s + step]
        # determinism_check off: a frozen head weight is saved as the parameter itself, and under ZeRO-3 it is
        # partitioned (shape [0]) whenever the check reads it, gathered again before its backward runs; the
        # check then fails on a correct recompute (the ZeRO-3 gradients match the plain loss's to 1e-7).
        parts.append(checkpoint(_chunk_logps, head, h, t, use_reentrant=False, preserve_rng_state=False,
                                determinism_check="none") if recompute else _chunk_logps(head, h, t))
    return torch.cat(parts), rows


def lean_cross_entropy(hidden, head, labels, chunk_tokens: int = LEAN_CHUNK_TOKENS):
    """Sum of next-token cross-entropy over label tokens, and their count: `F.cross_entropy(..., reduction="sum")`
    over the full logits, without them."""
    logps, rows = label_logps(hidden, head, labels, chunk_tokens)
    return -logps.sum(), int(rows.numel())


def lean_sequence_logps(hidden, head, labels, chunk_tokens: int = LEAN_CHUNK_TOKENS):
    """`sequence_logps` from hidden states: per-sequence sum and count of label-token log-probs."""
    import torch

    logps, rows = label_logps(hidden, head, labels, chunk_tokens)
    sums = torch.zeros(labels.shape[0], dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    return sums, (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def hidden_and_head(model, inputs: dict[str, Any]):
    """The final hidden states [B, T, H] of a causal LM (PEFT-wrapped, under DDP or a DeepSpeed engine) and its
    LM head. The forward goes through the outer wrapper, so DDP's gradient sync and DeepSpeed's hooks see it as
    usual; `logits_to_keep=1` keeps its own head to one position, and a hook on the decoder takes the states."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine -> the PeftModel (or a bare model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if getattr(base.config, "final_logit_softcapping", None) or getattr(base.config, "logit_scale", None):
        # such models transform the head's output inside their forward; the lean loss would skip that
        raise ValueError(f"{type(base).__name__} rescales its logits after the LM head: set "
                         "train.loss_chunk_tokens=0 (the plain loss)")
    seen: dict[str, Any] = {}

    def grab(module, args, output):
        seen["hidden"] = output[0]  # last_hidden_state: after the final norm, what the head reads

    handle = base.get_decoder().register_forward_hook(grab)
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return seen["hidden"], base.get_output_embeddings()


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


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _mean_logps(total, tokens):
    return total / tokens.clamp(min=1)


def pair_metrics(chosen_rewards, rejected_rewards) -> dict[str, Any]:
    """Rewards, margins and reward accuracy of paired methods (detached)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "margins": chosen_rewards - rejected_rewards, "accuracy": (chosen_rewards > rejected_rewards).float()}


def orpo_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, *, lam: float = 0.1
              ) -> dict[str, Any]:
    """ORPO (Hong et al. 2024), no reference model: per-pair losses whose mean is
        L = NLL(y_w) - λ · mean log σ(log odds(y_w) - log odds(y_l)),
    odds(y) = p/(1-p) with log p the mean completion-token log-prob; NLL the cross-entropy over every chosen
    completion token of the batch (one token-weighted mean, as TRL's and the paper's code take it). λ is TRL's
    ORPOConfig.beta. Rewards (for accuracy and margins) are λ · mean log-prob, as TRL logs them."""
    import torch.nn.functional as F

    chosen, rejected = _mean_logps(policy_chosen, chosen_tokens), _mean_logps(policy_rejected, rejected_tokens)
    chosen, rejected = chosen.clamp(max=-1e-9), rejected.clamp(max=-1e-9)  # p = 1 exactly: log odds = inf
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = -policy_chosen.sum() / chosen_tokens.sum().clamp(min=1)
    return {"losses": nll - lam * ratio, "nll": nll.detach(), "log_odds_ratio": ratio.detach(),
            "log_odds": log_odds.detach(), **pair_metrics(lam * chosen, lam * rejected)}


def simpo_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, *, beta: float = 2.0,
               gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0) -> dict[str, Any]:
    """SimPO (Meng et al. 2024), no reference model, length-normalised:
        L = -log σ(β/|y_w| · log p(y_w) - β/|y_l| · log p(y_l) - γ),   γ = gamma_beta_ratio · β
    (label_smoothing: the conservative form, as DPO's cDPO). TRL's CPOTrainer(loss_type="simpo") with
    simpo_gamma = γ and cpo_alpha = 0 is the same loss. Rewards: β · mean log-prob."""
    import torch.nn.functional as F

    chosen, rejected = _mean_logps(policy_chosen, chosen_tokens), _mean_logps(policy_rejected, rejected_tokens)
    logits = (chosen - rejected) - gamma_beta_ratio
    losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits))
    return {"losses": losses, **pair_metrics(beta * chosen, beta * rejected)}


def kto_kl(policy_kl, ref_kl, reduce=None):
    """KTO's reference point z0: the mean log-ratio of mismatched (prompt, completion) pairs, detached and
    clamped at zero; `reduce` averages it over the data-parallel ranks first (as TRL gathers it)."""
    kl = (policy_kl - ref_kl).mean().detach()
    if reduce is not None:
        kl = reduce(kl)
    return kl.clamp(min=0)


def kto_loss(policy, ref, desirable, kl, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> dict[str, Any]:
    """KTO (Ethayarajh et al. 2024) over unpaired rows, r = log π(y|x) - log π_ref(y|x):
        desirable:   w_D · (1 - σ(β (r - z0)))      undesirable:   w_U · (1 - σ(β (z0 - r)))
    `kl` is z0 (kto_kl). Per-row losses; their mean is TRL's KTOTrainer loss. Rewards: β · r."""
    import torch

    ratio = policy - ref
    desirable = desirable.bool()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    rewards = beta * ratio.detach()
    d, u = desirable.float(), (~desirable).float()
    mean_d = (rewards * d).sum() / d.sum().clamp(min=1)
    mean_u = (rewards * u).sum() / u.sum().clamp(min=1)
    both = bool(d.sum() > 0 and u.sum() > 0)
    return {"losses": losses, "rewards": rewards, "kl": kl.detach(),
            "margin": (mean_d - mean_u) if both else None,
            # a desirable row's reward above z0's, an undesirable one's below it: the sign KTO pushes towards
            "accuracy": torch.where(desirable, rewards > beta * kl, rewards < beta * kl).float()}
