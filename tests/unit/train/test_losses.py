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


# The lean loss (label positions only, chunked through the head, recomputed in backward) against the plain one.

V_SMOL = 49152  # SmolLM2's vocabulary


def _plain_ce(hidden, head, labels):
    import torch.nn.functional as F

    logits = head(hidden)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


def _labels(rows: int, length: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    labels[torch.rand(rows, length, generator=g) < 0.3] = -100  # scattered ignored tokens
    labels[:, :3] = -100  # a prompt
    labels[-1] = -100  # one row with every label masked
    return labels


def _grads(fn, hidden, head):
    hidden.grad, head.weight.grad = None, None
    value = fn()
    value.sum().backward()
    return value.detach(), hidden.grad.clone(), head.weight.grad.clone()


@pytest.mark.parametrize("chunk", [1, 7, 13, 0, 10_000])  # 7 and 13 do not divide the label count
def test_lean_cross_entropy_is_exact(chunk):
    from pipelines.train.losses import lean_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 8, requires_grad=True)
    head = torch.nn.Linear(8, 50, bias=False)
    labels = _labels(3, 11, 50)
    ref = _grads(lambda: _plain_ce(hidden, head, labels), hidden, head)
    got = _grads(lambda: lean_cross_entropy(hidden, head, labels, chunk)[0], hidden, head)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert lean_cross_entropy(hidden, head, labels, chunk)[1] == int((labels[:, 1:] != -100).sum())
    assert float(hidden.grad[-1].abs().max()) == 0  # the all-masked row gets no gradient


@pytest.mark.parametrize("chunk", [1, 5, 0])
def test_lean_sequence_logps_is_exact(chunk):
    from pipelines.train.losses import lean_sequence_logps

    torch.manual_seed(1)
    hidden = torch.randn(4, 9, 8, requires_grad=True)
    head = torch.nn.Linear(8, 30, bias=False)
    labels = _labels(4, 9, 30, seed=1)
    ref = _grads(lambda: sequence_logps(head(hidden), labels)[0], hidden, head)
    got = _grads(lambda: lean_sequence_logps(hidden, head, labels, chunk)[0], hidden, head)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    lean_counts = lean_sequence_logps(hidden, head, labels, chunk)[1]
    assert lean_counts.tolist() == sequence_logps(head(hidden), labels)[1].tolist()
    assert float(got[0][-1]) == 0.0


def test_lean_loss_with_no_label_at_all_still_backpropagates():
    from pipelines.train.losses import lean_cross_entropy

    hidden = torch.randn(2, 5, 4, requires_grad=True)
    total, n = lean_cross_entropy(hidden, torch.nn.Linear(4, 7), torch.full((2, 5), -100), 2)
    total.backward()
    assert n == 0 and float(total.detach()) == 0 and float(hidden.grad.abs().sum()) == 0


def _tiny_peft_llama(tied: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             init_lora_weights=False))
    return model.float()


def _lora_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    total, n, _ = loss_fn()
    total.backward()
    return total.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_sft_loss_on_a_peft_llama_matches_the_plain_one(packed, tied):
    """causal_lm_loss, lean (chunks of 5) vs plain: same value and LoRA gradients, padded and packed rows."""
    from pipelines.data.packing import collate
    from pipelines.train.sft import causal_lm_loss

    model = _tiny_peft_llama(tied)
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (12, 7, 9)]
    labels = [[-100] * 4 + x[4:] for x in ids]
    rows = {"input_ids": ids, "labels": labels}
    if packed:
        rows = {"input_ids": [ids[0] + ids[1], ids[2]], "labels": [labels[0] + labels[1], labels[2]],
                "seq_lens": [[12, 7], [9]]}
    batch = collate(rows, pad_id=0)
    assert ("position_ids" in batch) == packed
    ref = _lora_grads(model, lambda: causal_lm_loss(model, batch, chunk_tokens=0))
    got = _lora_grads(model, lambda: causal_lm_loss(model, batch, chunk_tokens=5))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    assert got[1] == ref[1] > 0
    assert got[2].keys() == ref[2].keys() and len(ref[2]) > 10
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], rtol=1e-5, atol=1e-5)


def test_dpo_policy_logps_on_a_peft_llama_match_the_plain_ones():
    from pipelines.data.chat import pad_batch
    from pipelines.train.dpo import policy_logps

    model = _tiny_peft_llama(tied=True)
    rows = [(list(range(5, 15)), [-100] * 6 + list(range(11, 15))),
            (list(range(20, 27)), [-100] * 3 + list(range(23, 27)))]
    batch = {k: torch.tensor(v, dtype=torch.long) for k, v in pad_batch(rows, 0).items()}
    plain, n_plain = policy_logps(model, batch, chunk_tokens=0)
    lean, n_lean = policy_logps(model, batch, chunk_tokens=3)
    torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-5)
    assert n_lean.tolist() == n_plain.tolist() == [4, 4]


def _peaks(fn, params) -> tuple[int, int]:
    """(a) Peak bytes the CPU allocator held over a forward and backward (torch profiler memory events: each op's
    own allocations and frees, in time order), what the logits and their gradients really take; (b) bytes autograd
    saved for backward during the forward (saved_tensors_hooks, deduplicated by storage, parameters excluded)."""
    from torch.profiler import ProfilerActivity, profile

    skip = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            value = fn()
        value.backward()
    live = peak = 0
    for _, nbytes in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                            if e.self_cpu_memory_usage):
        live += nbytes
        peak = max(peak, live)
    return peak, sum(saved.values())


def test_lean_loss_memory_is_a_quarter_of_the_plain_one_at_smollm2_vocab():
    """Two 512-token rows, a 64-token prompt each, vocab 49,152, the default chunk: the lean loss's logits memory
    (forward + backward peak) is at most 1/4 of the plain loss's, and what it keeps for backward far less."""
    from pipelines.train.losses import LEAN_CHUNK_TOKENS, lean_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(64, V_SMOL, bias=False).requires_grad_(False)  # frozen, as under LoRA
    labels = torch.randint(0, V_SMOL, (2, 512))
    labels[:, :64] = -100
    hidden = torch.randn(2, 512, 64, requires_grad=True)
    plain_peak, plain_saved = _peaks(lambda: _plain_ce(hidden, head, labels), head.parameters())
    lean_peak, lean_saved = _peaks(lambda: lean_cross_entropy(hidden, head, labels, LEAN_CHUNK_TOKENS)[0],
                                   head.parameters())
    full = 2 * 511 * V_SMOL * 4  # bytes of the float32 logits of both rows
    assert plain_peak >= 2 * full and plain_saved >= full  # log-softmax and its gradient; log-softmax kept
    assert lean_peak <= plain_peak / 4, (lean_peak, plain_peak)
    assert lean_saved <= plain_saved / 100, (lean_saved, plain_saved)
