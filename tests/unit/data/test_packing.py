"""Packing: bins respect the block size, and a packed block's loss equals its sequences' loss run alone."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.packing import IGNORE_INDEX, collate, first_fit_decreasing, pack_rows


def test_first_fit_decreasing_fills_and_respects_capacity():
    lengths = [70, 10, 50, 30, 40, 60, 20]
    bins = first_fit_decreasing(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 3  # 280 tokens: the fewest bins possible
    assert first_fit_decreasing(lengths, 100) == bins  # deterministic
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([101], 100)


def test_pack_rows_keeps_every_token():
    batch = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "labels": [[-100, 2, 3], [-100, 5], [-100, 7, 8, 9]]}
    packed = pack_rows(batch, 6)
    assert sum(packed["n_tokens"]) == 9 and all(n <= 6 for n in packed["n_tokens"])
    assert sorted(t for r in packed["input_ids"] for t in r) == list(range(1, 10))
    assert [sum(s) for s in packed["seq_lens"]] == [len(r) for r in packed["input_ids"]]


def test_collate_unpacked_pads_and_masks():
    b = collate({"input_ids": np.array([[5, 6, 7], [8]], dtype=object),
                 "labels": np.array([[-100, 6, 7], [8]], dtype=object)}, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_packed_mask_is_block_diagonal_causal():
    b = collate({"input_ids": [[1, 2, 3, 4, 5]], "labels": [[1, 2, 3, 4, 5]], "seq_lens": [[2, 3]]}, pad_id=0)
    assert b["position_ids"].tolist() == [[0, 1, 0, 1, 2]]
    assert b["labels"].tolist() == [[-100, 2, -100, 4, 5]]
    allowed = (b["attention_mask"][0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


@pytest.mark.integration  # builds the tiny model (~1 min on 2 cores); no Ray
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_token_weighted_loss_alone(tiny_model_dir, attn):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    vocab = model.config.vocab_size
    seqs = []
    for n in (7, 12, 5, 9):  # labels: prompt ignored, the rest learned
        ids = torch.randint(3, vocab, (n,)).tolist()
        seqs.append((ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3:]))
    packed = pack_rows({"input_ids": [s[0] for s in seqs], "labels": [s[1] for s in seqs]}, capacity=40)
    assert len(packed["input_ids"]) == 1 and len(packed["seq_lens"][0]) == 4
    # a second, shorter block in the same batch exercises padding of packed rows
    rows = {k: packed[k] + v for k, v in {"input_ids": [seqs[2][0]], "labels": [seqs[2][1]],
                                         "seq_lens": [[len(seqs[2][0])]]}.items()}
    with torch.no_grad():
        loss_packed = model(**collate({k: rows[k][:1] for k in rows}, pad_id=0)).loss.item()
        batch = collate(rows, pad_id=0)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        total, count = 0.0, 0
        for ids, lab in seqs:
            alone = model(input_ids=torch.tensor([ids]), labels=torch.tensor([lab])).loss.item()
            n = sum(1 for t in lab[1:] if t != IGNORE_INDEX)
            total, count = total + alone * n, count + n
    assert abs(loss_packed - total / count) < 1e-4, (loss_packed, total / count)
    # row 0 of the padded two-block batch gives the same logits as the block alone
    with torch.no_grad():
        one = collate({k: rows[k][:1] for k in rows}, pad_id=0)
        ref = model(**{k: v for k, v in one.items() if k != "labels"}).logits
    assert torch.allclose(logits[0, :ref.shape[1]], ref[0], atol=1e-4)
