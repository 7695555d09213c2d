"""The GPU path's first-step failures and slow spots, seen from a CPU (../shared/GPU_CHECK.md B1-B5, W1-W8).

Where the failure is a device mix, the GPU side is a `FakeTensorMode` CUDA tensor (no GPU needed) or the device
the code is handed; what only a GPU can show is in bench/gpu_check.py.
"""

from __future__ import annotations

import pytest
import torch

from pipelines.train import worker


class _Stop(Exception):
    pass


class _GpuWorker:
    world_rank, world_size = 0, 1
    device = torch.device("cuda", 0)


def test_all_sum_reduces_cuda_tensors_under_nccl(monkeypatch):
    """B1: Ray Train's group on GPU workers is NCCL-only, which reduces CUDA tensors only; gloo CPU tensors."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pipelines.train.engine import all_sum

    seen = []

    def reduce(t, *a, **k):
        seen.append(t.device)
        raise _Stop  # a fake tensor has no values to read back

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(dist, "all_reduce", reduce)
    monkeypatch.setattr(worker, "current", lambda: _GpuWorker())
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(_Stop):
        all_sum([1.0, 2.0])
    assert seen == [torch.device("cuda", 0)]
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: seen.append(t.device))
    assert all_sum([1.0, 2.0]) == [1.0, 2.0] and seen[-1] == torch.device("cpu")


def test_probe_logits_feeds_ids_on_the_models_device(tiny_model_dir):
    """B2: the checkpoint's probe forward gets its ids on the worker's device, not the CPU."""
    from transformers import AutoTokenizer

    from pipelines.train.sft import probe_logits

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, input_ids):
            seen.append(input_ids.device)
            return type("Out", (), {"logits": torch.zeros(1, input_ids.shape[1], 4)})()

    out = probe_logits(Recorder(), AutoTokenizer.from_pretrained(tiny_model_dir), torch.device("meta"))
    assert seen == [torch.device("meta")] and out.device.type == "cpu"


def _packed_batch(tiny_model_dir):
    from transformers import AutoTokenizer

    from pipelines.train.sft import collate_fn

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = {"input_ids": [list(range(5, 25)) + list(range(30, 42))], "labels": [list(range(5, 25)) + [-100] * 4
                                                                                  + list(range(34, 42))],
            "seq_lens": [[20, 12]]}
    return collate_fn(tok.pad_token_id)(rows)


def test_packed_rows_train_on_a_qlora_bf16_base_with_sdpa(tiny_model_dir):
    """B3: QLoRA with a bfloat16 compute dtype upcasts norms and embeddings to float32 (PEFT), so the query is
    float32; a float block mask in bfloat16 is refused by SDPA. The boolean mask built from segment ids is not."""
    from pipelines.data.packing import block_mask
    from pipelines.train.base import attach_lora, load_base
    from pipelines.train.config import LoraSection, QuantSection
    from pipelines.train.sft import causal_lm_loss

    quant = QuantSection(load_in_4bit=True, compute_dtype="bfloat16")
    model = attach_lora(load_base(tiny_model_dir, "bfloat16", quant, False), LoraSection(r=4, dropout=0.0), 0)
    batch = _packed_batch(tiny_model_dir)
    total, n, _ = causal_lm_loss(model, batch, chunk_tokens=8, attn="sdpa")
    total.backward()
    assert n == 19 + 8 and torch.isfinite(total)  # first label of each sequence ignored
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    old = {k: v for k, v in batch.items() if k not in ("segment_ids", "labels", "num_tokens")}
    old["attention_mask"] = block_mask(batch["segment_ids"], torch.bfloat16)  # what the collate shipped before
    with pytest.raises(RuntimeError, match="dtype"):
        model(**old)


def test_bool_and_float_block_masks_give_one_loss(tiny_model_dir):
    """The boolean mask (sdpa) and the additive one (eager) are the same attention pattern: equal losses, and
    flash_attention_2 gets no mask at all (varlen from position_ids)."""
    from transformers import AutoModelForCausalLM

    from pipelines.data.packing import attention_inputs
    from pipelines.train.sft import causal_lm_loss

    batch = _packed_batch(tiny_model_dir)
    losses = {}
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
        with torch.no_grad():
            losses[attn] = float(causal_lm_loss(model, batch, chunk_tokens=0, attn=attn)[0])
    assert losses["sdpa"] == pytest.approx(losses["eager"], rel=1e-5)
    flash = attention_inputs(batch, "flash_attention_2")
    assert "attention_mask" not in flash and "segment_ids" not in flash and "position_ids" in flash
    assert attention_inputs(batch, "sdpa")["attention_mask"].dtype == torch.bool


def test_frozen_checksum_survives_deepspeeds_bf16_cast():
    """B4: DeepSpeed's bf16 engine casts the frozen weights after the first checksum: hashed as bf16 values,
    before and after agree, and a changed weight still shows."""
    from pipelines.train.base import checksum, zero_dtype

    before = [torch.randn(8, 8).to(torch.bfloat16).float(), torch.randint(0, 255, (16,), dtype=torch.uint8)]
    after = [before[0].to(torch.bfloat16), before[1].clone()]
    assert checksum(before) != checksum(after)  # the bytes differ: the old comparison failed here
    dtype = zero_dtype({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    assert dtype == "bfloat16" and checksum(before, dtype) == checksum(after, dtype)
    after[0][0, 0] += 1
    assert checksum(before, dtype) != checksum(after, dtype)
    assert zero_dtype({"bf16": {"enabled": False}}) is None and zero_dtype(None) is None


def test_zero3_gets_one_parameter_dtype(tiny_model_dir):
    """B5: ZeRO-3 gathers partitions in buffers of one dtype; PEFT's adapters are float32 beside a bf16 base."""
    from transformers import AutoModelForCausalLM

    from pipelines.train.base import align_for_zero3, attach_lora
    from pipelines.train.config import LoraSection

    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16),
                        LoraSection(r=4), 0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
    zero2 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    assert align_for_zero3(model, zero2) == 0
    n = align_for_zero3(model, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}})
    assert n > 0 and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad for n_, p in model.named_parameters() if "lora_" in n_)


