"""Training options checked in-process on the tiny model (no Ray): the per-node 4-bit base cache, gradient
checkpointing, and bitsandbytes' 8-bit / paged 8-bit AdamW on the CPU backend.

    .venv/bin/python -m pytest tests/unit/train/test_training_options.py -q
"""

from __future__ import annotations

import warnings

import pytest

from pipelines.train.config import LoraSection, QuantSection, TrainSection

Q4 = QuantSection(load_in_4bit=True, compute_dtype="float32")
LORA = LoraSection(r=16, alpha=32, dropout=0.0, target_modules="all-linear")


def _batch(seed: int = 0, rows: int = 2, length: int = 24):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (rows, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _lora_model(model_dir: str, four_bit: bool, gradient_checkpointing: bool):
    from pipelines.train.base import attach_lora, load_base

    base = load_base(model_dir, "float32", Q4 if four_bit else QuantSection(), gradient_checkpointing)
    return attach_lora(base, LORA, seed=0).train()


def test_quantized_base_is_made_once_and_loaded_packed(tiny_model_dir, tmp_path, monkeypatch):
    """Local rank 0 quantizes and publishes; a rank that finds the cache loads uint8 weights and quantizes
    nothing; both hold bit-identical frozen weights; the cache is keyed by the quant settings."""
    import bitsandbytes.functional as bnbf
    from safetensors import safe_open

    from pipelines.train.base import checksum, load_quantized_shared, prepare_base

    quantized = []
    real = bnbf.quantize_4bit
    monkeypatch.setattr(bnbf, "quantize_4bit", lambda A, *a, **k: quantized.append(A.shape) or real(A, *a, **k))
    barriers = []
    first, source, folder = load_quantized_shared(tiny_model_dir, Q4, tmp_path, local_rank=0,
                                                  barrier=lambda: barriers.append(1))
    assert source == "quantized-here" and len(quantized) == 14  # 2 layers × 7 linear modules
    assert folder.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [folder.name]  # no tmp left
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        linear = [k for k in f.keys() if k.endswith("_proj.weight")]
        assert len(linear) == 14 and {f.get_slice(k).get_dtype() for k in linear} == {"U8"}

    quantized.clear()
    other, source, again = load_quantized_shared(tiny_model_dir, Q4, tmp_path, local_rank=1,
                                                 barrier=lambda: barriers.append(1))
    assert source == "prequantized-cache" and again == folder and quantized == []
    assert type(other.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert checksum(first.parameters()) == checksum(other.parameters())
    assert checksum(prepare_base(first, Q4, False).parameters()) == checksum(
        prepare_base(other, Q4, False).parameters())

    _, source, _ = load_quantized_shared(tiny_model_dir, Q4, tmp_path, local_rank=0, barrier=lambda: None)
    assert source == "prequantized-cache" and quantized == []  # a later run on this node reuses it
    assert barriers == [1, 1]  # every call meets the barrier exactly once, whatever it found

    fp4 = QuantSection(load_in_4bit=True, compute_dtype="float32", quant_type="fp4")
    _, source, fp4_folder = load_quantized_shared(tiny_model_dir, fp4, tmp_path, local_rank=0, barrier=lambda: None)
    assert source == "quantized-here" and fp4_folder != folder


@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_base_computes_the_same_after_eval_and_save(tiny_model_dir, tmp_path, double_quant):
    """A 4-bit base gives the same logits fresh, after an eval pass and a save, and loaded back from that save:
    bitsandbytes' AVX512-BF16 CPU repacking (lossy when a model is saved) stays off (train.base)."""
    import torch

    from pipelines.train.base import _from_pretrained

    q = QuantSection(load_in_4bit=True, compute_dtype="float32", double_quant=double_quant)
    ids = torch.arange(5, 40)[None]
    model = _from_pretrained(tiny_model_dir, "float32", q).eval()
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(layers) == 14 and not any(m.support_avx512bf16_for_cpu for m in layers)
    with torch.no_grad():
        fresh = model(input_ids=ids).logits
        model.save_pretrained(tmp_path / "q", safe_serialization=True)
        after_save = model(input_ids=ids).logits
        loaded = _from_pretrained(tmp_path / "q", "float32", q, quantize=False).eval()(input_ids=ids).logits
    assert torch.equal(fresh, after_save) and torch.equal(fresh, loaded)


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32-base", "nf4-base"])
def test_gradient_checkpointing_same_loss_and_lora_grads(tiny_model_dir, four_bit):
    """Recomputing activations changes memory, not maths; and it really recomputes: a layer's MLP forward runs
    twice per step (forward hooks do not fire during the recompute, so the forward itself is counted)."""
    results = {}
    for gc in (False, True):
        model = _lora_model(tiny_model_dir, four_bit, gc)
        calls, mlp = [], model.base_model.model.model.layers[0].mlp
        forward = mlp.forward
        mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
        loss = model(**_batch()).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values())
        results[gc] = (loss.item(), grads, len(calls), model.base_model.model.is_gradient_checkpointing)
    (loss0, g0, calls0, on0), (loss1, g1, calls1, on1) = results[False], results[True]
    assert (on0, on1) == (False, True) and (calls0, calls1) == (1, 2)
    assert abs(loss0 - loss1) < 1e-5
    assert g0.keys() == g1.keys()
    assert max(float((g0[k] - g1[k]).abs().max()) for k in g0) < 1e-5
    assert max(float(g.abs().max()) for g in g0.values()) > 1e-4  # the comparison is not between zeros


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_adamw_keeps_uint8_state_and_lowers_loss(tiny_model_dir, name):
    """bitsandbytes keeps 8-bit state for tensors of at least min_8bit_size (4096) elements and 32-bit state
    for smaller ones. The paged variant warns that paging is unsupported on CPU and falls back to ordinary
    (non-paged) uint8 buffers."""
    import bitsandbytes as bnb
    import torch

    from pipelines.train.engine import make_optimizer

    model = _lora_model(tiny_model_dir, False, False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, TrainSection(optimizer=name, lr=5e-3))
    assert type(opt) is (bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit)
    batch, losses = _batch(seed=1), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
    paged_warnings = [w for w in caught if "Paged optimizers are not supported on CPU" in str(w.message)]
    assert len(paged_warnings) == (1 if name.startswith("paged") else 0)
    assert opt.is_paged == name.startswith("paged")
    big = [p for p in params if p.numel() >= 4096]
    small = [p for p in params if p.numel() < 4096]
    assert big and small
    for p in big:
        st = opt.state[p]
        assert st["state1"].dtype == st["state2"].dtype == torch.uint8
        assert not getattr(st["state1"], "is_paged", False)  # CPU: an ordinary tensor, not paged memory
    for p in small:
        assert opt.state[p]["state1"].dtype == torch.float32
    assert losses[-1] < losses[0] - 0.1, losses


def test_deepspeed_accelerator_follows_the_workers_device(monkeypatch):
    """Per worker, from the device it holds: a CPU is cpu, a GPU cuda; a user's DS_ACCELERATOR wins. Outside Ray
    (a local run, a plain process) a CUDA machine is cuda, not cpu (W5)."""
    import os

    import torch

    from pipelines.train.engine import accelerator_for, select_accelerator

    assert accelerator_for("cpu") == "cpu"
    assert accelerator_for(torch.device("cuda", 1)) == accelerator_for("cuda:0") == "cuda"
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    assert select_accelerator() == "xpu"
    monkeypatch.delenv("DS_ACCELERATOR")
    assert select_accelerator() == "cpu"  # this machine: no Ray Train session, no CUDA
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_accelerator() == "cuda"
    assert os.environ["DS_ACCELERATOR"] == "cuda"


def test_a_node_without_the_drivers_model_folder_resolves_model_name_itself(tiny_model_dir, tmp_path, monkeypatch):
    """A worker on a node that lacks the driver's model folder (no shared storage) gets its own copy of model.name
    (a built-in is built, a hub id downloaded, there); a local folder only the driver had is a clear refusal."""
    from pathlib import Path

    from pipelines.artifacts.models import on_this_node
    from pipelines.schema import MissingInput
    from pipelines.train.config import WorkerJob

    assert on_this_node(tiny_model_dir, "tiny-llama") == tiny_model_dir  # this node has the folder
    gone = str(tmp_path / "driver-only" / "tiny-llama")
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "node-b"))  # node b's cache, its built-in already built
    (tmp_path / "node-b" / "models").mkdir(parents=True)
    (tmp_path / "node-b" / "models" / "tiny-llama").symlink_to(tiny_model_dir)
    job = WorkerJob(model_dir=gone, model_name="tiny-llama", dtype="float32", quant=QuantSection(),
                    train=TrainSection(), storage=str(tmp_path / "ray_train")).on_node()
    assert job.model_dir.startswith(str(tmp_path / "node-b")) and Path(job.model_dir, "config.json").is_file()
    with pytest.raises(MissingInput, match="is not on node .*name a hub id"):
        on_this_node(gone, gone)
