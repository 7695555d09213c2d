"""LoRA target modules resolved from the model itself, not from Llama's names. Pure at import: torch and
transformers load inside the functions that need them.

A model's linear layers are listed from its config alone: the model is built on the meta device
(`with torch.device("meta"): AutoModelForCausalLM.from_config(config)`, no weights read or allocated), and every
`torch.nn.Linear` (subclasses included: bitsandbytes' Linear4bit, Falcon's FalconLinear) and transformers' GPT-2
`Conv1D` is one `Linear(name, d_in, d_out, role)`, `name` its full module name. A loaded model (a Ray Train
worker's) is listed the same way (`list_linears`).

`lora.target_modules` resolves against that listing (`resolve`):
- `all-linear`: every linear layer but the output head (`model.get_output_embeddings()`), PEFT's own rule for
  "all-linear" (peft.tuners.tuners_utils._maybe_include_all_linear_layers), less the mixture-of-experts layers
  below;
- `attention`: the linear layers inside the attention block: those with an ancestor module whose class name
  says attention (LlamaAttention, GPT2Attention, GPTNeoXAttention, FalconAttention, MptAttention, ...), found
  structurally, whatever the layers are called (q/k/v/o_proj, qkv_proj, c_attn + attn.c_proj,
  query_key_value + dense, Wqkv + out_proj);
- `mlp`: the linear layers of the feed-forward block (an ancestor class named MLP / FeedForward / FFN / MoE, or
  a path component mlp / ffn / feed_forward), attention excluded;
- an explicit list: each name must match a linear layer by PEFT's rule (a module matches a name when its full
  name equals it or ends with "." + name); names that match none are a ConfigError listing the model's linear
  layers.

Mixture-of-experts (Qwen2-MoE, Qwen3-MoE, Mixtral): `all-linear` and `mlp` are the attention and the dense
(shared) layers only. The router (`mlp.gate`) and any gate beside the experts (Qwen2-MoE's
`shared_expert_gate`, a Linear(hidden, 1)) are never targets, and neither are the experts: transformers 5 holds
them as fused 3-D parameters (`experts.gate_up_proj`, `experts.down_proj`), not linear modules, so PEFT's
`target_modules` cannot reach them, and older per-expert `nn.Linear`s (`experts.N.w1`) are left out by the same
rule so that the adapter, its count and what vLLM serves do not depend on the transformers version. Mixtral and
Qwen3-MoE have no dense MLP layer: `mlp` is refused there, and `all-linear` is the attention.

Names are returned in the form PEFT's LoraConfig takes and vLLM serves: for each selected layer the shortest
dotted suffix of its name (the leaf, `q_proj`, where that is unambiguous) that matches no unselected linear
layer, in module order. Llama and Qwen2 give exactly q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj for `all-linear`; GPT-2's attention is c_attn and attn.c_proj (its MLP has a c_proj too).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipelines.schema import ConfigError

Role = Literal["attention", "mlp", "other", "head", "router", "expert"]
PRESETS = ("all-linear", "attention", "mlp")
ATTENTION_CLASS = re.compile(r"attention|attn", re.I)
MLP_CLASS = re.compile(r"mlp|feedforward|ffn|moe|experts?$", re.I)
_LISTINGS: dict[str, "Listing"] = {}  # describe's cache, by the config's JSON
MLP_PATH = {"mlp", "ffn", "feed_forward", "feedforward", "block_sparse_moe"}


@dataclass(frozen=True)
class Linear:
    """One linear layer: its full module name, (in, out) features and its role in the block."""

    name: str
    d_in: int
    d_out: int
    role: Role

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Listing:
    """A model's linear layers (module order), its parameter count and decoder layer count."""

    linears: tuple[Linear, ...]
    total_params: int
    layers: int
    model_type: str = ""

    def names(self) -> list[str]:
        return [x.name for x in self.linears]


def matches(target: str, name: str) -> bool:
    """PEFT's rule for a name in a target_modules list: the module's full name equals it or ends with "." + it."""
    return name == target or name.endswith("." + target)


def _shape(module) -> tuple[int, int]:
    """(in, out) of a Linear (in_features/out_features, also under ZeRO-3 partitioning) or a Conv1D (weight is
    in × out; ds_shape when DeepSpeed partitioned it)."""
    if hasattr(module, "in_features"):
        return int(module.in_features), int(module.out_features)
    w = module.weight
    shape = tuple(getattr(w, "ds_shape", w.shape))
    return int(shape[0]), int(module.nf)


def _role(name: str, chain: Sequence[tuple[str, Any]]) -> Role:
    """The role of the linear at `name`, from its ancestors (path component, module), outermost first."""
    leaf = name.rsplit(".", 1)[-1]
    parts = name.split(".")
    if "experts" in parts[:-1]:
        return "expert"
    parent = chain[-1][1] if chain else None
    if parent is not None and hasattr(parent, "experts") and (leaf in ("gate", "router") or leaf.endswith("_gate")):
        return "router"
    if any(ATTENTION_CLASS.search(type(m).__name__) for _, m in chain):
        return "attention"
    if any(MLP_CLASS.search(type(m).__name__) or part in MLP_PATH for part, m in chain):
        return "mlp"
    return "other"


