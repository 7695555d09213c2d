"""Merge stage: fold LoRA adapter(s) into a full-precision copy of the base; check the merged model still behaves
like base + adapter; save a Hugging Face safetensors folder with a manifest that states the parity figures.

    loraforge merge CONFIG --adapter runs/quickstart/sft                 # -> runs/quickstart/merge/
    loraforge merge CONFIG --adapter a/ --adapter b/ merge.combination=ties merge.weights=[0.5,0.5]

Never into NF4 weights: the base is always reloaded unquantized from its folder (QLoRA adapters included),
merged in float32, then cast to `dtype`. Parity = max |logit difference| on a few prompts (base + adapter,
unmerged, float32 vs merged in `dtype`) within `logits_atol`, and below half the adapter's own effect on the
logits (else a merge that dropped the fine-tune could pass), plus the share of identical greedy tokens.

The merge and its parity check run in a Ray task (`merge_on_device`) that holds a GPU when the cluster has one
(merge.num_gpus), computed there; the driver checks the inputs, and writes the manifest into and publishes the
folder the task wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines.artifacts.manifest import MANIFEST, publish_folder, read_manifest, staging_folder, write_manifest
from pipelines.artifacts.models import refuse_quantized
from pipelines.eval.metrics import token_agreement
from pipelines.schema import ConfigError, MissingInput, Section, UserError, actor_gpus, cluster_gpus, torch_device

DEFAULT_PROMPTS = ["Extract the city and the date from the sentence. Answer with JSON only.\n\n"
                   "Ana flies to Oslo on 4 June.",
                   "Write one sentence about the sea.", "What is 12 plus 30?"]


class MergeSection(Section):
    """How adapters are merged into the base and how the result is checked."""

    dtype: Literal["bfloat16", "float32", "float16"] = Field(
        "bfloat16", description="dtype of the saved merged model (the merge itself is computed in float32).")
    combination: Literal["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                         "magnitude_prune"] = Field(
        "linear", description="With several adapters: PEFT add_weighted_adapter combination type.")
    weights: list[float] | None = Field(None, description="Per-adapter weights; default equal, summing to 1.")
    density: float = Field(0.5, gt=0, le=1, description="TIES/DARE: share of delta weights kept.")
    logits_atol: float | None = Field(None, gt=0, description=(
        "Max |logit diff| allowed, merged vs base+adapter; default 1e-3 (float32) or 0.25 (bf16/fp16)."))
    min_greedy_agreement: float = Field(0.9, ge=0, le=1, description=(
        "Least share of greedy tokens that must agree, merged vs base+adapter."))
    parity_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS),
                                      description="User messages used for the parity check.")
    parity_max_new_tokens: int = Field(16, ge=1, description="Greedy tokens generated per parity prompt.")
    num_gpus: float | None = Field(None, ge=0, description=(
        "GPUs the merge task holds (the merge and the parity check run there); None: one when the cluster has "
        "GPUs, else none."))


class ParityError(UserError, RuntimeError):
    """The merged model does not behave like base + adapter within the stated tolerance."""


def run(cfg: MergeSection, base_model: str, adapters: list[str], out_dir: str | os.PathLike) -> Path:
    """Merge `adapters` into `base_model` and check parity in a Ray task (on a GPU when the cluster has one); write
    the manifest into the HF folder it wrote and publish it as out_dir."""
    import ray

    if not adapters:
        raise MissingInput("merge: no adapter given; pass --adapter FOLDER (a LoRA adapter folder), or run "
                           "`loraforge sft` first")
    refuse_quantized(base_model, "merge needs the unquantized base: set model.name to the full-precision model "
                                 "the adapter was trained on")
    combination_weights(cfg, len(adapters))
    qlora = [a for a in adapters if trained_on_quantized_base(a)]
    out = Path(out_dir).resolve()
    tmp = staging_folder(out)
    options = task_options(cfg.num_gpus, cluster_gpus())
    task = ray.remote(**options)(merge_on_device)
    got = ray.get(task.remote(cfg, base_model, [str(a) for a in adapters], str(tmp),
                              torch_device(options["num_gpus"])))
    parity = got["parity"]
    if not parity["passed"]:
        raise ParityError(f"merge parity failed: {json.dumps(parity)}; the merged model does not behave like base + "
                          "adapter: save it in merge.dtype=float32, or loosen merge.logits_atol / "
                          "merge.min_greedy_agreement when the drift is expected")
    write_manifest(tmp, kind="merged_model",
                   inputs={"base_model": base_model, **{f"adapter{i}": a for i, a in enumerate(adapters)}},
                   config={"merge": cfg.model_dump()}, metrics={"parity": parity, "device": got["device"]},
                   extra={"base_model": base_model, "adapters": [str(a) for a in adapters],
                          "source": {"base_model": base_model, "adapters": [str(a) for a in adapters]},
                          "base_loaded_as": "float32 (unquantized), saved as " + cfg.dtype,
                          "adapters_trained_on_quantized_base": qlora})
    publish_folder(tmp, out)
    return out


def task_options(requested: float | None, available: float) -> dict[str, float]:
    """What the merge task asks Ray for: one CPU, and its GPUs (pipelines.schema.actor_gpus: as configured;
    unset, one when the cluster has GPUs)."""
    return {"num_cpus": 1, "num_gpus": actor_gpus(requested, available)}


def merge_on_device(cfg: MergeSection, base_model: str, adapters: list[str], out: str, device: str) -> dict[str, Any]:
    """The Ray task's body: base + adapters in float32 on `device`, merged there, parity against the unmerged
    model on the same device; when parity passes, the merged model (cast to cfg.dtype) and the tokenizer are
    saved into `out`. Returns {"parity": parity_report(...), "device": device}."""
    import torch
    from transformers import AutoTokenizer

    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    tok_src = adapters[0] if (Path(adapters[0]) / "tokenizer_config.json").is_file() else base_model
    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    peft_model = _load_with_adapters(cfg, base_model, adapters).to(device)
    prompts = [ids.to(device) for ids in _prompt_ids(tokenizer, cfg.parity_prompts)]
    with torch.no_grad():
        with peft_model.disable_adapter():
            base_logits = [peft_model(ids).logits.float() for ids in prompts]
        ref_logits = [peft_model(ids).logits.float() for ids in prompts]
        ref_tokens = [_greedy(peft_model, ids, cfg.parity_max_new_tokens, tokenizer) for ids in prompts]
    merged = peft_model.merge_and_unload().to(getattr(torch, cfg.dtype)).eval()
    with torch.no_grad():
        got_logits = [merged(ids).logits.float() for ids in prompts]
        got_tokens = [_greedy(merged, ids, cfg.parity_max_new_tokens, tokenizer) for ids in prompts]
    parity = parity_report(base_logits, ref_logits, got_logits, ref_tokens, got_tokens, cfg)
    if parity["passed"]:
        merged.to("cpu").save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return {"parity": parity, "device": device}


def combination_weights(cfg: MergeSection, n: int) -> list[float]:
    """Per-adapter weights of a multi-adapter merge: merge.weights, default equal (summing to 1)."""
    weights = cfg.weights or [1.0 / n] * n
    if len(weights) != n:
        raise ConfigError(f"merge.weights has {len(weights)} entries for {n} adapters; give one weight per "
                          "--adapter, or leave merge.weights unset (equal weights)")
    return weights


def _load_with_adapters(cfg: MergeSection, base_model: str, adapters: list[str]):
    """Unquantized float32 base + every adapter, on the CPU; with several, their weighted combination is the
    active one."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    if len(adapters) > 1:
        names = [f"a{i}" for i in range(len(adapters))]
        pruned = cfg.combination.startswith(("ties", "dare", "magn"))
        kwargs: dict[str, Any] = {"density": cfg.density} if pruned else {}
        model.add_weighted_adapter(names, combination_weights(cfg, len(adapters)), "combined",
                                   combination_type=cfg.combination, **kwargs)
        model.set_adapter("combined")
    return model.eval()


