"""The planner's arithmetic (cluster.plan): the QLoRA paper's headline claims from the LLaMA shapes, LoRA's
parameter count, ZeRO's partitioning, the GPU table, and the refusal `run`/`sft` make. Pure, milliseconds.

    .venv/bin/python -m pytest tests/unit/cluster/test_plan.py -q
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cluster.plan import Setup, lora_params, plan_setup, plan_training, smallest_gpu, table
from cluster.plan_shape import ModelShape, shape_of
from pipelines.schema import UserError

ROOT = Path(__file__).resolve().parents[3]
LLAMA_65B = ModelShape(8192, 22016, 80, 64, 64, 128, 32000, name="llama-65b")
LLAMA_33B = ModelShape(6656, 17920, 60, 52, 52, 128, 32000, name="llama-33b")
LLAMA_7B = ModelShape(4096, 11008, 32, 32, 32, 128, 32000, name="llama-7b")
# The paper's setup: NF4 + double quantization, LoRA r=64 on every linear layer, bf16 compute, paged 8-bit
# AdamW, gradient checkpointing, one sequence of 512 tokens (Dettmers et al. 2023, sections 3-4).
QLORA = Setup(batch=1, seq=512, dtype="bfloat16", load_in_4bit=True, double_quant=True, r=64,
              optimizer="paged_adamw_8bit", gradient_checkpointing=True, use_gpu=True)


def test_llama_shapes_have_their_parameter_counts():
    assert LLAMA_7B.total_params() == pytest.approx(6.74e9, rel=0.01)
    assert LLAMA_33B.total_params() == pytest.approx(32.5e9, rel=0.01)
    assert LLAMA_65B.total_params() == pytest.approx(65.2e9, rel=0.01)


def test_qlora_65b_fits_one_48gb_gpu():
    p = plan_setup(QLORA, LLAMA_65B)
    assert p.device_bytes < 48e9, p.parts
    assert p.get("weights") < 36e9  # 4.13 bit/param for the linears, the rest in fp32 (kbit preparation)


def test_qlora_33b_fits_24gb_with_the_papers_bf16_adapters():
    """The paper's qlora.py keeps the adapters in bf16; our DDP trainer keeps them in fp32 (PEFT's default),
    which costs 33B about 2 GB more and leaves it just over 24 GB."""
    assert plan_setup(replace(QLORA, lora_dtype="bfloat16"), LLAMA_33B).device_bytes < 24e9
    ours = plan_setup(QLORA, LLAMA_33B)
    assert ours.get("lora") == 2 * plan_setup(replace(QLORA, lora_dtype="bfloat16"), LLAMA_33B).get("lora")


def test_16bit_full_finetuning_of_65b_needs_more_than_780gb():
    p = plan_setup(Setup(batch=1, seq=512, dtype="bfloat16", full_finetune=True, gradient_checkpointing=True,
                         use_gpu=True), LLAMA_65B)
    assert p.device_bytes > 780e9
    per_param = (p.get("weights") + p.get("grads") + p.get("optimizer")) / LLAMA_65B.total_params()
    assert per_param == pytest.approx(16, rel=1e-6)  # 2 (weights) + 2 (grads) + 12 (fp32 master + Adam)
    assert smallest_gpu(p.setup, LLAMA_65B) is None  # DDP replicates it on every GPU


def test_lora_parameters_per_matrix_match_the_worked_example():
    shape = ModelShape(4096, 11008, 32, 32, 32, 128, 32000)
    lp = lora_params(shape, 16, ["q_proj", "down_proj"])
    assert lp["q_proj"]["per_matrix"] == 131_072 == 16 * (4096 + 4096)
    assert lp["q_proj"]["total"] == 131_072 * 32
    assert lp["down_proj"]["per_matrix"] == 16 * (11008 + 4096)
    with pytest.raises(UserError, match="not linear layers"):
        lora_params(shape, 16, ["q_proj", "lm_head_typo"])


def test_zero2_over_8_ranks_divides_grads_and_optimizer_state_by_8():
    one = plan_setup(replace(QLORA, optimizer="adamw", zero=2, ranks=1), LLAMA_7B)
    eight = plan_setup(replace(QLORA, optimizer="adamw", zero=2, ranks=8), LLAMA_7B)
    for name in ("grads", "optimizer"):
        assert eight.get(name) == pytest.approx(one.get(name) / 8)
    assert eight.get("weights") == one.get("weights")  # ZeRO-2 replicates the parameters
    three = plan_setup(Setup(dtype="bfloat16", zero=3, ranks=8, use_gpu=True), LLAMA_7B)
    assert three.get("weights") == pytest.approx(LLAMA_7B.total_params() * 2 / 8)


def test_gradient_checkpointing_shrinks_activations_and_offload_moves_the_optimizer():
    base = Setup(batch=4, seq=1024, dtype="bfloat16", use_gpu=True)
    assert plan_setup(replace(base, gradient_checkpointing=True), LLAMA_7B).get("activations") < \
        plan_setup(base, LLAMA_7B).get("activations") / 10
    off = plan_setup(replace(base, zero=2, ranks=2, offload=True), LLAMA_7B)
    assert off.host_bytes == off.get("optimizer") > 0


def test_smallest_gpu_is_the_fewest_then_smallest_that_fits():
    gpu, n = smallest_gpu(QLORA, LLAMA_7B)
    assert n == 1 and gpu["memory_gib"] == min(g["memory_gib"] for g in table()["gpus"])
    gpu, n = smallest_gpu(QLORA, LLAMA_65B)
    assert n == 1 and 40 < gpu["memory_gib"]  # needs more than a 40 GB card


def test_gpu_table_is_complete_data():
    names = {g["name"] for g in table()["gpus"]}
    assert {"A10G", "L4", "A100-40GB", "A100-80GB", "H100", "H200"} <= names
    for g in table()["gpus"]:
        assert g["memory_gib"] > 0 and g["bf16_tflops"] > 0 and g["usd_per_hour"] > 0 and g["source"]


def test_the_7b_config_plans_from_the_known_shapes():
    from cluster.config import load_config

    cfg = load_config(ROOT / "configs" / "sft-qwen2.5-7b-qlora-1n8g-zero2.yaml", [])
    shape = shape_of(cfg.model.name)
    assert (shape.hidden, shape.layers, shape.kv_heads, shape.vocab) == (3584, 28, 4, 152064)
    p = plan_training(cfg, shape)
    assert p.setup.zero == 2 and p.setup.ranks == 8 and p.setup.load_in_4bit
    assert p.device_bytes < 22 * 2**30  # QLoRA 7B under ZeRO-2 fits a 24 GB card
    with pytest.raises(UserError, match="no config.json"):
        shape_of("nobody/no-such-model-here")


@pytest.fixture()
def tiny_config(tmp_path):
    from cluster.config import RunConfig

    model = tmp_path / "model"
    model.mkdir()
    shape = table()["models"]["smollm2-135m-instruct"]
    (model / "config.json").write_text(__import__("json").dumps(shape))
    return lambda **train: RunConfig.model_validate({"model": {"name": str(model)}, "train": train})


def test_check_fits_refuses_with_the_breakdown(tiny_config, monkeypatch):
    from cluster import cli_plan

    monkeypatch.setattr(cli_plan, "capacity", lambda cfg: (4 * 2**30, "of this machine's RAM per worker"))
    assert cli_plan.check_fits(tiny_config(batch_size=1)) is not None  # fits: the plan, no error
    with pytest.raises(UserError) as e:
        cli_plan.check_fits(tiny_config(batch_size=64), "run.yaml")
    msg = str(e.value)
    assert "run.yaml: this run does not fit" in msg and "4.00 GiB of this machine's RAM" in msg
    for part in ("weights", "activations", "optimizer", "peak"):
        assert part in msg
    assert "gradient_checkpointing" in msg


def test_check_fits_skips_what_it_cannot_know(tiny_config, monkeypatch, tmp_path):
    from cluster import cli_plan

    monkeypatch.setattr(cli_plan.shutil, "which", lambda name: None)  # no nvidia-smi: GPUs not checked here
    assert cli_plan.capacity(tiny_config(use_gpu=True, batch_size=4096)) is None
    cfg = tiny_config()
    (Path(cfg.model.name) / "config.json").write_text("{}")  # a folder without a shape: not checked
    assert cli_plan.check_fits(cfg) is None


def test_serving_dtype_auto_is_bf16_on_gpu_and_fp32_on_cpu():
    """serve.dtype=auto (the default): a GPU replica's engine runs bfloat16, a CPU one float32; the plan sizes the
    replica with the dtype its engine will run (a 7B served on GPU is not planned, or started, in float32)."""
    from cluster.plan import plan_serving, serving_on_gpu
    from serve.config import ServeConfig

    auto = ServeConfig()
    assert auto.dtype == "auto" and auto.engine_dtype(True) == "bfloat16" and auto.engine_dtype(False) == "float32"
    assert ServeConfig(dtype="float16").engine_dtype(True) == "float16"
    assert serving_on_gpu(auto, use_gpu=True) and not serving_on_gpu(auto, use_gpu=False)
    assert serving_on_gpu(ServeConfig(accelerator="gpu"), use_gpu=False)
    gpu, cpu = (sum(p.bytes for p in plan_serving(LLAMA_7B, auto, gpu=g) if p.name == "weights") for g in (True, False))
    assert cpu == 2 * gpu


LLAMA3_70B = ModelShape(8192, 28672, 80, 64, 8, 128, 128256, name="llama-3.1-70b")
QWEN_7B = ModelShape(3584, 18944, 28, 28, 4, 128, 152064, qkv_bias=True, name="qwen2.5-7b")


def gpu_named(name: str) -> dict:
    return next(g for g in table()["gpus"] if g["name"] == name)


def test_serving_tensor_parallel_size_is_the_smallest_power_of_two_that_fits_one_gpu():
    """bf16 weights / N + vLLM's reserve (profile activations, LoRA slots, CUDA context and graphs) + the KV cache
    of one max_model_len sequence within gpu_memory_utilization of one GPU."""
    from cluster.plan import serving_fit, serving_tp, tp_sizes
    from serve.config import ServeConfig

    serve = ServeConfig(accelerator="gpu", max_model_len=4096)
    h100, l4 = gpu_named("H100"), gpu_named("L4")
    assert serving_tp(QWEN_7B, serve, h100).tp == 1  # 14.2 GiB of weights on 80 GB
    seven = serving_tp(QWEN_7B, serve, l4)  # 14.2 GiB + ~3 GiB reserve in 0.85 × 22 GiB: fits, a few sequences
    assert seven.tp == 1 and 1 <= seven.sequences < 16
    big = serving_tp(LLAMA3_70B, serve, h100)  # 131 GiB: 65.7 GiB a GPU at 2 leaves no room in 67 GiB
    assert big.tp == 4 and big.weights == pytest.approx(LLAMA3_70B.total_params() * 2 / 4)
    assert serving_fit(LLAMA3_70B, serve, h100, 2).sequences == 0
    assert serving_tp(LLAMA3_70B, serve, l4) is None  # 8 × 22 GiB cannot hold 131 GiB + reserves
    assert serving_tp(LLAMA3_70B, ServeConfig(accelerator="gpu", dtype="float32"), h100).tp == 8
    assert tp_sizes(QWEN_7B) == [1, 2, 4]  # 28 heads do not split 8 ways: vLLM refuses
    # the KV cache is sharded by kv heads, replicated past them (8 kv heads over 8 GPUs: one each)
    assert serving_fit(LLAMA3_70B, serve, h100, 8).kv_per_seq == serving_fit(LLAMA3_70B, serve, h100, 4).kv_per_seq / 2


def test_plan_names_the_tensor_parallel_size_to_set():
    from cluster.plan import serving_parallel
    from serve.config import ServeConfig

    train_on_gpu = QLORA  # 65B QLoRA: training's smallest fit is one 80 GB card: the node type serving is asked of
    left = serving_parallel(LLAMA_65B, ServeConfig(accelerator="gpu", max_model_len=4096), train_on_gpu)
    assert left["gpu"] == "A100-80GB" and left["tensor_parallel_size"] == 4 and left["configured"] == 1
    assert "does not fit one GPU" in left["advice"] and "set serve.tensor_parallel_size=4" in left["advice"]
    assert left["weights_gib_per_gpu"] == pytest.approx(LLAMA_65B.total_params() * 2 / 4 / 2**30, abs=0.01)
    assert serving_parallel(LLAMA_65B, ServeConfig(accelerator="gpu", max_model_len=4096, tensor_parallel_size=8),
                            train_on_gpu)["advice"] is None
    odd = serving_parallel(QWEN_7B, ServeConfig(accelerator="gpu", tensor_parallel_size=8), train_on_gpu)
    assert "cannot shard 28 attention heads" in odd["advice"] and odd["tensor_parallel_size"] == 1
    fits = serving_parallel(QWEN_7B, ServeConfig(accelerator="gpu"), train_on_gpu)
    assert fits["advice"] is None and fits["tensor_parallel_size"] == 1


def test_the_7b_config_reports_its_serving_tensor_parallelism():
    from cluster.config import load_config
    from cluster.plan_render import as_json, render_training

    cfg = load_config(ROOT / "configs" / "sft-qwen2.5-7b-qlora-1n8g-zero2.yaml", [])
    p = plan_training(cfg, shape_of(cfg.model.name))
    serve = as_json(p, cfg.serve)["serve"]
    assert serve["tensor_parallel_size"] == 1 and serve["gpu"] and serve["weights_gib_per_gpu"] > 14
    assert "serve tensor parallelism: 1 × " in render_training(p, cfg.serve)


QLORA_DDP = Setup(batch=4, seq=1024, dtype="bfloat16", load_in_4bit=True, r=16, dropout=0.05, use_gpu=True)


def test_autocast_is_the_loops_rule_and_saves_16_bit_activations():
    """16-bit compute on GPUs under DDP runs under autocast (DeepSpeed's bf16 casts the module itself; CPUs never):
    QLoRA's fp32 residual stays, but the attention's q/k/v/out and each adapter's saved input are 16-bit copies."""
    assert QLORA_DDP.amp and not replace(QLORA_DDP, zero=2).amp and not replace(QLORA_DDP, use_gpu=False).amp
    assert not replace(QLORA_DDP, dtype="float32").amp and not replace(QLORA_DDP, autocast=False).amp
    on, off = plan_setup(QLORA_DDP, LLAMA_7B), plan_setup(replace(QLORA_DDP, autocast=False), LLAMA_7B)
    assert QLORA_DDP.act_bytes == 4 and QLORA_DDP.mm_bytes == 2
    assert on.get("activations") < 0.85 * off.get("activations")
    assert on.get("activations") > 0.5 * off.get("activations")  # norms and the 4-bit MLP outputs stay fp32
    bf16_lora = Setup(batch=4, seq=1024, dtype="bfloat16", use_gpu=True)  # adapters fp32 (PEFT): cast copies
    assert plan_setup(bf16_lora, LLAMA_7B).get("activations") < \
        plan_setup(replace(bf16_lora, autocast=False), LLAMA_7B).get("activations")
    ckpt = replace(QLORA_DDP, gradient_checkpointing=True)  # only the fp32 layer inputs: autocast changes nothing
    assert plan_setup(ckpt, LLAMA_7B).get("activations") == \
        plan_setup(replace(ckpt, autocast=False), LLAMA_7B).get("activations")


def test_packed_rows_hold_a_mask_on_sdpa_and_none_on_flash_attention():
    packed = replace(QLORA_DDP, packed=True)
    sdpa = plan_setup(replace(packed, attn="sdpa"), LLAMA_7B)
    assert sdpa.get("mask") == 4 * 1024 ** 2 * 1  # (B, 1, L, L) boolean
    assert plan_setup(replace(packed, attn="eager"), LLAMA_7B).get("mask") == 4 * 1024 ** 2 * 4
    flash = plan_setup(replace(packed, attn="flash_attention_2"), LLAMA_7B)
    assert flash.get("mask") == 0 and "mask" not in [p.name for p in flash.parts]
    assert plan_setup(QLORA_DDP, LLAMA_7B).get("mask") == 0  # unpacked rows: transformers' own causal mask
    assert sdpa.device_bytes - flash.device_bytes == sdpa.get("mask")  # same saved tensors otherwise
    eager = plan_setup(replace(QLORA_DDP, attn="eager"), LLAMA_7B)  # + the s² probabilities per layer
    assert eager.get("activations") > plan_setup(QLORA_DDP, LLAMA_7B).get("activations") + \
        LLAMA_7B.layers * 4 * LLAMA_7B.heads * 1024 ** 2 * 4


def test_auto_attention_is_flash_only_on_gpus_with_flash_attn_installed(monkeypatch):
    import importlib.util

    from cluster import plan

    assert plan.resolve_attn("eager", True) == "eager" and plan.resolve_attn("auto", False) == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert plan.resolve_attn("auto", True) == "flash_attention_2" and plan.resolve_attn("auto", False) == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert plan.resolve_attn("auto", True) == "sdpa"


def test_setup_reads_autocast_attention_and_packing_from_the_run_config(tiny_config):
    cfg = tiny_config(use_gpu=True)
    cfg.model.dtype = "bfloat16"
    cfg.data.packing.enabled = True
    s = Setup.of(cfg)
    assert s.autocast is True and s.packed and s.attn in ("sdpa", "flash_attention_2")
    assert Setup.of(cfg, autocast=False).autocast is False
    cpu = Setup.of(tiny_config())
    assert cpu.autocast is False and cpu.attn == "sdpa" and not cpu.packed


def test_qlora_under_zero3_partitions_the_4bit_base_over_the_ranks():
    """bnb_4bit_quant_storage in the compute dtype makes the packed weights 16-bit parameters ZeRO-3 partitions,
    like the floating rest; the quantization constants live on each weight's quant_state and stay whole."""
    from cluster.plan import nf4_bytes

    two = plan_setup(replace(QLORA, optimizer="adamw", zero=2, ranks=8), LLAMA_65B)
    three = plan_setup(replace(QLORA, optimizer="adamw", zero=3, ranks=8), LLAMA_65B)
    consts = nf4_bytes(LLAMA_65B, True) - LLAMA_65B.linear_params() / 2
    assert three.get("weights") == pytest.approx((two.get("weights") - consts) / 8 + consts)
    assert two.get("weights") / 8 < three.get("weights") < 1.3 * two.get("weights") / 8
    assert three.get("lora") == pytest.approx(two.get("lora") / 8)
    gather = three.get("zero3_gather")  # the LM head (262M bf16 params) + the prefetch bucket, at the peak only
    assert gather == pytest.approx((LLAMA_65B.vocab * LLAMA_65B.hidden + 50_000_000) * 2)
    assert "zero3_gather" not in [p.name for p in two.parts]
