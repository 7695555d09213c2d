"""LoRA target modules resolved from the model (pipelines.train.targets): tiny configs of each family built on
the meta device; the resolved presets, PEFT's trainable count against the closed form Σ r·(in + out), PEFT's own
all-linear rule, and the errors for names that match nothing."""

from __future__ import annotations

import pytest

from pipelines.schema import ConfigError
from pipelines.train import targets
from pipelines.train.config import ALL_LINEAR, ATTENTION, MLP, LoraSection

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = {"vocab_size": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2}
QKVO, LLAMA_MLP = tuple(ATTENTION), tuple(MLP)
# model_type: (config fields, all-linear, attention, mlp (None: refused, no dense MLP layer))
FAMILIES = {
    "llama": (DECODER, QKVO + LLAMA_MLP, QKVO, LLAMA_MLP),
    "qwen2": (DECODER, QKVO + LLAMA_MLP, QKVO, LLAMA_MLP),
    "qwen3": ({**DECODER, "head_dim": 16}, QKVO + LLAMA_MLP, QKVO, LLAMA_MLP),
    "mistral": (DECODER, QKVO + LLAMA_MLP, QKVO, LLAMA_MLP),
    "gemma2": ({**DECODER, "head_dim": 16}, QKVO + LLAMA_MLP, QKVO, LLAMA_MLP),
    "gemma3_text": ({**DECODER, "head_dim": 16}, QKVO + LLAMA_MLP, QKVO, LLAMA_MLP),
    "olmo2": (DECODER, QKVO + LLAMA_MLP, QKVO, LLAMA_MLP),
    "phi3": (DECODER, ("o_proj", "qkv_proj", "gate_up_proj", "down_proj"), ("o_proj", "qkv_proj"),
             ("gate_up_proj", "down_proj")),
    "gpt2": ({"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}, ("c_attn", "c_proj", "c_fc"),
             ("c_attn", "attn.c_proj"), ("c_fc", "mlp.c_proj")),
    "gpt_neox": ({k: v for k, v in DECODER.items() if k != "num_key_value_heads"},
                 ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"), ("query_key_value", "dense"),
                 ("dense_h_to_4h", "dense_4h_to_h")),
    "falcon": ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
               ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"), ("query_key_value", "dense"),
               ("dense_h_to_4h", "dense_4h_to_h")),
    # MoE: attention + the shared expert's dense MLP; experts (fused 3-D parameters) and gates never
    "qwen2_moe": ({**DECODER, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_experts": 4,
                   "num_experts_per_tok": 2}, QKVO + LLAMA_MLP, QKVO, LLAMA_MLP),
    "mixtral": ({**DECODER, "num_local_experts": 4}, QKVO, QKVO, None),
    "qwen3_moe": ({**DECODER, "moe_intermediate_size": 32, "num_experts": 4, "head_dim": 16}, QKVO, QKVO, None),
}
AVAILABLE = [f for f in FAMILIES if f in transformers.models.auto.configuration_auto.CONFIG_MAPPING]


def config(model_type: str):
    return transformers.AutoConfig.for_model(model_type, **TOKENS, **FAMILIES[model_type][0])


def meta_model(model_type: str):
    import torch

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config(model_type))


def peft_trainable(model_type: str, names: list[str], r: int = 4) -> int:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(meta_model(model_type), LoraConfig(r=r, target_modules=list(names)))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("model_type", AVAILABLE)
def test_presets_resolve_to_the_familys_own_names_and_peft_counts_the_closed_form(model_type):
    _, all_linear, attention, mlp = FAMILIES[model_type]
    listing = targets.describe(config(model_type))
    assert listing.layers == 2 and listing.total_params > 0
    linears = listing.linears
    assert targets.resolve("all-linear", linears) == list(all_linear)
    assert targets.resolve("attention", linears) == list(attention)
    if mlp is None:
        with pytest.raises(ConfigError, match="no such linear layers"):
            targets.resolve("mlp", linears)
    else:
        assert targets.resolve("mlp", linears) == list(mlp)
    for preset in ("all-linear", "attention") + (("mlp",) if mlp else ()):
        names = targets.resolve(preset, linears)
        closed = sum(r["total"] for r in targets.lora_counts(preset, linears, r=4).values())
        assert closed == targets.lora_parameters(preset, linears, r=4)
        assert peft_trainable(model_type, names) == closed, (model_type, preset, names)


