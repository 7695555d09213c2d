"""Pure training losses (torch only, imported inside): the lean next-token loss over label tokens (SFT's
cross-entropy and DPO's per-sequence log-probs, from hidden states, chunked), the plain full-logits form it is
exact against, and sigmoid DPO with label smoothing (cDPO) and IPO.

DPO's inputs are per-pair summed log-probabilities of the completion tokens under the policy and the frozen
reference.
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
