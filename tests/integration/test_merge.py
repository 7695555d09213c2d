"""Merge on the tiny model, in a Ray task on the shared Ray instance (never in the driver): parity within the
stated tolerance, QLoRA adapters go through the unquantized base, multi-adapter TIES, and a merge that dropped the
fine-tune is caught.

    .venv/bin/pytest tests/integration/test_merge.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def make_adapter(base_dir: str, out: Path, seed: int, *, four_bit: bool = False, zero: bool = False) -> Path:
    """A random (non-zero) LoRA adapter; lora_B scaled by 0.1 so outputs change but stay varied."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch.manual_seed(seed)
    kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_compute_dtype=torch.float32)} if four_bit else {}
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **kwargs)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights=zero, task_type="CAUSAL_LM"))
    if not zero:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.1)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    quant = {"load_in_4bit": four_bit, "quant_type": "nf4"}  # the shape of the SFT manifest's config.quant
    (out / "manifest.json").write_text(json.dumps({"kind": "lora_adapter", "config": {"quant": quant}}))
    return out


def _not_in_the_driver(*args, **kwargs):
    raise AssertionError("the model was loaded in the driver process")


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"a{i}", seed=i) for i in range(2)]


def test_merge_float32_is_exact_and_changes_the_base(tiny_model_dir, adapters, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.export.merge import MergeSection, run

    with pytest.MonkeyPatch.context() as mp:  # the driver never loads the model: the Ray task does, in its process
        mp.setattr("pipelines.export.merge._load_with_adapters", _not_in_the_driver)
        out = run(MergeSection(dtype="float32"), tiny_model_dir, [str(adapters[0])], tmp_path / "merged")
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"]["device"] == "cpu"
    parity = m["metrics"]["parity"]
    assert m["kind"] == "merged_model" and parity["passed"] and parity["greedy_identical"]
    assert m["adapters_trained_on_quantized_base"] == []
    assert parity["max_abs_logit_diff"] <= parity["logits_atol"] == 1e-3
    assert parity["adapter_effect_max_abs_logit"] > 0.05  # the adapter does something, and the merge kept it
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])
    assert not any("lora" in k for k in merged.state_dict())


def test_qlora_adapter_merges_through_the_unquantized_base_in_bf16(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.export.merge import MergeSection, run

    adapter = make_adapter(tiny_model_dir, tmp_path / "qlora", seed=3, four_bit=True)
    out = run(MergeSection(dtype="bfloat16"), tiny_model_dir, [str(adapter)], tmp_path / "merged")
    m = json.loads((out / "manifest.json").read_text())
    assert m["adapters_trained_on_quantized_base"] == [str(adapter)]
    assert m["base_loaded_as"].startswith("float32 (unquantized)")
    assert m["metrics"]["parity"]["passed"], m["metrics"]["parity"]
    conf = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in conf
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_multi_adapter_ties_merge(tiny_model_dir, adapters, tmp_path):
    from pipelines.export.merge import MergeSection, run

    cfg = MergeSection(dtype="float32", combination="ties", weights=[0.7, 0.3], density=0.5)
    out = run(cfg, tiny_model_dir, [str(a) for a in adapters], tmp_path / "ties")
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"]["parity"]["passed"] and len(m["adapters"]) == 2
    assert m["config"]["merge"]["combination"] == "ties"


def test_a_merge_that_drops_the_fine_tune_fails_parity(tiny_model_dir, adapters, tmp_path, monkeypatch):
    from pipelines.export.merge import MergeSection, ParityError, run

    def dropping_the_fine_tune(*args, **kwargs):
        """merge_on_device in the Ray task (pickled by value: a nested function), with a merge that returns the
        untouched base (logits match the base, not base + adapter); the worker's PEFT is restored after."""
        from peft.tuners.tuners_utils import BaseTuner

        from pipelines.export import merge

        real = BaseTuner.merge_and_unload
        BaseTuner.merge_and_unload = lambda self, *a, **k: self.unload()
        try:
            return merge.merge_on_device(*args, **kwargs)
        finally:
            BaseTuner.merge_and_unload = real

    # run() builds its task from the module's merge_on_device when called
    monkeypatch.setattr("pipelines.export.merge.merge_on_device", dropping_the_fine_tune)
    with pytest.raises(ParityError, match="parity failed"):
        run(MergeSection(dtype="float32", logits_atol=10.0), tiny_model_dir, [str(adapters[0])], tmp_path / "m")
    assert not (tmp_path / "m").exists()
