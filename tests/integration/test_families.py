"""The model-family matrix (issue 36 item 2): for each family of tests/families.py (a tiny random model built from
its transformers config, with a chat template of its family's shape), through the project's own code paths:

- curate + tokenize: curation's row parser (ParseRows) and the tokenize stage's rows (TokenizeRows) on the same
  rows: labels exactly the answers' tokens (with the end-of-turn text the template puts after them), -100
  elsewhere; a system message, two user turns in a row and an assistant-first row handled by chat.py's rules or
  refused with a reason; counts add up;
- SFT with lora.target_modules=all-linear, a few steps of the shared training loop in this process
  (`sft.run` with local=True: no Ray Train; Llama's Ray Train run is test_training's): trainable count = the closed
  form Σ r·(in + out) of pipelines.train.targets, the adapter trained (lora_B no longer zero);
- merge parity: pipelines.export.merge.merge_on_device (the merge task's body, here in this process): merged
  logits = base + adapter logits within 1e-3 (float32);
- served by vLLM (a subset: SERVED, one engine per family in one child interpreter, as test_vllm_cpu_lora starts
  them) with the trained adapter, greedy tokens equal to transformers + PEFT's; where vLLM has no LoRA for the
  architecture (GPT-2), `validate` and `serve` refuse before anything starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.families import FAMILIES, build_family

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo" / "city_date.jsonl"
R = 8
# two native vLLM classes (Phi-3's fused HF layers; Gemma 2's q/k/v packed by vLLM), and its Transformers backend
SERVED = ("phi3", "gemma2", "gpt_neox")
STRICT = {"mistral", "gemma2"}  # templates that refuse a system role and two user turns in a row


def rows() -> list[dict]:
    """24 Alpaca rows of the demo task, a system-prompted conversation, a two-exchange one, one with two user turns
    in a row, and one that starts with the assistant (every template here refuses or cannot learn from it)."""
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()[:24]]
    a, b = demo[0], demo[1]
    extra = [
        {"messages": [{"role": "system", "content": "You answer with JSON only."},
                      {"role": "user", "content": f"{a['instruction']}\n\n{a['input']}"},
                      {"role": "assistant", "content": a["output"]}]},
        {"messages": [{"role": "user", "content": f"{a['instruction']}\n\n{a['input']}"},
                      {"role": "assistant", "content": a["output"]},
                      {"role": "user", "content": f"And this one?\n\n{b['input']}"},
                      {"role": "assistant", "content": b["output"]}]},
        {"messages": [{"role": "user", "content": b["instruction"]}, {"role": "user", "content": b["input"]},
                      {"role": "assistant", "content": b["output"]}]},
        {"messages": [{"role": "assistant", "content": "Hello, ask me about dates."},
                      {"role": "user", "content": b["input"]}, {"role": "assistant", "content": b["output"]}]},
    ]
    return demo + extra


@pytest.fixture(scope="module")
def base_tokenizer():
    from pipelines.artifacts.models import build_tokenizer
    from pipelines.demo.generator import tokenizer_corpus

    return build_tokenizer(tokenizer_corpus())


RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def matrix_table():
    """Prints the matrix's figures at the end of the module (pytest -s shows them)."""
    yield
    for name, r in RESULTS.items():
        print(f"[families] {name}: trainable {r['manifest']['metrics']['trainable_params']}, loss "
              f"{r.get('loss')}, merge max |logit diff| {r.get('parity')}, served {r.get('served', False)}")


@pytest.fixture(scope="module")
def family_run(base_tokenizer, tmp_path_factory):
    """family name → its run (model folder, tokenized rows, SFT adapter and manifest), made once per module."""

    def run(name: str) -> dict:
        if name not in RESULTS:
            RESULTS[name] = _run(FAMILIES[name], tmp_path_factory.mktemp(name), base_tokenizer)
        return RESULTS[name]

    return run


