"""The GRPO loss against TRL's own: `GRPOTrainer._compute_loss` (trl 1.16) is called on the same tensors, its
trainer state given as the attributes that method reads, its per-token log-probs as the tensor we differentiate.
Value and gradient within 1e-5 in float32, for each aggregation, with clip-higher, KL and truncated IS."""

from __future__ import annotations

import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from pipelines.train.grpo import (
    combine_rewards,
    completion_logps,
    group_advantages,
    grpo_loss,
    parity,
    truncated_is_weights,
)

B, T, P, G, L_MAX = 8, 7, 3, 4, 9


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) * 3
    old = logps + 0.3 * torch.randn(B, T, generator=g)  # ratios well outside [0.8, 1.28]: clipping happens
    ref = logps + 0.2 * torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    for i, n in enumerate([7, 3, 5, 1, 7, 6, 2, 4]):
        mask[i, n:] = 0
    rewards = torch.randn(B, generator=g)
    return logps, old, ref, mask, rewards


def trl_loss(loss_type, logps, old, ref, mask, advantages, *, eps, eps_high, beta, is_ratio=None):
    """TRL's `_compute_loss` on these tensors; `logps` plays the policy's per-token log-probs."""
    from accelerate import Accelerator
    from trl import GRPOTrainer

    def per_token_logps(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return logps, torch.zeros_like(logps), None

    state = SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high,
        use_vllm=is_ratio is not None, vllm_importance_sampling_correction=is_ratio is not None,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=L_MAX,
        accelerator=Accelerator(cpu=True), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(B, P, dtype=torch.long), "prompt_mask": torch.ones(B, P),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    return GRPOTrainer._compute_loss(state, None, inputs), state._metrics["train"]


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("eps_high,beta,tis", [(None, 0.0, False), (0.28, 0.0, False), (0.28, 0.04, False),
                                               (None, 0.1, True)])
def test_loss_value_and_gradient_match_trl(aggregation, eps_high, beta, tis):
    logps, old, ref, mask, rewards = batch(seed=zlib.crc32(repr((aggregation, eps_high, beta, tis)).encode()))
    adv = group_advantages(rewards, G, scale=aggregation != "dr_grpo")
    rollout = old + 0.05 * torch.randn(B, T)
    is_w = truncated_is_weights(old, rollout, mask, cap=2.0) if tis else None
    ours_in = logps.clone().requires_grad_(True)
    ours = grpo_loss(ours_in, old, adv, mask, ref_logps=ref, beta=beta, eps=0.2, eps_high=eps_high,
                     aggregation=aggregation, max_completion_length=L_MAX, is_weights=is_w)
    ours["loss"].backward()
    trl_in = logps.clone().requires_grad_(True)
    theirs, metrics = trl_loss(aggregation, trl_in, old, ref, mask, adv, eps=0.2,
                               eps_high=0.2 if eps_high is None else eps_high, beta=beta, is_ratio=is_w)
    theirs.backward()
    assert float(theirs) != 0.0
    assert float(ours["loss"]) == pytest.approx(float(theirs), abs=1e-5, rel=1e-5)
    assert torch.allclose(ours_in.grad, trl_in.grad, atol=1e-5, rtol=1e-5)
    assert ours_in.grad.abs().sum() > 0
    assert ours["clip_region"] == pytest.approx(metrics["clip_ratio/region_mean"][-1], abs=1e-6)
    assert 0 < ours["clip_region"] < 1  # the batch exercises clipping
    if beta:
        assert ours["kl"] == pytest.approx(metrics["kl"][-1], abs=1e-6)


def test_advantages_follow_trl_group_normalisation():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, 4)
    # group 1: mean 0.25, unbiased std 0.5 → (0.75 / 0.5001, -0.25 / 0.5001 ...); group 2: no spread → 0
    assert adv[:4].tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])
    assert adv[4:].tolist() == [0.0] * 4
    assert group_advantages(r, 4, scale=False)[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_unscorable_completions_get_no_advantage_and_leave_the_baseline():
    per_func = torch.tensor([[1.0, float("nan")], [0.0, 0.5], [float("nan"), float("nan")], [0.0, 0.0]])
    total = combine_rewards(per_func, [1.0, 2.0])
    assert total[:2].tolist() == [1.0, 1.0] and torch.isnan(total[2]) and total[3] == 0.0
    adv = group_advantages(total, 4, scale=False)
    assert adv.tolist() == pytest.approx([1 / 3, 1 / 3, 0.0, -2 / 3])  # baseline = mean of the three scored


def test_completion_logps_and_parity():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)
    ids = torch.tensor([[1, 2, 3], [4, 0, 0]])
    lp = completion_logps(logits, ids, temperature=0.5)
    assert lp[0, 1] == pytest.approx(float((logits[0, 1] / 0.5).log_softmax(-1)[2]))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    other = lp.clone()
    other[0, 2] += 0.3
    other[1, 2] += 9.0  # padding: never counted
    p = parity(lp, other, mask)
    assert p["max"] == pytest.approx(0.3, abs=1e-6) and p["mean"] == pytest.approx(0.3 / 4, abs=1e-6)
    assert p["tokens"] == 4


def test_dr_grpo_needs_the_length():
    logps, old, _, mask, rewards = batch(0)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, old, rewards, mask, aggregation="dr_grpo")
    with pytest.raises(ValueError, match="unknown aggregation"):
        grpo_loss(logps, old, rewards, mask, aggregation="bnpo2")
