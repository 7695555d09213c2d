"""Evaluate + report + gate on the tiny model: a trained adapter beats base and few-shot base on ROUGE-L and is
promoted; a zero adapter (B=0) fails the gate with reasons; --force is recorded.

    .venv/bin/pytest tests/integration/test_eval.py -q

The report tests generate with the transformers backend (eval.backend=hf, starts in a second); one test runs the
default vLLM backend through the same Ray Data actor and checks it answers exactly as transformers + PEFT does.
The model is never loaded in the driver: generation and scoring run in Ray actors (on CPU here, in float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo" / "city_date.jsonl"


def train_adapter(base_dir: str, rows: list[dict], out: Path, *, steps: int, data_file: Path) -> Path:
    """A LoRA adapter trained with a plain torch loop (seconds on the tiny model), saved with an SFT-like manifest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.artifacts.manifest import write_manifest
    from pipelines.data.chat import pad_batch, tokenize_messages
    from pipelines.data.rowformats import alpaca_to_messages

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    data = [tokenize_messages(tok, alpaca_to_messages(r), 256) for r in rows]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = [data[(step * 8 + i) % len(data)] for i in range(8)]
        padded = pad_batch([(t.input_ids, t.labels) for t in batch], tok.pad_token_id)
        loss = model(**{k: torch.tensor(v) for k, v in padded.items()}).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    write_manifest(out, kind="lora_adapter", inputs={"data": str(data_file), "base_model": base_dir},
                   config={"lora": {"r": 8}, "train": {"max_steps": steps}},
                   metrics={"loss_last": float(loss.detach())},
                   extra={"base_model": base_dir, "data_hash": "sha256:test"})
    return out


def _not_in_the_driver(*args, **kwargs):
    raise AssertionError("the model was loaded in the driver process")


@pytest.fixture(scope="module")
def evaluated(ray_session, tiny_model_dir, repo_data, tmp_path_factory):
    """The forgetting checks read tests/data (never skips): MMLU marketing's first 8 questions (MIT) and, as held-out
    general text, 8 GSM8K answers (MIT; any text the adapter was not trained on serves: the checks are NLL > 0 and
    the zero adapter's delta 0)."""
    from pipelines.eval.evaluate import EvalSection, run

    root = tmp_path_factory.mktemp("eval")
    rows = [json.loads(x) for x in DEMO.read_text().splitlines()]
    train_file, test_file = root / "train.jsonl", root / "test.jsonl"
    train_file.write_text("\n".join(json.dumps(r) for r in rows[:300]))
    # two rows evaluation cannot use: counted and kept with their reasons, never silently dropped
    test_file.write_text("\n".join([*(json.dumps(r) for r in rows[-19:]), "{broken", json.dumps({"input": "x"})]))
    tuned = train_adapter(tiny_model_dir, rows[:300], root / "tuned", steps=50, data_file=train_file)
    zero = train_adapter(tiny_model_dir, rows[:300], root / "zero", steps=0, data_file=train_file)  # B = 0
    cfg = EvalSection(test_path=str(test_file), max_samples=16, few_shot_k=3, backend="hf", batch_size=32,
                      max_new_tokens=24, mmlu_dir=str(repo_data / "benchmark" / "mmlu"),
                      mmlu_subjects=["marketing"], mmlu_per_subject=8,
                      general_text_path=str(repo_data / "sft" / "gsm8k_train_alpaca.json"), general_max_samples=8)
    with pytest.MonkeyPatch.context() as mp:  # the driver never loads the model: actors do, in their processes
        for module in ("pipelines.eval.generate", "pipelines.eval.evaluate"):
            mp.setattr(f"{module}.load_with_adapters", _not_in_the_driver)
        out = run(cfg, tiny_model_dir, {"tuned": str(tuned), "zero": str(zero)}, root / "evaluate")
    return {"out": out, "results": json.loads((out / "eval.json").read_text()), "tuned": tuned, "zero": zero,
            "root": root}


