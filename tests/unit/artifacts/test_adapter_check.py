"""pipelines.artifacts.adapter_check (issue 37): an adapter's safetensors against its adapter_config.json and its base,
from the file's header alone, before vLLM sees the folder. Each refusal names the file, the tensor and what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.artifacts.adapter_check import AdapterWeightsError, check_adapter_weights

# The tiny Llama's sizes (pipelines.artifacts.models.build_tiny_model): q 128 -> 128, k/v 128 -> 64 (2 KV heads).
BASE = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2}
PREFIX = "base_model.model.model.layers"


def lora(module: str, r: int, fan_in: int, fan_out: int, dtype=np.float32) -> dict[str, np.ndarray]:
    return {f"{module}.lora_A.weight": np.zeros((r, fan_in), dtype), f"{module}.lora_B.weight": np.zeros((fan_out, r),
                                                                                                        dtype)}


def good(r: int = 8) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for layer in (0, 1):
        tensors |= lora(f"{PREFIX}.{layer}.self_attn.q_proj", r, 128, 128)
        tensors |= lora(f"{PREFIX}.{layer}.self_attn.v_proj", r, 128, 64)
    return tensors


def write(folder: Path, tensors: dict[str, np.ndarray], **conf) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    doc = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps({**doc, **conf}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture()
def base(tmp_path) -> str:
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BASE))
    return str(folder)


def check(folder: Path, bases=None) -> None:
    check_adapter_weights(folder, json.loads((folder / "adapter_config.json").read_text()), bases=bases)


def test_an_adapter_that_matches_its_config_and_base_passes(tmp_path, base):
    check(write(tmp_path / "ok", good()), {base, "/not/a/folder"})
    check(write(tmp_path / "pattern", {**good(), **lora(f"{PREFIX}.0.self_attn.q_proj", 16, 128, 128)},
                rank_pattern={"layers.0.self_attn.q_proj": 16}, r=8), {base})
    # PEFT's other target forms: a regex over the module's name, or all-linear
    check(write(tmp_path / "regex", good(), target_modules=r".*\.(q_proj|v_proj)"), {base})
    check(write(tmp_path / "all", good(), target_modules="all-linear"), {base})


Q0 = f"{PREFIX}.0.self_attn.q_proj"


@pytest.mark.parametrize("case, tensors, conf, message", [
    ("rank", lambda: {**good(), **lora(Q0, 4, 128, 128)}, {},
     rf"tensor '{Q0}.lora_A.weight' has rank 4 \(shape \[4, 128\]\), but adapter_config.json says r=8"),
    ("a_b_disagree", lambda: {**good(), f"{Q0}.lora_B.weight": np.zeros((128, 4), np.float32)}, {},
     rf"'{Q0}.lora_A.weight' has rank 8 \(shape \[8, 128\]\) but '{Q0}.lora_B.weight' has rank 4"),
    ("missing_b", lambda: {k: v for k, v in good().items() if k != f"{Q0}.lora_B.weight"}, {},
     rf"tensor '{Q0}.lora_A.weight' has no {Q0}.lora_B.weight beside it"),
    ("untargeted", lambda: {**good(), **lora(f"{PREFIX}.0.self_attn.k_proj", 8, 128, 64)}, {},
     r"is a LoRA on 'k_proj', which adapter_config.json's target_modules \['q_proj', 'v_proj'\] does not name"),
    ("not_lora", lambda: {**good(), "base_model.model.model.embed_tokens.weight": np.zeros((10, 128), np.float32)},
     {}, r"tensor 'base_model.model.model.embed_tokens.weight' is not a LoRA weight"),
    ("int_dtype", lambda: {**good(), **lora(Q0, 8, 128, 128, np.int8)}, {}, r"has dtype I8, expected a float type"),
    ("three_d", lambda: {**good(), f"{Q0}.lora_A.weight": np.zeros((8, 128, 1), np.float32)}, {},
     r"has shape \[8, 128, 1\], expected a non-empty 2-D matrix"),
    ("other_base", lambda: {**good(), **lora(Q0, 8, 128, 256)}, {},
     r"is a LoRA on a q_proj of 128 -> 256 features .* but the base's q_proj maps 128 -> 128: the adapter was "
     r"trained on another base"),
    ("layer", lambda: {**good(), **lora(f"{PREFIX}.5.self_attn.q_proj", 8, 128, 128)}, {},
     r"is a LoRA on layer 5, but the base has 2 layers \(0..1\)"),
    ("empty", lambda: {}, {}, r"holds no tensors"),
])
def test_a_mismatch_names_the_file_the_tensor_and_what_is_wrong(tmp_path, base, case, tensors, conf, message):
    folder = write(tmp_path / case, tensors(), **conf)
    with pytest.raises(AdapterWeightsError, match=message) as e:
        check(folder, {base})
    assert str(e.value).startswith(f"{folder / 'adapter_model.safetensors'}: "), e.value


def test_bytes_that_are_not_safetensors_are_refused_from_the_header(tmp_path):
    folder = write(tmp_path / "cut", good())
    whole = (folder / "adapter_model.safetensors").read_bytes()
    for name, data in (("cut", whole[: len(whole) // 2]), ("text", b"not safetensors"), ("empty", b"")):
        (folder / "adapter_model.safetensors").write_bytes(data)
        with pytest.raises(AdapterWeightsError, match=r"adapter_model.safetensors: not a readable safetensors file"):
            check(folder)


def test_validate_adapter_refuses_it_as_an_adapter_that_cannot_be_served(tmp_path, base):
    """serve.adapters.validate_adapter runs the check (the CLI's `serve`, the app's start, each engine replica
    before vLLM loads a registry or folder adapter): AdapterInvalid, which a request gets as a 503."""
    from serve.adapters import validate_adapter
    from serve.errors import AdapterInvalid

    bases = {str(Path(base).resolve())}
    folder = write(tmp_path / "rank", {**good(), **lora(Q0, 4, 128, 128)}, base_model_name_or_path=base)
    with pytest.raises(AdapterInvalid, match=rf"adapter_model.safetensors: tensor '{Q0}.lora_A.weight' has rank 4"):
        validate_adapter(str(folder), max_rank=64, bases=bases)
    folder = write(tmp_path / "wide", {**good(), **lora(Q0, 8, 128, 256)}, base_model_name_or_path=base)
    with pytest.raises(AdapterInvalid, match="trained on another base"):
        validate_adapter(str(folder), max_rank=64, bases=bases)
    assert validate_adapter(str(write(tmp_path / "ok", good(), base_model_name_or_path=base)), max_rank=64,
                            bases=bases)["r"] == 8
