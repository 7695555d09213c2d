"""The planner's arithmetic (cluster.plan): the QLoRA paper's headline claims from the LLaMA shapes, LoRA's
parameter count, ZeRO's partitioning, the GPU table, and the refusal `run`/`sft` make. Pure, milliseconds.

    .venv/bin/python -m pytest tests/unit/test_plan.py -q
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cluster.plan import Setup, lora_params, plan_setup, plan_training, smallest_gpu, table
from cluster.plan_shape import ModelShape, shape_of
from pipelines.schema import UserError

ROOT = Path(__file__).resolve().parents[2]
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