def list_linears(model) -> list[Linear]:
    """Every nn.Linear (and subclass) and transformers Conv1D of `model` (meta, loaded, 4-bit or PEFT-wrapped:
    LoRA's own lora_A/lora_B and the wrapped base_layer are skipped, the wrapper stands for its base layer), in
    module order, with its role; the output head has role "head"."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = dict(model.named_modules())
    out: list[Linear] = []
    for name, module in modules.items():
        wrapped = hasattr(module, "base_layer") and hasattr(module, "lora_A")
        base = module.base_layer if wrapped else module
        if not isinstance(base, (torch.nn.Linear, Conv1D)) or ".lora_" in f".{name}" or name.endswith(".base_layer"):
            continue
        parts = name.split(".")
        chain = [(parts[i - 1], modules[".".join(parts[:i])]) for i in range(1, len(parts))]
        is_head = head is not None and (base is head or module is head)
        role: Role = "head" if is_head else _role(name, chain)
        out.append(Linear(_peft_free(name), *_shape(base), role))
    return out


def _peft_free(name: str) -> str:
    """A module name as the base model has it (PEFT's wrapper adds base_model.model.)."""
    return name.removeprefix("base_model.model.")


def _config(config) -> Any:
    """A transformers config from a PretrainedConfig, a config.json dict, or a model folder / config.json path."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, (str, Path)):
        path = Path(config)
        return AutoConfig.from_pretrained(str(path.parent if path.name == "config.json" else path))
    d = dict(config)
    if "model_type" not in d:
        raise ConfigError("the model's config has no model_type, so its modules cannot be listed")
    return AutoConfig.for_model(d.pop("model_type"), **d)


def describe(config) -> Listing:
    """The listing of a model built from its config on the meta device (nothing allocated, nothing downloaded).
    config: a transformers config, a config.json dict, or a model folder. Cached by the config's JSON."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = _config(config)
    key = cfg.to_json_string(use_diff=False)
    if key in _LISTINGS:
        return _LISTINGS[key]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    found = Listing(tuple(list_linears(model)), sum(p.numel() for p in model.parameters()), layers,
                    str(getattr(cfg, "model_type", "")))
    if len(_LISTINGS) >= 32:
        _LISTINGS.pop(next(iter(_LISTINGS)))
    _LISTINGS[key] = found
    return found


def selected(spec: str | Sequence[str], linears: Sequence[Linear]) -> list[Linear]:
    """The linear layers a target_modules value puts a LoRA on: a preset's (module docstring) or those an explicit
    list matches by PEFT's rule. ConfigError for a preset with no layer on this model, or names matching none."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ConfigError(f"lora.target_modules={spec!r}: not one of {', '.join(PRESETS)} (or a list of names)")
        roles = {"all-linear": ("attention", "mlp", "other"), "attention": ("attention",), "mlp": ("mlp",)}[spec]
        chosen = [x for x in linears if x.role in roles]
        if not chosen:
            raise ConfigError(f"lora.target_modules={spec}: this model has no such linear layers (its linear layers: "
                              f"{', '.join(_summary(linears))}); name them as a list instead")
        return chosen
    names = list(spec)
    unmatched = [t for t in names if not any(matches(t, x.name) for x in linears)]
    if unmatched:
        raise ConfigError(f"lora.target_modules: {unmatched} match no linear layer of this model (PEFT matches a "
                          f"module whose full name equals a name or ends with '.' + it); its linear layers: "
                          f"{', '.join(_summary(linears))}")
    return [x for x in linears if any(matches(t, x.name) for t in names)]


def _summary(linears: Iterable[Linear]) -> list[str]:
    """The distinct shortest names of the linear layers, head included (for error messages)."""
    ls = list(linears)
    return _names(ls, ls)


def _names(chosen: Sequence[Linear], linears: Sequence[Linear]) -> list[str]:
    """For each chosen layer the shortest dotted suffix of its name that matches no unchosen linear layer,
    deduplicated in module order (see the module docstring)."""
    keep = {x.name for x in chosen}
    others = [x.name for x in linears if x.name not in keep]
    out: list[str] = []
    for x in chosen:
        parts = x.name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[i:])
            if not any(matches(suffix, o) for o in others):
                break
        if suffix not in out:
            out.append(suffix)
    return out


def resolve(spec: str | Sequence[str], linears: Sequence[Linear]) -> list[str]:
    """target_modules for PEFT's LoraConfig: a preset resolved to names on this model (module docstring), or an
    explicit list checked against it (returned as given)."""
    chosen = selected(spec, linears)
    return list(spec) if not isinstance(spec, str) else _names(chosen, linears)


def lora_counts(spec: str | Sequence[str], linears: Sequence[Linear], r: int, dora: bool = False
                ) -> dict[str, dict[str, int]]:
    """Trainable parameters per resolved target name: r·(in + out) per matrix (A: r × in, B: out × r; + out for
    DoRA's magnitude vector), summed over every layer the name matches. Rows: in, out, per_matrix, count (layers
    matched) and total; a name matching layers of several shapes (GPT-2's c_proj: attention and MLP) gets one row
    per shape, keyed "name (in→out)". The totals sum to PEFT's trainable count for the same target_modules."""
    names = resolve(spec, linears)
    chosen = selected(spec, linears)
    rows: dict[str, dict[str, int]] = {}
    for t in names:
        shapes: dict[tuple[int, int], int] = {}
        for x in chosen:
            if matches(t, x.name):
                shapes[(x.d_in, x.d_out)] = shapes.get((x.d_in, x.d_out), 0) + 1
        for (d_in, d_out), n in shapes.items():
            per = r * (d_in + d_out) + (d_out if dora else 0)
            key = t if len(shapes) == 1 else f"{t} ({d_in}→{d_out})"
            rows[key] = {"in": d_in, "out": d_out, "per_matrix": per, "count": n, "total": per * n}
    return rows


def lora_parameters(spec: str | Sequence[str], linears: Sequence[Linear], r: int, dora: bool = False) -> int:
    """The closed form of PEFT's trainable count: Σ over the selected layers of r·(in + out) (+ out with DoRA)."""
    return sum(r * (x.d_in + x.d_out) + (x.d_out if dora else 0) for x in selected(spec, linears))
