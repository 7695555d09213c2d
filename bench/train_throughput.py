"""Training throughput: plain TRL SFTTrainer (padded, and with its own packing) vs loraforge SFT (unpacked, packed).

    .venv/bin/python bench/train_throughput.py --rows 300 --steps 8 --batch 8 --max-length 512 --repeats 3 --json
    .venv/bin/python bench/train_throughput.py --model tiny-llama --rows 120 --steps 3 --repeats 1 --json   # smoke

Every contender runs in its own fresh process (this script re-invoked with --contender), one after another, never
two at once; the driver holds no model. Tokens/s counts non-padding input tokens over the training loop only (model
loading, tokenization and Ray start excluded on both sides); the table gives min/median/max over --repeats runs and
the ratios are of medians, all from one invocation (same machine state).
(a) trl: one process with all cores, padded batches of --batch rows; (b) trl_packed: `SFTConfig(packing=True)`,
BFD blocks of --max-length tokens (padding-free), --batch/4 blocks per step, as many tokens per step as (d);
(c) ours_unpacked: 2 Ray Train workers, --batch/2 padded rows each; (d) ours_packed: one --max-length block per
worker per step. TRL computes its loss on every token (the chat template has no generation markers); ours on the
assistant tokens, through the lean chunked loss (pipelines.train.losses).
Peak RSS: TRL's process (getrusage ru_maxrss); for ours each Ray Train worker process's own peak (VmHWM, sampled),
their sum, and separately the whole process tree (driver, Ray's daemons and workers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import ALPACA, PeakRSS, ProcessPeaks  # noqa: E402

CONTENDERS = ("trl", "trl_packed", "ours_unpacked", "ours_packed")
GIB = 2 ** 30


def alpaca_jsonl(n: int, out: Path) -> Path:
    rows = json.loads(ALPACA.read_text())[:n]
    with open(out, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return out


def ours_config(jsonl: Path, steps: int, batch: int, max_len: int, packed: bool):
    from cluster.config import load_config

    return load_config(None, [f"data.train_path={jsonl}", f"data.max_length={max_len}",
                              "data.max_rejected_fraction=1.0", f"train.max_steps={steps}",
                              # no validation split: TRL evaluates nothing, and the loop's clock runs through
                              # its final evaluation
                              "data.split.train=1.0", "data.split.validation=0.0", "data.split.test=0.0",
                              # a packed row is a whole block (~max_length tokens, several rows): per-worker
                              # batches then hold about as many real tokens as the unpacked ones
                              f"train.batch_size={max(1, batch // 8) if packed else max(1, batch // 2)}",
                              "train.num_workers=2", "train.cpus_per_worker=0.5", "train.tracking_uri=off",
                              "lora.r=16", "lora.alpha=32"]
                       + (["data.packing.enabled=true"] if packed else []))


def prepare(args, work: Path) -> dict:
    """Resolve the model and tokenize both datasets once, in this (throwaway) process."""
    from cluster.session import finish, init_ray
    from pipelines.artifacts.models import ModelConfig, resolve_model
    from pipelines.data import tokenize as data

    model_dir = resolve_model(ModelConfig(name=args.model))
    jsonl = alpaca_jsonl(args.rows, work / "alpaca.jsonl")
    for packed in (False, True):
        cfg = ours_config(jsonl, args.steps, args.batch, args.max_length, packed)
        init_ray(cfg)
        data.run(cfg.data, model_dir, work / ("data-packed" if packed else "data"))
    finish()
    return {"model_dir": model_dir}


def run_trl(model_dir: str, jsonl: Path, steps: int, batch: int, max_len: int, packed: bool) -> dict:
    import resource

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from pipelines.data.rowformats import alpaca_to_messages

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

    # packed: TRL's own best-fit-decreasing packing (padding-free), as many blocks per step as ours packed has
    cfg = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps,
                    per_device_train_batch_size=max(1, batch // 4) if packed else batch,
                    learning_rate=1e-3, bf16=False, use_cpu=True, report_to=[], logging_steps=10 ** 6,
                    save_strategy="no", max_length=max_len, packing=packed, packing_strategy="bfd",
                    assistant_only_loss=False, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                         callbacks=[Count()])
    orig = trainer.training_step

    def counting_step(model, inputs, *a, **k):
        mask = inputs.get("attention_mask")
        seen["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return orig(model, inputs, *a, **k)

    trainer.training_step = counting_step
    trainer.train()
    # the first step includes warm-up of the loop; both sides are timed from the first step's start
    return {"tokens": seen["tokens"], "seconds": seen["t1"] - seen["t0"],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def run_ours(model_dir: str, jsonl: Path, steps: int, batch: int, max_len: int, packed: bool, work: Path,
             out: Path) -> dict:
    from cluster.session import finish, init_ray
    from pipelines.train import sft
    from pipelines.train.config import TrainSetup

    cfg = ours_config(jsonl, steps, batch, max_len, packed)
    init_ray(cfg)
    with PeakRSS() as tree, ProcessPeaks("RayTrainWorker") as workers:
        folder = sft.run(TrainSetup(model_dir=model_dir, train=cfg.train), cfg.lora,
                         work / ("data-packed" if packed else "data"), out)
    finish()
    r = json.loads((folder / "manifest.json").read_text())["metrics"]["throughput"]
    peaks = sorted(workers.peaks.values(), reverse=True)
    return {"tokens": r["tokens"], "seconds": r["seconds"], "peak_rss_gib": peaks[0] / GIB if peaks else None,
            "worker_peak_rss_gib": [round(p / GIB, 3) for p in peaks],
            "peak_rss_gib_sum": sum(peaks) / GIB, "tree_peak_rss_gib": tree.peak / GIB}


def contender(args) -> dict:
    """One contender's run, in this process (the driver started it for this alone)."""
    work = Path(args.work)
    if args.contender == "prepare":
        return prepare(args, work)
    same = (args.model_dir, work / "alpaca.jsonl", args.steps, args.batch, args.max_length)
    if args.contender in ("trl", "trl_packed"):
        return run_trl(*same, packed=args.contender == "trl_packed")
    return run_ours(*same, packed=args.contender == "ours_packed", work=work,
                    out=work / f"sft-{args.contender}-{args.run}")