def test_qlora_under_zero3_is_accepted_and_stores_4bit_in_the_compute_dtype(tiny_model_dir):
    """QLoRA + ZeRO-3 is no longer refused; its 4-bit weights are stored as compute-dtype tensors, which ZeRO-3
    partitions like any 16-bit parameter (bnb_4bit_quant_storage)."""
    from pipelines.train.base import _from_pretrained
    from pipelines.train.config import QuantSection, TrainSection, check_combination

    quant = QuantSection(load_in_4bit=True, compute_dtype="bfloat16")
    check_combination(quant, TrainSection(deepspeed="zero3"))
    model = _from_pretrained(tiny_model_dir, "bfloat16", quant, quant_storage="bfloat16")
    packed = [p for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    assert packed and {p.dtype for p in packed} == {torch.bfloat16}


def test_checkpoint_rng_includes_the_gpus_generator(monkeypatch):
    """W6: LoRA dropout on a GPU draws from the CUDA generator; a resumed run restores it too."""
    from pipelines.train.loop import rng_states, set_rng_states

    state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device=None: restored.append(s))
    got = rng_states("cuda:0")
    assert set(got) == {"cpu", "cuda"} and torch.equal(got["cuda"], state)
    assert set(rng_states("cpu")) == {"cpu"}
    set_rng_states(got, "cuda:0")
    assert restored and torch.equal(restored[0], state)


def test_throughput_counts_steady_steps_only():
    """W7: warm-up steps (and everything outside steps: validation, checkpoints) are not in tokens/s."""
    from pipelines.train.loop import steady_throughput

    t = steady_throughput([5.0, 2.0, 1.0, 1.0, 1.0], [100.0] * 5, warmup=2)
    assert t["tokens_per_s"] == pytest.approx(100.0) and t["steps_measured"] == 3
    assert steady_throughput([5.0], [100.0], warmup=2)["tokens_per_s"] == pytest.approx(20.0)  # nothing left