def parity_report(base_logits, ref_logits, got_logits, ref_tokens, got_tokens, cfg: MergeSection) -> dict[str, Any]:
    """Pure comparison of logits and greedy tokens; 'passed' says whether the merge kept base + adapter."""

    atol = cfg.logits_atol or (1e-3 if cfg.dtype == "float32" else 0.25)
    diff = max(float((g - r).abs().max()) for g, r in zip(got_logits, ref_logits))
    effect = max(float((r - b).abs().max()) for r, b in zip(ref_logits, base_logits))
    agreement = token_agreement(ref_tokens, got_tokens)
    return {"max_abs_logit_diff": diff, "logits_atol": atol, "adapter_effect_max_abs_logit": effect,
            "greedy_token_agreement": agreement, "min_greedy_agreement": cfg.min_greedy_agreement,
            "greedy_identical": all(r == g for r, g in zip(ref_tokens, got_tokens)),
            "passed": diff <= atol and diff < 0.5 * effect and agreement >= cfg.min_greedy_agreement}


def trained_on_quantized_base(adapter: str | os.PathLike) -> bool:
    """Whether an adapter's manifest says its base was loaded 4- or 8-bit (QLoRA): config.quant.load_in_4bit/8bit."""
    if not (Path(adapter) / MANIFEST).is_file():
        return False
    quant = read_manifest(adapter).get("config", {}).get("quant") or {}
    return bool(quant.get("load_in_4bit") or quant.get("load_in_8bit"))


def _prompt_ids(tokenizer, prompts: list[str]):
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"] for p in prompts]


def _greedy(model, ids, max_new_tokens: int, tokenizer) -> list[int]:
    out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()
