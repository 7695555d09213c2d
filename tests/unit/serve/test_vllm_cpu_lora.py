"""The grouped CPU multi-LoRA ops (serve/vllm_cpu_lora.py) against a per-token reference, in plain torch."""

from __future__ import annotations

import pytest
import torch

from serve import vllm_cpu_lora


def reference(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """What the GPU kernels compute: row t = inputs[t] @ weights[indices[t]].T, and nothing for index -1."""
    w = weights.squeeze(1) if weights.dim() == 4 else weights
    rows = [inputs[t] @ w[i].t() if i >= 0 else torch.zeros(w.shape[1]) for t, i in enumerate(indices.tolist())]
    return torch.stack(rows)


@pytest.fixture
def ops():
    def unused(*args):
        raise AssertionError("the fallback to vLLM's own op was taken")

    return vllm_cpu_lora.make_ops({name: unused for name in vllm_cpu_lora._OPS})


@pytest.fixture
def stacks():
    torch.manual_seed(0)
    slots, rank, hidden = 5, 8, 32
    a = torch.randn(slots, 1, rank, hidden)
    b = torch.randn(slots, 1, hidden, rank)
    a[3].zero_(), b[3].zero_()  # an empty slot, as vLLM leaves it
    return a, b


@pytest.mark.parametrize("indices", [
    [0, 1, 2, 4, 0, 1, -1, 2, 2, -1, 4, 0],  # a mixed batch: several adapters and base rows
    [2] * 12,                                 # one adapter for the whole batch
    [-1] * 12,                                # base only
    [3, -1, 3, 3, -1, 3, 3, 3, 3, 3, 3, 3],   # an adapter whose slot is all zeros
])
def test_ops_match_per_token_reference(ops, stacks, indices):
    a, b = stacks
    idx = torch.tensor(indices)
    x = torch.randn(len(indices), a.shape[-1])
    shrunk = torch.full((len(indices), a.shape[2]), 7.0)  # stale values must be overwritten
    ops["bgmv_shrink"](x, a, shrunk, idx, 0.5)
    assert torch.allclose(shrunk, 0.5 * reference(x, a, idx), atol=1e-5)

    base_out = torch.randn(len(indices), 3 * a.shape[-1])
    out = base_out.clone()
    ops["bgmv_expand_slice"](shrunk, b, out, idx, a.shape[-1], a.shape[-1], True)
    want = base_out.clone()
    want[:, a.shape[-1]: 2 * a.shape[-1]] += reference(shrunk, b, idx)
    assert torch.allclose(out, want, atol=1e-5)

    out = torch.randn(len(indices), a.shape[-1])
    ops["bgmv_expand"](shrunk, b, out, idx, False)
    assert torch.allclose(out, reference(shrunk, b, idx), atol=1e-5)


def test_no_adapter_rows_get_no_delta_even_when_every_slot_is_full(ops, stacks):
    """vllm#48421: vLLM 0.32's CPU ops index weights[-1], handing base rows the last slot's adapter."""
    a, _ = stacks
    a[3].normal_()  # every slot now holds an adapter
    idx = torch.tensor([0, -1, 4, -1])
    x = torch.randn(4, a.shape[-1])
    out = torch.zeros(4, a.shape[2])
    ops["bgmv_shrink"](x, a, out, idx, 1.0)
    assert torch.equal(out[1], torch.zeros(a.shape[2])) and torch.equal(out[3], torch.zeros(a.shape[2]))
    assert torch.allclose(out[2], x[2] @ a[4, 0].t(), atol=1e-5)
    per_token_gather = torch.einsum("bi,boi->bo", x, a.squeeze(1)[idx])  # what vLLM's own op computes
    assert not torch.allclose(per_token_gather[1], out[1])


def test_caches_follow_new_indices_and_reloaded_slots(ops, stacks):
    """Plans are matched by content and live-slot sets by version: a reused buffer or a slot loaded in place
    must never return the previous answer."""
    a, _ = stacks
    x = torch.randn(6, a.shape[-1])
    buf = torch.tensor([0, 0, 1, 1, 3, 3])
    out = torch.zeros(6, a.shape[2])
    ops["bgmv_shrink"](x, a, out, buf, 1.0)
    assert torch.allclose(out, reference(x, a, buf), atol=1e-5) and not out[4:].any()

    buf.copy_(torch.tensor([3, 3, 0, 0, 1, -1]))  # same tensor, new content (vLLM refills its index buffer)
    a[3, 0, :, :].copy_(torch.randn(a.shape[2], a.shape[3]))  # an adapter loaded into the empty slot in place
    ops["bgmv_shrink"](x, a, out, buf, 1.0)
    assert torch.allclose(out, reference(x, a, buf), atol=1e-5) and out[:2].any()


def test_shapes_it_was_not_written_for_go_to_vllms_op(stacks):
    a, _ = stacks
    called = []
    ops = vllm_cpu_lora.make_ops({name: (lambda *args, n=name: called.append(n)) for name in vllm_cpu_lora._OPS})
    ops["bgmv_shrink"](torch.randn(3, a.shape[-1]), a, torch.zeros(3, a.shape[2]), torch.tensor([0, 1]), 1.0)
    assert called == ["bgmv_shrink"]


def test_registered_as_a_vllm_plugin():
    from importlib.metadata import entry_points

    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("loraforge_cpu_lora") == "serve.vllm_cpu_lora:register"


class _Wrapper:
    """The two index tensors of vLLM's PunicaWrapperCPU that add_lora_logits reads (one request per row of
    `sampler_indices`, one step token per row of `token_lora_indices`)."""

    def __init__(self, sampler, tokens):
        self.sampler_indices, self.token_lora_indices = torch.tensor(sampler), torch.tensor(tokens)


def _logits_stacks(vocab: int = 40, hidden: int = 16, rank: int = 4, live: tuple[int, ...] = (0, 2)):
    torch.manual_seed(1)
    a, b = torch.zeros(3, 1, rank, hidden), torch.zeros(3, 1, vocab, rank)
    for slot in live:  # an adapter that trains the LM head
        a[slot].normal_(), b[slot].normal_()
    return a, b


def test_prompt_logprob_rows_take_their_request_adapter(ops):
    """The shapes that killed the engine: a step of 3 requests (tokens 20 + 51 + 9), prompt log-probs for the
    second one, so the logits op gets 51 rows while sampler_indices has 3 (vLLM's op: einsum size 3 vs 51)."""
    a, b = _logits_stacks()
    tokens = [0] * 20 + [2] * 51 + [-1] * 9
    hidden = torch.randn(80, a.shape[-1])
    rows = hidden[20:71]
    add = vllm_cpu_lora.make_add_lora_logits(ops["bgmv_shrink"], ops["bgmv_expand"])
    vllm_cpu_lora._prompt_pass.append(hidden)
    try:
        y = torch.zeros(51, b.shape[2])
        add(_Wrapper([0, 2, -1], tokens), y, rows, a, b, 1.0)
    finally:
        vllm_cpu_lora._prompt_pass.clear()
    want = reference(reference(rows, a, torch.full((51,), 2)), b, torch.full((51,), 2))
    assert torch.allclose(y, want, atol=1e-4)


def test_sampled_rows_use_sampler_indices(ops):
    a, b = _logits_stacks()
    x = torch.randn(3, a.shape[-1])
    y = torch.zeros(3, b.shape[2])
    add = vllm_cpu_lora.make_add_lora_logits(ops["bgmv_shrink"], ops["bgmv_expand"])
    add(_Wrapper([0, -1, 2], [0] * 5 + [-1] * 4 + [2] * 7), y, x, a, b, 1.0)
    idx = torch.tensor([0, -1, 2])
    assert torch.allclose(y, reference(reference(x, a, idx), b, idx), atol=1e-4) and not y[1].any()


def test_untrained_head_adds_nothing_whatever_the_rows():
    """Adapters that leave the LM head alone (the usual case): no delta, no row mapping needed."""
    a, b = _logits_stacks(live=())
    y = torch.randn(51, b.shape[2])
    before = y.clone()

    def unused(*args, **kwargs):
        raise AssertionError("no op should run for an all-zero head")

    add = vllm_cpu_lora.make_add_lora_logits(unused, unused)
    add(_Wrapper([0, 1, -1], [0] * 80), y, torch.randn(51, a.shape[-1]), a, b, 1.0)
    assert torch.equal(y, before)


def test_rows_that_are_not_a_slice_of_the_prompt_pass_are_refused():
    hidden = torch.randn(10, 4)
    with pytest.raises(RuntimeError, match="which adapter"):
        vllm_cpu_lora.logits_indices(torch.randn(5, 4), torch.tensor([0, 1]), torch.zeros(10, dtype=torch.long),
                                     hidden)
    got = vllm_cpu_lora.logits_indices(hidden[2:7], torch.tensor([0, 1]), torch.arange(10), hidden)
    assert got.tolist() == [2, 3, 4, 5, 6]
