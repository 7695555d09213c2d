"""Training throughput: plain TRL SFTTrainer vs loraforge SFT (unpacked, packed), side by side.

    .venv/bin/python bench/train_throughput.py                 # SmolLM2-135M, Alpaca sample, ~10 min on 2 cores
    .venv/bin/python bench/train_throughput.py --model tiny-llama --steps 10 --json

Tokens/s counts non-padding input tokens over the training loop only (model loading and Ray start excluded for
both sides). (a) TRL in one process with all cores, padded batches; (b) ours, 2 Ray Train workers, padded;
(c) ours with packing: blocks of --max-length tokens, one block per worker per step for --batch 8.
Peak RSS: the whole process tree of each run (psutil, sampled every 0.2 s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import ALPACA, PeakRSS  # noqa: E402

from cluster.config import load_config
from cluster.runner import init_ray
from pipelines.artifacts.models import ModelConfig, resolve_model
from pipelines.data import tokenize as data
from pipelines.data.rowformats import alpaca_to_messages
from pipelines.train import sft


def alpaca_jsonl(n: int, out: Path) -> Path:
    rows = json.loads(ALPACA.read_text())[:n]
    with open(out, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return out


def run_trl(model_dir: str, jsonl: Path, steps: int, batch: int, max_len: int) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(os.cpu_count() or 2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = load_dataset("json", data_files=str(jsonl), split="train")
    ds = ds.map(lambda r: {"messages": alpaca_to_messages(r)}, remove_columns=ds.column_names)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seen = {"tokens": 0, "t0": None, "t1": None}

    class Count(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if seen["t0"] is None:
                seen["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            seen["t1"] = time.perf_counter()

    cfg = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
                    learning_rate=1e-3, bf16=False, use_cpu=True, report_to=[], logging_steps=10 ** 6,
                    save_strategy="no", max_length=max_len, packing=False, assistant_only_loss=False,
                    dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                         callbacks=[Count()])
    orig = trainer.training_step

    def counting_step(model, inputs, *a, **k):
        seen["tokens"] += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
        return orig(model, inputs, *a, **k)

    trainer.training_step = counting_step
    trainer.train()
    # the first step includes warm-up of the loop; both sides are timed from the first step's start
    return {"tokens": seen["tokens"], "seconds": seen["t1"] - seen["t0"]}


def run_ours(model_dir: str, jsonl: Path, steps: int, batch: int, max_len: int, packed: bool, work: Path) -> dict:
    cfg = load_config(None, [f"data.train_path={jsonl}", f"data.max_length={max_len}",
                             "data.max_rejected_fraction=1.0", f"train.max_steps={steps}",
                             # a packed row is a whole block (~max_length tokens, several rows): per-worker
                             # batches then hold about as many real tokens as the unpacked ones
                             f"train.batch_size={max(1, batch // 8) if packed else max(1, batch // 2)}",
                             "train.num_workers=2",
                             "train.cpus_per_worker=0.5", "train.tracking_uri=off", "lora.r=16", "lora.alpha=32"]
                      + (["data.packing.enabled=true"] if packed else []))
    init_ray(cfg)
    d = data.run(cfg.data, model_dir, work / ("data-packed" if packed else "data"))
    out = sft.run(cfg.lora, cfg.train, model_dir, d, work / ("sft-packed" if packed else "sft"))
    return json.loads((out / "manifest.json").read_text())["metrics"]["throughput"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="global rows per step (ours: split over 2 workers)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    model_dir = resolve_model(ModelConfig(name=args.model))
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    jsonl = alpaca_jsonl(args.rows, work / "alpaca.jsonl")
    results = {}
    for name, fn in (("trl", lambda: run_trl(model_dir, jsonl, args.steps, args.batch, args.max_length)),
                     ("ours_unpacked", lambda: run_ours(model_dir, jsonl, args.steps, args.batch, args.max_length,
                                                        False, work)),
                     ("ours_packed", lambda: run_ours(model_dir, jsonl, args.steps, args.batch, args.max_length,
                                                      True, work))):
        try:
            with PeakRSS() as rss:
                r = fn()
            results[name] = {"tokens_per_s": r["tokens"] / r["seconds"], "peak_rss_gib": rss.peak / 2 ** 30,
                             "tokens": r["tokens"], "seconds": r["seconds"]}
        except Exception as e:  # a side that cannot run is reported, not hidden
            results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    base = results["trl"].get("tokens_per_s")

    def ratio(k):
        v = results[k].get("tokens_per_s")
        return round(v / base, 3) if v and base else None

    summary = {"machine": f"{os.cpu_count()} CPU cores, no GPU", "model": args.model, "steps": args.steps,
               "global_batch": args.batch, "results": results,
               "packed_over_trl": ratio("ours_packed"), "unpacked_over_trl": ratio("ours_unpacked")}
    print(f"{'run':<15}{'tokens/s':>12}{'peak RSS GiB':>15}")
    for k, v in results.items():
        print(f"{k:<15}{v.get('tokens_per_s', float('nan')):>12.1f}{v.get('peak_rss_gib', float('nan')):>15.2f}"
              + (f"  {v['error']}" if "error" in v else ""))
    print(f"unpacked/trl = {summary['unpacked_over_trl']}   packed/trl = {summary['packed_over_trl']}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