@pytest.mark.parametrize("model_type", AVAILABLE)
def test_all_linear_is_peft_s_rule_less_the_moe_gates(model_type):
    """PEFT's all-linear (every nn.Linear / Conv1D but the output head) is ours, but for a mixture-of-experts
    block's gates (Qwen2-MoE's shared_expert_gate): routers are never targets."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    model = meta_model(model_type)
    peft_names = set(_maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), model).target_modules)
    ours = {x.name for x in targets.selected("all-linear", targets.list_linears(model))}
    assert ours <= peft_names
    assert {n.rsplit(".", 1)[-1] for n in peft_names - ours} <= {"shared_expert_gate"}


def test_moe_experts_and_routers_are_never_targets():
    linears = targets.describe(config("qwen2_moe")).linears
    roles = {x.leaf: x.role for x in linears}
    assert roles["shared_expert_gate"] == "router" and roles["lm_head"] == "head"
    chosen = [x.name for x in targets.selected("all-linear", linears)]
    assert "model.layers.0.mlp.shared_expert.gate_proj" in chosen
    assert not [n for n in chosen if "experts." in n or n.endswith("_gate")]


def test_llama_all_linear_is_todays_list():
    linears = targets.describe(config("llama")).linears
    assert targets.resolve("all-linear", linears) == ALL_LINEAR == LoraSection().modules()
    assert targets.resolve("attention", linears) == ATTENTION == LoraSection(target_modules="attention").modules()
    assert LoraSection(target_modules="mlp").modules() == MLP


def test_explicit_names_are_checked_by_peft_s_rule():
    linears = targets.describe(config("gpt2")).linears
    assert targets.resolve(["c_attn", "attn.c_proj"], linears) == ["c_attn", "attn.c_proj"]
    assert {x.name for x in targets.selected(["attn.c_proj"], linears)} == {
        "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"}
    with pytest.raises(ConfigError) as e:
        targets.resolve(["q_proj", "c_attn", "v_proj"], linears)
    message = str(e.value)
    assert "['q_proj', 'v_proj'] match no linear layer" in message
    for name in ("c_attn", "c_proj", "c_fc", "lm_head"):
        assert name in message
    with pytest.raises(ConfigError, match=r"\['qkv'\] match no linear layer.*o_proj, qkv_proj, gate_up_proj"):
        targets.resolve(["qkv"], targets.describe(config("phi3")).linears)


def test_attach_lora_resolves_from_the_loaded_model_and_keeps_the_names():
    import torch

    from pipelines.train.base import attach_lora, lora_target_modules

    torch.manual_seed(0)
    model = attach_lora(transformers.AutoModelForCausalLM.from_config(config("phi3")),
                        LoraSection(r=4, dropout=0.0, target_modules="attention"), seed=0)
    assert lora_target_modules(model) == ["o_proj", "qkv_proj"]
    linears = targets.describe(config("phi3")).linears
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == targets.lora_parameters(
        "attention", linears, r=4)
    out = model(input_ids=torch.tensor([[3, 4, 5]]))
    assert out.logits.shape == (1, 3, 128)
    with pytest.raises(ConfigError, match="match no linear layer"):
        attach_lora(transformers.AutoModelForCausalLM.from_config(config("phi3")),
                    LoraSection(target_modules=["q_proj"]), seed=0)


def test_dora_adds_the_magnitude_vector_to_the_closed_form():
    from peft import LoraConfig, get_peft_model

    linears = targets.describe(config("gpt_neox")).linears
    model = get_peft_model(transformers.AutoModelForCausalLM.from_config(config("gpt_neox")),
                           LoraConfig(r=4, use_dora=True, target_modules=targets.resolve("attention", linears)))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == targets.lora_parameters(
        "attention", linears, r=4, dora=True)


def test_preflight_refuses_unmatched_names_before_any_ray_work(tmp_path):
    from cluster.config import load_config, preflight

    config("gpt_neox").save_pretrained(tmp_path)
    ok = load_config(None, [f"model.name={tmp_path}", "lora.target_modules=[query_key_value, attention.dense]"])
    preflight(ok, ["model"])
    bad = load_config(None, [f"model.name={tmp_path}", "lora.target_modules=[q_proj, dense]"])
    with pytest.raises(ConfigError, match=r"\['q_proj'\] match no linear layer.*query_key_value, dense"):
        preflight(bad, ["model"], source="run.yaml")
    with pytest.raises(ConfigError, match=r"model.name='tiny-llama'.*\['gate'\] match no linear layer.*gate_proj"):
        preflight(load_config(None, ["model.name=tiny-llama", "model.cache_dir=" + str(tmp_path / "c"),
                                     "lora.target_modules=[gate]"]), ["model"])


def test_plan_counts_lora_from_the_listing(tmp_path):
    from cluster.config import load_config
    from cluster.plan import plan_training
    from cluster.plan_render import render_lora_config
    from cluster.plan_shape import config_of, shape_of

    config("phi3").save_pretrained(tmp_path)
    cfg = load_config(None, [f"model.name={tmp_path}", "lora.r=4"])
    linears = targets.describe(config("phi3")).linears
    plan = plan_training(cfg, shape_of(str(tmp_path)))
    assert plan.setup.targets == ("o_proj", "qkv_proj", "gate_up_proj", "down_proj")
    assert plan.trainable == targets.lora_parameters("all-linear", linears, r=4) == peft_trainable(
        "phi3", list(plan.setup.targets))
    table = render_lora_config(str(tmp_path), config_of(str(tmp_path)), 4, "all-linear")
    assert "qkv_proj" in table and f"{plan.trainable:,}" in table