def _curate_and_tokenize(family, model_dir: str, raw: list[dict]) -> tuple[list[dict], dict]:
    """Rows through curation's parser and the tokenize stage's row function, as the data stage runs them."""
    from pipelines.data.config import DataConfig, FilterSection
    from pipelines.data.curate_rows import ParseJob, ParseRows
    from pipelines.data.tokenize_rows import TokenizeJob, TokenizeRows

    lines = [json.dumps(r) for r in raw]
    job = ParseJob("auto", None, FilterSection(max_repeated_ngram_ratio=None, max_symbol_ratio=None), 16, None, (),
                   model_dir)
    parsed = ParseRows(job)({"raw": lines, "error": [""] * len(lines), "row_id": list(range(len(lines))),
                             "source": ["rows.jsonl"] * len(lines), "line": list(range(1, len(lines) + 1))})
    kept = [i for i, reason in enumerate(parsed["reason"]) if not reason]
    curated = [{"messages": json.loads(parsed["record"][i])["messages"], "source": "rows.jsonl", "line": i + 1}
               for i in kept]
    out = TokenizeRows(TokenizeJob(model_dir, DataConfig(train_path="rows.jsonl", max_length=256)))(
        curated, "messages", "train")
    # curation computed the same ids and labels (the tokenize pass reuses them when the tokenizer is the same)
    for j, i in enumerate(kept):
        if not out["reason"][j]:
            assert parsed["input_ids"][i] == out["input_ids"][j] and parsed["labels"][i] == out["labels"][j]
    refused = {i: (parsed["reason"][i], parsed["detail"][i]) for i in range(len(lines)) if parsed["reason"][i]}
    refused.update({kept[j]: (r, out["detail"][j]) for j, r in enumerate(out["reason"]) if r})
    toks = [{"messages": curated[j]["messages"], "input_ids": out["input_ids"][j], "labels": out["labels"][j]}
            for j in range(len(kept)) if not out["reason"][j]]
    return toks, refused


def _label_runs(labels: list[int]) -> list[list[int]]:
    runs, cur = [], []
    for t in labels:
        if t == -100:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    return runs + ([cur] if cur else [])


