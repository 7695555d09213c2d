"""Batched generation for evaluation: a Ray Data `map_batches` actor that holds one engine for the base model
and every adapter, and answers each row with the row's variant (base, few-shot base, or an adapter).

Two engines behind one interface: vLLM offline (`vllm.LLM`, enable_lora, greedy; the default for real models)
and transformers + PEFT (left-padded batched `generate`; starts in a second, for tiny models and machines
without vLLM). Both decode greedily.

Both compute in `eval.dtype`, resolved for the device that computes (`resolve_dtype`): `auto` is bfloat16 on a
GPU, float32 on a CPU (faster there without native bf16, and exact).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipelines.artifacts.signals import TOP_K, topk_entropy
from pipelines.schema import torch_device, vllm_in_one_process

DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(requested: str, device: str) -> str:
    """The dtype a model computes in: as configured; `auto`, bfloat16 on a GPU (`cuda`) and float32 on a CPU."""
    if requested == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    if requested not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {DTYPES}, got {requested!r}")
    return requested


class Generator:
    """Ray Data callable class: rows {variant, prompt} -> + {prediction}. One engine per actor."""

    def __init__(self, backend: str, base_model: str, adapters: dict[str, str], max_new_tokens: int,
                 max_lora_rank: int = 64, max_model_len: int = 2048, device: str = "cpu", dtype: str = "float32"):
        self.backend, self.adapters, self.max_new_tokens, self.device = backend, adapters, max_new_tokens, device
        if backend == "vllm":
            os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            vllm_in_one_process(device)
            from vllm import LLM

            # max_loras one above the adapters in use: with every LoRA slot full, vLLM applies the last slot's
            # adapter to the base requests that share its batch (vllm#48421).
            self.llm = LLM(model=base_model, dtype=dtype, enable_lora=bool(adapters),
                           max_loras=len(adapters) + 1, max_lora_rank=max_lora_rank,
                           max_model_len=model_len(base_model, max_model_len),
                           seed=0, enforce_eager=True)
        else:
            import torch
            from transformers import AutoTokenizer

            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
            self.tok = AutoTokenizer.from_pretrained(base_model, padding_side="left")
            self.model = load_with_adapters(base_model, adapters, dtype).to(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """+ prediction, and the answer's signals (pipelines.artifacts.signals: mean top-k entropy, generated
        tokens, finish reason), which the gate stores with a published version as its serving baseline."""
        variants, prompts = list(batch["variant"]), list(batch["prompt"])
        preds, entropy, tokens, finish = [""] * len(prompts), [np.nan] * len(prompts), [0] * len(prompts), \
            [""] * len(prompts)
        for variant in dict.fromkeys(variants):
            idx = [i for i, v in enumerate(variants) if v == variant]
            outs = self._generate([prompts[i] for i in idx], variant if variant in self.adapters else None)
            for i, (text, ent, n, why) in zip(idx, outs):
                preds[i], entropy[i], tokens[i], finish[i] = text, ent, n, why
        return {**batch, "prediction": np.array(preds, dtype=object), "entropy": np.array(entropy, dtype=float),
                "gen_tokens": np.array(tokens), "finish_reason": np.array(finish, dtype=object)}

    def _generate(self, prompts: list[str], adapter: str | None) -> list[tuple[str, float, int, str]]:
        """(text, mean top-k entropy or nan, generated tokens, finish reason) per prompt, greedy."""
        if self.backend == "vllm":
            from vllm import SamplingParams
            from vllm.lora.request import LoRARequest

            lora = None
            if adapter:
                lora = LoRARequest(adapter, list(self.adapters).index(adapter) + 1, self.adapters[adapter])
            outs = self.llm.generate(prompts, SamplingParams(temperature=0, max_tokens=self.max_new_tokens,
                                                             logprobs=TOP_K), lora_request=lora, use_tqdm=False)
            return [(o.outputs[0].text, _vllm_entropy(o.outputs[0].logprobs), len(o.outputs[0].token_ids),
                     str(o.outputs[0].finish_reason or "length")) for o in outs]
        return self._hf_generate(prompts, adapter)

    def _hf_generate(self, prompts: list[str], adapter: str | None) -> list[tuple[str, float, int, str]]:
        import contextlib

        import torch

        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        ctx = contextlib.nullcontext()
        if hasattr(self.model, "disable_adapter"):
            if adapter:
                self.model.set_adapter(adapter)
            else:
                ctx = self.model.disable_adapter()
        with torch.no_grad(), ctx:
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id, output_scores=True,
                                      return_dict_in_generate=True)
        new = out.sequences[:, enc["input_ids"].shape[1]:]
        texts = self.tok.batch_decode(new, skip_special_tokens=True)
        # Each step's top-k renormalised entropy (the serving replicas' signal), over the tokens each row generated.
        logp = torch.log_softmax(torch.stack(out.scores).float(), dim=-1)  # [steps, batch, vocab]
        top = logp.topk(min(TOP_K, logp.shape[-1]), dim=-1).values
        q = torch.softmax(top, dim=-1)
        step_entropy = -(q * torch.log(q.clamp_min(1e-30))).sum(-1)  # [steps, batch]
        eos = self.tok.eos_token_id
        rows = []
        for i, text in enumerate(texts):
            ids = new[i].tolist()
            n = ids.index(eos) + 1 if eos in ids else len(ids)
            ent = float(step_entropy[:n, i].mean()) if n else float("nan")
            rows.append((text, ent, n, "stop" if eos in ids else "length"))
        return rows


def _vllm_entropy(logprobs: Any) -> float:
    """Mean top-k entropy of a vLLM answer's sample log-probs (positions of {token_id: Logprob}); nan without."""
    if not logprobs:
        return float("nan")
    per = [topk_entropy(lp.logprob for lp in pos.values() if (lp.rank or 0) <= TOP_K) for pos in logprobs if pos]
    return sum(per) / len(per) if per else float("nan")