def test_trained_adapter_beats_base_and_few_shot_on_rougeL(evaluated):
    s = evaluated["results"]["variants"]
    print({v: {k: round(x, 4) for k, x in m.items()} for v, m in s.items()})
    assert set(s) == {"base", "few_shot", "tuned", "zero"}
    assert s["tuned"]["rougeL"] > s["base"]["rougeL"] + 0.2, s
    assert s["tuned"]["rougeL"] > s["few_shot"]["rougeL"] + 0.1, s
    assert s["tuned"]["perplexity"] < s["base"]["perplexity"] / 2
    assert s["zero"]["rougeL"] == pytest.approx(s["base"]["rougeL"])  # B=0: identical to the base
    for v in s.values():
        assert 0 <= v["bleu"] <= 100 and 0 <= v["exact_match"] <= 1
    # BERTScore's value itself is checked against bert_score on fixed pairs in tests/unit/eval/test_metrics.py; here:
    # the same answers (B=0) score the same, and the trained adapter's answers score higher than the base's.
    assert s["zero"]["bertscore_f1"] == pytest.approx(s["base"]["bertscore_f1"], abs=1e-6)
    assert s["tuned"]["bertscore_f1"] > s["base"]["bertscore_f1"], s
    assert "The fine-tune helped" in evaluated["results"]["verdicts"]["tuned"]


def test_scoring_runs_in_an_actor_on_the_cpu_in_float32(ray_session, tiny_model_dir, evaluated):
    """The scorer is a Ray actor in another process; on CPU it computes in float32, as the same scorer does in this
    process, and eval.json and the manifest say where evaluation computed."""
    import os

    import ray
    import torch

    from pipelines.eval.evaluate import Scorer, start_scorer

    adapters = {"tuned": str(evaluated["tuned"])}
    scorer = start_scorer(tiny_model_dir, adapters)
    try:
        assert isinstance(scorer, ray.actor.ActorHandle)
        where = ray.get(scorer.where.remote())
        assert where["pid"] != os.getpid() and where["device"] == "cpu" and where["dtype"] == "float32"
        texts = ["The city is Oslo.", "Ana flies on 4 June."]
        remote = {a: ray.get(scorer.nll.remote(["Where?"] * 2, texts, a)) for a in (None, "tuned")}
    finally:
        ray.kill(scorer)
    threads = torch.get_num_threads()  # a Scorer sets its process's thread count: restored after
    try:
        local = Scorer(tiny_model_dir, adapters, "float32", "cpu")
        want = {a: local.nll(["Where?"] * 2, texts, a) for a in remote}
    finally:
        torch.set_num_threads(threads)
    for adapter, (total, count) in remote.items():
        assert type(total) is float and count == want[adapter][1]
        assert total == pytest.approx(want[adapter][0], rel=1e-6, abs=1e-6)
    assert remote[None][0] != remote["tuned"][0]
    r = evaluated["results"]
    assert r["device"] == "cpu" and r["dtype"] == "float32"
    metrics = json.loads((evaluated["out"] / "manifest.json").read_text())["metrics"]
    assert metrics["device"] == "cpu" and metrics["dtype"] == "float32"


def test_unusable_test_rows_are_counted_and_kept(evaluated):
    r = evaluated["results"]
    assert r["rows_in"] == 21 and r["rows_rejected"] == 2
    assert r["rejected_by_reason"] == {"broken_json": 1, "missing_field": 1}
    kept = [json.loads(x) for x in (evaluated["out"] / "rejected.jsonl").read_text().splitlines()]
    assert sorted(k["reason"] for k in kept) == ["broken_json", "missing_field"]


def test_forgetting_is_measured_against_base(evaluated):
    f = evaluated["results"]["forgetting"]
    assert 0 <= f["base"]["mmlu_accuracy"] <= 1 and f["base"]["general_nll"] > 0
    assert f["zero"]["general_nll_delta"] == pytest.approx(0, abs=1e-5)
    assert "general_nll_delta" in f["tuned"] and "mmlu_accuracy_delta" in f["tuned"]


def test_report_states_the_few_shot_verdict_and_has_plots(evaluated):
    out = evaluated["out"]
    report = (out / "eval_report.md").read_text()
    assert "## Verdict" in report and "few-shot" in report.lower() and "| ROUGE-L F |" in report
    for metric in ("rougeL", "bleu", "bertscore_f1", "perplexity"):
        assert (out / f"plot_{metric}.png").stat().st_size > 1000
    assert json.loads((out / "manifest.json").read_text())["kind"] == "eval_report"


