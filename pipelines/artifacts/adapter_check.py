"""An adapter's weights against its own config, and against its base, before an engine loads them.

vLLM trusts `adapter_model.safetensors`: a tensor of the wrong shape, a rank other than `r`, a module the config
does not name or a layer the base does not have fails inside the engine (a 500, or a dead engine core) or, worse,
loads. This reads only the file's header (names, dtypes, shapes: `safetensors.safe_open`, nothing unpickled, no
tensor data) and refuses, naming the file, the tensor and what is wrong:

    check_adapter_weights(folder, conf)                       # conf: adapter_config.json, already parsed
    check_adapter_weights(folder, conf, bases={"/models/tiny"})  # + hidden sizes of a base folder found there
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipelines.schema import UserError

WEIGHTS = "adapter_model.safetensors"
# PEFT's saved LoRA tensors: <module>.lora_A.weight [r, in] and <module>.lora_B.weight [out, r].
LORA_TENSOR = re.compile(r"\A(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight\Z")
FLOATS = {"F16", "BF16", "F32", "F64"}
LAYER = re.compile(r"\.layers\.(\d+)\.")
# (in, out) of the projections of Llama-style decoders, from the base's config (head_dim when it gives one).
PROJECTIONS = re.compile(r"\.layers\.\d+\.(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|"
                         r"down_proj)\Z")
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo2", "smollm3"}


class AdapterWeightsError(UserError, ValueError):
    """adapter_model.safetensors does not match adapter_config.json or the base; the message names the file, the
    tensor and what is wrong."""


def check_adapter_weights(folder: str | Path, conf: dict[str, Any], *, bases: Iterable[str] | None = None,
                          error: type[Exception] = AdapterWeightsError) -> None:
    """Raise `error` when the adapter's tensors disagree with its config (rank, target modules, A/B pairs, 2-D
    float matrices) or with a base folder among `bases` (layer count, hidden sizes of Llama-style projections)."""
    path = Path(folder) / WEIGHTS
    try:
        shapes = _header(path)
    except Exception as e:  # noqa: BLE001 - safetensors' own message says what is wrong with the bytes
        raise error(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    base = _base_config(bases or ())
    problem = _problem(shapes, conf, base)
    if problem:
        raise error(f"{path}: {problem}")


def _header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape), from the header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {k: (str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape())) for k in f.keys()}


def _problem(shapes: dict[str, tuple[str, list[int]]], conf: dict[str, Any], base: dict[str, Any] | None) -> str:
    if not shapes:
        return "holds no tensors"
    pairs: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for name, (dtype, shape) in sorted(shapes.items()):
        m = LORA_TENSOR.match(name)
        if m is None:
            return (f"tensor {name!r} is not a LoRA weight (<module>.lora_A.weight / <module>.lora_B.weight); "
                    "vLLM serves only those")
        if dtype not in FLOATS:
            return f"tensor {name!r} has dtype {dtype}, expected a float type ({', '.join(sorted(FLOATS))})"
        if len(shape) != 2 or 0 in shape:
            return f"tensor {name!r} has shape {shape}, expected a non-empty 2-D matrix"
        pairs.setdefault(m["module"], {})[m["part"]] = (name, shape)
    targets = conf.get("target_modules")
    for module, parts in sorted(pairs.items()):
        for missing in {"lora_A", "lora_B"} - set(parts):
            present = next(iter(parts.values()))[0]
            return f"tensor {present!r} has no {module}.{missing}.weight beside it"
        (a_name, a), (b_name, b) = parts["lora_A"], parts["lora_B"]
        if a[0] != b[1]:
            return f"tensor {a_name!r} has rank {a[0]} (shape {a}) but {b_name!r} has rank {b[1]} (shape {b})"
        expected = _rank(module, conf)
        if expected is not None and a[0] != expected:
            return (f"tensor {a_name!r} has rank {a[0]} (shape {a}), but adapter_config.json says "
                    f"{'rank_pattern ' if expected != conf.get('r') else ''}r={expected}")
        if not _targeted(module, targets):
            return f"tensor {a_name!r} is a LoRA on {module.rsplit('.', 1)[-1]!r}, which adapter_config.json's " \
                   f"target_modules {targets!r} does not name"
        if base is not None and (wrong := _against_base(module, a, b, base)):
            return f"tensor {a_name!r} is {wrong}"
    return ""


def _rank(module: str, conf: dict[str, Any]) -> int | None:
    """The rank adapter_config.json gives this module: a matching rank_pattern key (PEFT: the key is a regex
    matched at the end of the module's name), else r."""
    key = _key(module)
    for pattern, rank in (conf.get("rank_pattern") or {}).items():
        try:
            if re.match(rf"(.*\.)?(?:{pattern})\Z", key):
                return int(rank)
        except re.error:
            return None  # a pattern PEFT may read otherwise: no claim about this module's rank
    r = conf.get("r")
    return int(r) if isinstance(r, int) or str(r).isdigit() else None


def _key(module: str) -> str:
    """The module's name in the base model (PEFT saves it under base_model.model.)."""
    return module.removeprefix("base_model.model.")


def _targeted(module: str, targets: Any) -> bool:
    """Whether target_modules covers the module: a list names last components (or dotted suffixes), a string is
    'all-linear' or a regex matched against the whole name (PEFT's rules)."""
    if not targets:
        return True  # nothing declared (a config from elsewhere): nothing to compare against
    key = _key(module)
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        try:
            return re.fullmatch(targets, key) is not None
        except re.error:
            return True
    return any(key == t or key.endswith(f".{t}") for t in map(str, targets))


def _base_config(bases: Iterable[str]) -> dict[str, Any] | None:
    """The text config of a base folder among `bases` (config.json); None when none is a folder here, or the
    folders found disagree on their sizes."""
    found = []
    for b in bases:
        try:
            doc = json.loads((Path(b) / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            doc = doc.get("text_config") if isinstance(doc.get("text_config"), dict) else doc
            found.append({k: doc.get(k) for k in ("model_type", "hidden_size", "intermediate_size",
                                                  "num_attention_heads", "num_key_value_heads", "head_dim",
                                                  "num_hidden_layers")})
    return found[0] if found and all(f == found[0] for f in found) else None


def _against_base(module: str, a: list[int], b: list[int], base: dict[str, Any]) -> str | None:
    """What is wrong when the module's layer or (in, out) sizes are not the base's."""
    layers = base.get("num_hidden_layers")
    m = LAYER.search(f".{_key(module)}")
    if m and isinstance(layers, int) and int(m[1]) >= layers:
        return f"a LoRA on layer {m[1]}, but the base has {layers} layers (0..{layers - 1})"
    p = PROJECTIONS.search(f".{_key(module)}")
    if p is None or base.get("model_type") not in LLAMA_LIKE:
        return None
    sizes = _projection_sizes(base)
    if sizes is None:
        return None
    want_in, want_out = sizes[p[1]]
    if a[1] != want_in or b[0] != want_out:
        return (f"a LoRA on a {p[1]} of {a[1]} -> {b[0]} features (lora_A {a}, lora_B {b}), but the base's {p[1]} "
                f"maps {want_in} -> {want_out}: the adapter was trained on another base")
    return None


def _projection_sizes(base: dict[str, Any]) -> dict[str, tuple[int, int]] | None:
    hidden, inter, heads = base.get("hidden_size"), base.get("intermediate_size"), base.get("num_attention_heads")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, inter, heads)):
        return None
    kv = base.get("num_key_value_heads") or heads
    head_dim = base.get("head_dim") or hidden // heads
    q, k = heads * head_dim, kv * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, k), "v_proj": (hidden, k), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