def actor_options(num_gpus: float) -> dict[str, float]:
    """What the generator actor asks Ray for: one CPU, and its GPUs (pipelines.schema.actor_gpus)."""
    return {"num_cpus": 1, "num_gpus": num_gpus}


def generate(rows: list[dict[str, str]], backend: str, base_model: str, adapters: dict[str, str],
             max_new_tokens: int, batch_size: int = 16, max_lora_rank: int = 64, num_gpus: float = 0.0,
             dtype: str = "auto", signals: list[dict[str, Any]] | None = None) -> list[str]:
    """Answers for rows {variant, prompt}, in order, generated in batches by one Ray Data actor that holds
    `num_gpus` GPUs (0: a CPU actor), its engine computing in `dtype` resolved for that actor's device.
    `signals`, when given, is extended with each answer's {entropy, tokens, finish_reason}, in the same order."""
    import ray.data

    device = torch_device(num_gpus)
    ds = ray.data.from_items([{**r, "row": i} for i, r in enumerate(rows)])
    ds = ds.map_batches(Generator, batch_size=batch_size, concurrency=1, **actor_options(num_gpus),
                        fn_constructor_kwargs=dict(backend=backend, base_model=base_model, adapters=adapters,
                                                   max_new_tokens=max_new_tokens, max_lora_rank=max_lora_rank,
                                                   device=device, dtype=resolve_dtype(dtype, device)))
    out = sorted(ds.take_all(), key=lambda r: r["row"])
    if signals is not None:
        signals.extend({"entropy": None if np.isnan(r["entropy"]) else float(r["entropy"]),
                        "tokens": int(r["gen_tokens"]), "finish_reason": str(r["finish_reason"])} for r in out)
    return [str(r["prediction"]) for r in out]


def model_len(base_model: str, cap: int) -> int:
    """The context vLLM reserves KV cache for: the model's own limit, capped (a 128k-context model would not fit
    a CPU's KV cache, and evaluation prompts are short)."""
    import json
    from pathlib import Path

    try:
        own = json.loads((Path(base_model) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        own = None
    return min(cap, int(own)) if own else cap


def load_with_adapters(base_model: str, adapters: dict[str, str], dtype: str = "float32"):
    """The base in `dtype` (a torch dtype's name) with every adapter loaded under its own name (switch with
    set_adapter), in eval mode, on the CPU."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=getattr(torch, dtype))
    names = list(adapters)
    if names:
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()