def test_autocast_tf32_and_attention_choices(monkeypatch):
    """W1 and W3: bf16 autocast on GPUs (not on CPUs, not where DeepSpeed casts the module), TF32 allowed for
    fp32 matmuls on GPUs, flash-attention 2 chosen on a GPU where installed."""
    from pipelines.train.base import resolve_attention
    from pipelines.train.engine import autocast_dtype, set_matmul_precision

    assert autocast_dtype("cuda:0", "bfloat16", None) == "bfloat16"
    assert autocast_dtype("cuda:0", "float32", None) is None
    assert autocast_dtype("cpu", "bfloat16", None) is None
    assert autocast_dtype("cuda:0", "bfloat16", {"bf16": {"enabled": True}}) is None
    assert autocast_dtype("cuda:0", "bfloat16", {"bf16": {"enabled": False}}) == "bfloat16"
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        set_matmul_precision("cuda:0", False)
        set_matmul_precision("cpu", True)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        set_matmul_precision("cuda:0", True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" == torch.backends.cudnn.conv.fp32_precision
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved
    assert resolve_attention("auto", "cuda:0", flash_installed=True) == "flash_attention_2"
    assert resolve_attention("auto", "cuda:0", flash_installed=False) == "sdpa"
    assert resolve_attention("auto", "cpu", flash_installed=True) == "sdpa"
    assert resolve_attention("eager", "cpu") == "eager"
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_attention("flash_attention_2", "cpu")


def test_qlora_checksum_survives_the_bias_cast_of_a_4bit_layer(tiny_model_dir):
    """A Qwen2-shaped QLoRA base (attention biases): bitsandbytes' 4-bit layer casts its frozen bias to the input's
    dtype in place on the first forward; the checksum in the compute dtype reads the same values before and after."""
    import tempfile

    from pipelines.artifacts.models import build_tiny_model
    from pipelines.train.base import attach_lora, checksum, frozen_dtype, load_base
    from pipelines.train.config import LoraSection, QuantSection, TrainSection, WorkerJob

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(tmp + "/q", arch="qwen2", seed=0)
        quant = QuantSection(load_in_4bit=True, compute_dtype="bfloat16")
        job = WorkerJob(model_dir=model_dir, dtype="bfloat16", quant=quant, train=TrainSection(), storage=tmp)
        model = attach_lora(load_base(model_dir, "bfloat16", quant, False), LoraSection(r=4), 0)
        frozen = lambda: [p for p in model.parameters() if not p.requires_grad]  # noqa: E731
        as_dtype = frozen_dtype(job)
        before, raw = checksum(frozen(), as_dtype), checksum(frozen())
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=torch.tensor([[1, 2, 3]]))
        assert as_dtype == "bfloat16" and checksum(frozen(), as_dtype) == before
        assert checksum(frozen()) != raw  # the raw bytes moved: the bias is bf16 now


def test_two_local_deepspeed_engines_in_one_process(tmp_path, monkeypatch):
    """DeepSpeed keeps the process group in a module global: a second local run in the process (ZeRO-3 after
    ZeRO-2) must not find the first run's destroyed group ("Group ... is not registered")."""
    import deepspeed
    import torch.distributed as dist

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for stage in (2, 3):
        with worker.LocalWorker({}, tmp_path, keep=1, device="cpu").session():
            deepspeed.init_distributed(dist_backend="gloo")
            model = torch.nn.Linear(4, 4)
            cfg = {"train_batch_size": 1, "zero_optimization": {"stage": stage},
                   "zero_allow_untested_optimizer": True}
            engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                              config=cfg)
            engine.backward(engine(torch.ones(1, 4)).sum())
            engine.step()
        assert not dist.is_initialized()