def _write_tokenized(toks: list[dict], out: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.artifacts.manifest import write_manifest

    for split, part in (("train", toks[:-4]), ("validation", toks[-4:])):
        (out / split).mkdir(parents=True)
        pq.write_table(pa.table({"input_ids": [t["input_ids"] for t in part], "labels": [t["labels"] for t in part]}),
                       out / split / "part-0.parquet")
    write_manifest(out, kind="tokenized_dataset", inputs={"train": str(DEMO)}, config={},
                   extra={"outputs": {"train": "train", "validation": "validation"}})
    return out


def _run(family, root: Path, base_tokenizer) -> dict:
    from pipelines.train.config import LoraSection, TrainSection, TrainSetup
    from pipelines.train.sft import run as sft

    model_dir = build_family(family, root / "model", tokenizer=base_tokenizer)
    raw = rows()
    toks, refused = _curate_and_tokenize(family, model_dir, raw)
    data = _write_tokenized(toks, root / "data")
    train = TrainSection(num_workers=1, cpus_per_worker=1, max_steps=3, batch_size=4, lr=2e-2, warmup_steps=0,
                         log_every=1, tracking_uri="off", checkpoint_every=3)
    setup = TrainSetup(model_dir=model_dir, dtype="float32", train=train, local=True)
    adapter = sft(setup, LoraSection(r=R, alpha=2 * R, dropout=0.0, target_modules="all-linear"), data, root / "sft")
    return {"model": model_dir, "toks": toks, "refused": refused, "rows": len(raw), "adapter": str(adapter),
            "manifest": json.loads((adapter / "manifest.json").read_text())}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_labels_training_and_merge(name, family_run):
    from safetensors.torch import load_file

    from pipelines.data.chat import load_tokenizer
    from pipelines.export.merge import MergeSection, merge_on_device
    from pipelines.train import targets

    family = FAMILIES[name]
    got = family_run(name)
    tok = load_tokenizer(got["model"])  # the data stage's (AutoTokenizer gives a model_type qwen2 folder Qwen2's
    # own pre-tokenizer, which splits digits: not what this folder's tokenizer.json, trained here, does)

    # labels: exactly each learned answer's tokens (+ its end-of-turn text), -100 elsewhere; counts add up
    assert len(got["toks"]) + len(got["refused"]) == got["rows"]
    for t in got["toks"]:
        assert len(t["labels"]) == len(t["input_ids"])
        assert all(lab in (-100, i) for lab, i in zip(t["labels"], t["input_ids"]))
        answers = [m["content"] for m in t["messages"] if m["role"] == "assistant"]
        want = [tok(text, add_special_tokens=False)["input_ids"] for text in family.label_texts(answers)]
        assert _label_runs(t["labels"]) == want, (name, t["messages"], tok.decode(t["input_ids"]))
    reasons = {i - 24: reason for i, (reason, _) in got["refused"].items()}
    # rules: the system-prompted row is kept everywhere (folded into the first user turn where the template has
    # no system role), two user turns in a row too (merged where the template alternates strictly)
    # the assistant-first row is refused with the template's reason (strict ones: their own words), the rest go on
    assert reasons == {3: "template_error"}, got["refused"]
    if name in STRICT:
        assert "must alternate" in got["refused"][27][1], got["refused"]

    # SFT with all-linear: PEFT's trainable count is the closed form for this architecture; the adapter trained
    m = got["manifest"]
    listing = targets.describe(json.loads(Path(got["model"], "config.json").read_text()))
    closed = targets.lora_parameters("all-linear", listing.linears, r=R)
    assert m["metrics"]["trainable_params"] == closed, (name, m["metrics"]["trainable_params"], closed)
    lora = load_file(str(Path(got["adapter"]) / "adapter_model.safetensors"))
    assert sum(v.numel() for v in lora.values()) == closed
    assert all(bool(v.abs().sum() > 0) for k, v in lora.items() if "lora_B" in k)  # B starts at 0: it moved
    losses = m["metrics"]["loss_history"]
    RESULTS[name]["loss"] = (losses[0], losses[-1])

    # merge parity: merged logits = base + adapter logits (float32)
    cfg = MergeSection(dtype="float32", parity_prompts=["Ana flies to Oslo on 4 June.", "What is 12 plus 30?"],
                       parity_max_new_tokens=4)
    parity = merge_on_device(cfg, got["model"], [got["adapter"]], str(Path(got["adapter"]).parent / "merged"),
                             "cpu")["parity"]
    assert parity["passed"] and parity["max_abs_logit_diff"] <= 1e-3, parity
    RESULTS[name]["parity"] = parity["max_abs_logit_diff"]


ENGINES = textwrap.dedent("""
    import json, sys, time
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    jobs = json.loads(sys.argv[1])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out, seconds = {}, {}
    for name, job in jobs.items():
        t0 = time.perf_counter()
        llm = LLM(model=job["model"], dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8,
                  max_model_len=256, enforce_eager=True, seed=0)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
        outs = llm.generate(prompts, params, lora_request=LoRARequest(name, 1, job["adapter"]))
        out[name] = [list(o.outputs[0].token_ids) for o in outs]
        seconds[name] = round(time.perf_counter() - t0, 1)
        del llm
    print("RESULT " + json.dumps(out))
    print("SECONDS " + json.dumps(seconds))
""")


def _peft_greedy(model_dir: str, adapter: str | None, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy tokens of transformers (+ PEFT), n per prompt, never stopping early (as ignore_eos)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            seq = list(ids)
            for _ in range(n):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            out.append(seq[len(ids):])
    return out


def test_served_families_answer_token_exact_with_the_adapter(family_run):
    """vLLM (CPU) serving each SERVED family's base with its SFT adapter gives transformers + PEFT's greedy tokens."""
    from transformers import AutoTokenizer

    questions = ["Ana flies to Oslo on 4 June.", "Extract the city: Bo visits Lima on 2 May.", "Hello there"]
    jobs = {}
    for name in SERVED:
        got = family_run(name)
        tok = AutoTokenizer.from_pretrained(got["model"])
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"] for q in questions]
        jobs[name] = {"model": got["model"], "adapter": got["adapter"], "prompts": prompts}
    # the engine core in the child's own process: one vLLM import for every engine, not one more per engine
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", ENGINES, json.dumps(jobs)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    served = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    print("engine seconds:", next(ln for ln in proc.stdout.splitlines() if ln.startswith("SECONDS ")))
    changed = 0
    for name, job in jobs.items():
        want = _peft_greedy(job["model"], job["adapter"], job["prompts"], 6)
        assert served[name] == want, (name, served[name], want)
        changed += want != _peft_greedy(job["model"], None, job["prompts"], 6)
        RESULTS[name]["served"] = True
    assert changed, "no adapter changed the greedy tokens: the comparison could not tell base from adapter"


def test_gpt2_is_refused_before_anything_starts(family_run, tmp_path):
    """vLLM has no LoRA on GPT-2 (GPT2LMHeadModel lacks SupportsLoRA): `validate` and `serve` say so in one line,
    exit 2, before Ray or vLLM start; the same adapter on a family vLLM serves passes the check, dotted target
    names (GPT-2's attn.c_proj) compared by their last component as vLLM compares them."""
    import yaml
    from typer.testing import CliRunner

    from cluster.cli import app
    from serve.adapters import validate_adapter
    from serve.errors import AdapterInvalid
    from serve.lora_support import support_for

    got = family_run("gpt2")
    cfg = {"name": "gpt2", "output_dir": str(tmp_path / "runs"), "model": {"name": got["model"]},
           "data": {"train_path": str(DEMO)}, "lora": {"r": R, "alpha": 2 * R}, "serve": {"max_lora_rank": R}}
    path = tmp_path / "gpt2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for command in ("validate", "serve"):
        result = CliRunner().invoke(app, [command, str(path)])
        assert result.exit_code == 2, (command, result.output)
        assert "Traceback" not in result.output
        assert "architecture GPT2LMHeadModel" in result.output and "merge" in result.output, result.output
    # with a merge: section the merged model is served (LoRA off in its engine): validate passes
    path.write_text(yaml.safe_dump({**cfg, "merge": {"dtype": "float32"}}))
    assert CliRunner().invoke(app, ["validate", str(path)]).exit_code == 0

    support = support_for(got["model"])
    assert support is not None and not support.supported and support.vllm_class == "GPT2LMHeadModel"
    with pytest.raises(AdapterInvalid, match="GPT2LMHeadModel"):
        validate_adapter(got["adapter"], max_rank=R, bases=None, support=support)
    conf = json.loads((Path(got["adapter"]) / "adapter_config.json").read_text())
    assert {"c_attn", "c_proj", "c_fc"} == set(conf["target_modules"])
    # dotted names on a base vLLM serves: compared by their last component
    phi3 = support_for(family_run("phi3")["model"])
    assert phi3.supported and phi3.unserved(["self_attn.qkv_proj", "mlp.gate_up_proj", "o_proj"]) == []
    assert phi3.unserved(["input_layernorm", "attn.c_proj"]) == ["attn.c_proj", "input_layernorm"]
    assert support_for(family_run("gpt_neox")["model"]).vllm_class == "TransformersForCausalLM"
    # the engine of a GPT-2 base starts with LoRA off (else vLLM refuses to start it at all): a merged model serves
    from serve.app import llm_config
    from serve.config import ServeConfig

    assert llm_config(ServeConfig(), got["model"], gpu=False).engine_kwargs["enable_lora"] is False
    assert llm_config(ServeConfig(), family_run("phi3")["model"], gpu=False).engine_kwargs["enable_lora"] is True
