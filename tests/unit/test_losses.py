"""DPO/IPO/cDPO losses on hand-checked numbers."""

import math

import pytest
import torch

from pipelines.train.losses import dpo_loss, sequence_logps


def test_sigmoid_dpo_by_hand():
    out = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    delta = (-1 + 2) - (-3 + 2)  # 2
    assert float(out["losses"][0]) == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * delta))))
    assert float(out["chosen_rewards"][0]) == pytest.approx(0.5) and float(out["rejected_rewards"][0]) == -0.5
    assert float(out["accuracy"][0]) == 1.0 and float(out["margins"][0]) == pytest.approx(1.0)


def test_label_smoothing_is_cdpo():
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    plain = float(dpo_loss(*args, beta=0.5)["losses"][0])
    flipped = float(dpo_loss(args[1], args[0], args[3], args[2], beta=0.5)["losses"][0])
    smoothed = float(dpo_loss(*args, beta=0.5, label_smoothing=0.2)["losses"][0])
    assert smoothed == pytest.approx(0.8 * plain + 0.2 * flipped)


def test_ipo_is_length_normalised():
    out = dpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([-6.0]), torch.tensor([-6.0]), beta=0.25,
                   loss_type="ipo", chosen_tokens=torch.tensor([4]), rejected_tokens=torch.tensor([2]))
    assert float(out["losses"][0]) == pytest.approx((2 / 4 - 0 - 1 / (2 * 0.25)) ** 2)
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1,
                 loss_type="ipo")


def test_sequence_logps_counts_only_labels():
    logits = torch.zeros(1, 4, 3)  # uniform: every token log(1/3)
    labels = torch.tensor([[-100, -100, 1, 2]])
    s, n = sequence_logps(logits, labels)
    assert int(n[0]) == 2 and float(s[0]) == pytest.approx(2 * math.log(1 / 3))