def spawn(args, name: str, run: int, work: Path, model_dir: str = "") -> dict:
    """This script as a fresh process for one contender; its output goes to a log, its result is the last line."""
    log = work / "logs" / f"{name}-{run}.log"
    log.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, __file__, "--contender", name, "--run", str(run), "--work", str(work),
           "--model", args.model, "--model-dir", model_dir, "--rows", str(args.rows), "--steps", str(args.steps),
           "--batch", str(args.batch), "--max-length", str(args.max_length)]
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO).returncode
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    if rc or not lines:  # a side that cannot run is reported, not hidden
        return {"error": f"exit {rc}; see {log}: " + " | ".join(log.read_text().splitlines()[-3:])[-300:]}
    return json.loads(lines[-1][len("RESULT "):])


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1]["error"] if runs else "not run"}
    tps = [r["tokens"] / r["seconds"] for r in ok]
    rss = [r["peak_rss_gib"] for r in ok if r.get("peak_rss_gib")]
    out = {"runs": len(ok), "tokens_per_s": statistics.median(tps), "tokens_per_s_min": min(tps),
           "tokens_per_s_max": max(tps), "peak_rss_gib": statistics.median(rss) if rss else None,
           "tokens": ok[0]["tokens"], "seconds": [round(r["seconds"], 2) for r in ok]}
    for k in ("peak_rss_gib_sum", "tree_peak_rss_gib"):
        if k in ok[0]:
            out[k] = statistics.median(r[k] for r in ok)
    if "worker_peak_rss_gib" in ok[0]:
        out["worker_peak_rss_gib"] = [r["worker_peak_rss_gib"] for r in ok]
    if len(ok) < len(runs):
        out["failed_runs"] = [r["error"] for r in runs if "error" in r]
    return out


