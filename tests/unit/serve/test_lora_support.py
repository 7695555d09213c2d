"""The serving side's LoRA check follows vLLM per architecture (serve.lora_support): an architecture whose vLLM
class has no LoRA refuses every adapter with what to do; target names are compared by their last component, as
vLLM compares an adapter's modules (GPT-2's attn.c_proj was refused as a whole name). No vLLM, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve.adapters import validate_adapter
from serve.errors import AdapterInvalid
from serve.lora_support import LoraSupport, support_for

PHI3 = LoraSupport("Phi3ForCausalLM", "Phi3ForCausalLM", True,
                   frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"}), "0.32.0")
GPT2 = LoraSupport("GPT2LMHeadModel", "GPT2LMHeadModel", False, frozenset(), "0.32.0")


def adapter(folder: Path, targets: list[str], modules: list[str]) -> str:
    """A PEFT-shaped adapter folder (r=8) whose tensors sit on `modules` (full names)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": targets}))
    save_file({f"base_model.model.{m}.lora_{p}.weight": np.zeros((8, 16) if p == "A" else (16, 8), np.float32)
               for m in modules for p in "AB"}, str(folder / "adapter_model.safetensors"))
    return str(folder)


def test_dotted_names_are_compared_by_their_last_component(tmp_path):
    gpt2 = adapter(tmp_path / "gpt2", ["c_attn", "attn.c_proj"],
                   ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"])
    assert validate_adapter(gpt2, max_rank=8, bases=None)["target_modules"] == ["c_attn", "attn.c_proj"]
    phi = adapter(tmp_path / "phi", ["self_attn.qkv_proj", "o_proj"],
                  ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj"])
    assert validate_adapter(phi, max_rank=8, bases=None, support=PHI3)["r"] == 8
    assert PHI3.unserved(["self_attn.qkv_proj", "mlp.gate_up_proj", "lm_head"]) == []
    assert PHI3.unserved(["q_proj", "input_layernorm", "attn.c_proj"]) == ["attn.c_proj", "input_layernorm", "q_proj"]


def test_modules_the_architecture_has_no_lora_layer_for_are_refused_naming_them(tmp_path):
    odd = adapter(tmp_path / "odd", ["q_proj", "o_proj"], ["model.layers.0.self_attn.q_proj"])
    with pytest.raises(AdapterInvalid, match=r"\['q_proj'\] are not LoRA layers vLLM 0.32.0 serves on Phi3ForCausal"):
        validate_adapter(odd, max_rank=8, bases=None, support=PHI3)


def test_an_architecture_without_lora_refuses_every_adapter_with_what_to_do(tmp_path):
    gpt2 = adapter(tmp_path / "gpt2", ["c_attn"], ["transformer.h.0.attn.c_attn"])
    with pytest.raises(AdapterInvalid) as e:
        validate_adapter(gpt2, max_rank=8, bases=None, support=GPT2)
    message = str(e.value)
    assert "architecture GPT2LMHeadModel" in message and "SupportsLoRA" in message and "merge" in message


def test_no_config_no_answer(tmp_path):
    """A folder without config.json (or without architectures) cannot be told here: the engine decides."""
    assert support_for(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert support_for(tmp_path) is None