def test_gate_promotes_the_trained_adapter_and_refuses_the_zero_one(evaluated, tmp_path):
    from pipelines.artifacts.registry import Registry
    from pipelines.eval.gate import GateSection, apply

    results, reg_root = evaluated["results"], tmp_path / "registry"
    gate = GateSection(min_rougeL_gain_over_base=0.1, min_rougeL_gain_over_few_shot=0.05,
                       max_general_nll_increase=10.0, alias="candidate")
    ok = apply(results, "tuned", evaluated["tuned"], gate, reg_root, "city")
    assert ok.passed and ok.version == 1 and not ok.reasons
    reg = Registry(reg_root)
    art = reg.resolve("city@candidate")
    assert art.version == 1 and (art.path / "adapter_model.safetensors").is_file()
    lineage = reg.show("city")["versions"]["1"]["lineage"]
    assert lineage["eval_scores"]["rougeL"] == results["variants"]["tuned"]["rougeL"]
    assert lineage["base_model_hash"].startswith("sha256:") and lineage["dataset_hash"] == "sha256:test"

    bad = apply(results, "zero", evaluated["zero"], gate, reg_root, "city")
    assert not bad.passed and bad.version is None
    assert any("ROUGE-L gain over base" in r for r in bad.reasons)
    assert any("few-shot" in r for r in bad.reasons)
    assert reg.resolve("city@candidate").version == 1 and reg.list()[0]["versions"] == [1]
    assert reg.audit()[-1]["action"] == "gate_refused" and reg.audit()[-1]["reasons"] == bad.reasons

    forced = apply(results, "zero", evaluated["zero"], gate, reg_root, "city", force=True)
    assert forced.forced and forced.version == 2 and reg.resolve("city@candidate").version == 2
    last = reg.audit()[-1]
    assert last["action"] == "promote" and last["force"] is True and "FORCED" in last["reason"]


def test_gate_freezes_the_serving_signals_as_the_version_baseline(evaluated, tmp_path):
    """eval.json holds each variant's serving signals (pipelines.artifacts.signals, top-20 entropy from the
    generation scores); the gate stores the published adapter's as its baseline (lineage serve_baseline)."""
    import math

    from pipelines.artifacts.registry import Registry
    from pipelines.eval.gate import GateSection, apply

    results = evaluated["results"]
    sig = results["signals"]
    assert set(sig) == {"base", "few_shot", "tuned", "zero"}
    for b in sig.values():
        assert b["answers"] == results["n_test"] and b["top_k"] == 20 and 0 <= b["entropy_mean"] <= math.log(20)
    assert sig["zero"]["entropy_mean"] == pytest.approx(sig["base"]["entropy_mean"], abs=1e-3)  # B = 0 is the base
    assert abs(sig["tuned"]["entropy_mean"] - sig["base"]["entropy_mean"]) > 1e-3  # training moved the logits
    apply(results, "tuned", evaluated["tuned"], GateSection(min_rougeL_gain_over_base=0.1,
                                                            max_general_nll_increase=10.0), tmp_path / "reg", "city")
    assert Registry(tmp_path / "reg").show("city")["versions"]["1"]["lineage"]["serve_baseline"] == sig["tuned"]


def test_vllm_backend_answers_like_transformers(ray_session, tiny_model_dir, evaluated):
    """eval.backend=vllm (the default): the same rows through Ray Data and a vLLM LoRA engine give the same greedy
    answers as transformers + PEFT, for the base and the adapter (float32)."""
    from transformers import AutoTokenizer

    from pipelines.eval.data import load_rows, render, user_text
    from pipelines.eval.evaluate import EvalSection
    from pipelines.eval.generate import generate

    assert EvalSection().backend == "vllm"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    test = load_rows(str(evaluated["root"] / "test.jsonl"))[:6]
    prompts = [render(tok, [{"role": "user", "content": user_text(r)}]) for r in test]
    rows = [{"variant": v, "prompt": p} for v in ("base", "tuned") for p in prompts]
    adapters = {"tuned": str(evaluated["tuned"])}
    got = {b: generate(rows, b, tiny_model_dir, adapters, max_new_tokens=16, batch_size=12, max_lora_rank=8)
           for b in ("vllm", "hf")}
    # The same greedy tokens; an answer cut at max_new_tokens inside a multi-byte character ends in U+FFFD in
    # transformers' decode, while vLLM's incremental detokenizer holds the unfinished bytes back.
    same = {b: [a.rstrip("\ufffd") for a in answers] for b, answers in got.items()}
    assert same["vllm"] == same["hf"]
    assert got["vllm"][:6] != got["vllm"][6:]  # the adapter's answers are not the base's