def report(args, results: dict) -> dict:
    def med(k, field="tokens_per_s"):
        return results[k].get(field)

    def ratio(a, b):
        return round(med(a) / med(b), 3) if med(a) and med(b) else None

    worker = [med(k, "peak_rss_gib") for k in ("ours_unpacked", "ours_packed") if med(k, "peak_rss_gib")]
    trl_rss = med("trl", "peak_rss_gib")
    summary = {"machine": f"{os.cpu_count()} CPU cores, no GPU", "model": args.model, "rows": args.rows,
               "steps": args.steps, "global_batch": args.batch, "max_length": args.max_length,
               "repeats": args.repeats, "results": results,
               "packed_over_trl": ratio("ours_packed", "trl"), "unpacked_over_trl": ratio("ours_unpacked", "trl"),
               "packed_over_trl_packed": ratio("ours_packed", "trl_packed"),
               "peak_rss_gib_per_worker": round(max(worker), 3) if worker else None,
               "peak_rss_gib_workers_sum": {k: round(results[k]["peak_rss_gib_sum"], 3) for k in
                                            ("ours_unpacked", "ours_packed") if results[k].get("peak_rss_gib_sum")},
               "trl_peak_rss_gib": round(trl_rss, 3) if trl_rss else None,
               "trl_packed_peak_rss_gib": (round(med("trl_packed", "peak_rss_gib"), 3)
                                           if med("trl_packed", "peak_rss_gib") else None)}
    summary["worker_rss_over_trl"] = (round(summary["peak_rss_gib_per_worker"] / trl_rss, 3)
                                      if worker and trl_rss else None)
    print(f"{'run':<15}{'tokens/s min / median / max':>30}{'peak RSS GiB':>14}{'workers sum':>13}{'tree':>8}")
    for k, v in results.items():
        if "error" in v:
            print(f"{k:<15}  {v['error']}")
            continue
        tps = f"{v['tokens_per_s_min']:.1f} / {v['tokens_per_s']:.1f} / {v['tokens_per_s_max']:.1f}"
        extra = (f"{v['peak_rss_gib_sum']:>13.2f}{v['tree_peak_rss_gib']:>8.2f}" if "peak_rss_gib_sum" in v else "")
        print(f"{k:<15}{tps:>30}{v['peak_rss_gib'] or float('nan'):>14.2f}{extra}")
    print(f"medians: unpacked/trl = {summary['unpacked_over_trl']}   packed/trl = {summary['packed_over_trl']}   "
          f"packed/trl_packed = {summary['packed_over_trl_packed']}   largest worker / trl RSS = "
          f"{summary['worker_rss_over_trl']}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="global rows per step (ours: split over 2 workers)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each contender; the table gives medians")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON, the last line")
    ap.add_argument("--contender", choices=("prepare",) + CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.contender:
        print("RESULT " + json.dumps(contender(args)), flush=True)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    prep = spawn(args, "prepare", 0, work)
    if "error" in prep:
        raise SystemExit(f"preparing the model and data failed: {prep['error']}")
    runs: dict[str, list] = {k: [] for k in CONTENDERS}
    for i in range(args.repeats):  # interleaved: a slow spell of the machine hits every contender alike
        for name in CONTENDERS:
            runs[name].append(spawn(args, name, i, work, prep["model_dir"]))
            print(f"[bench] run {i + 1}/{args.repeats} {name}: "
                  + (runs[name][-1].get("error") or f"{runs[name][-1]['tokens'] / runs[name][-1]['seconds']:.1f}"
                     " tokens/s"), flush=True)
    summary = report(args, {k: summarize(v) for k, v in runs.items()})
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
