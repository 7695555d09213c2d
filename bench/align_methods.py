"""Seconds per training step of each preference method relative to DPO's, on the same pairs.

    .venv/bin/python bench/align_methods.py                       # tiny model, 4 pairs a step, median of 3
    .venv/bin/python bench/align_methods.py --model DIR --batch 8 --steps 8 --repeats 3 --json

The pairs (tests/data's QA-feedback pairs by default) are prepared once by the stage's own `prepare` (Ray Data;
reference = the base), then every method trains a fresh LoRA adapter on the same batches with the stage's own
collate and loss (`pipelines.train.dpo.make_loss`, the lean log-probs), one process, AdamW: forward + backward +
optimizer step, timed per step; the first step of each run is left out, the run's figure is the median step, and
each method's figure the median of --repeats runs. DPO, ORPO and SimPO see --batch pairs a step (2 × batch
sequences with gradients); KTO sees the same pairs as 2 × batch unpaired rows (its KTO view) and as many
mismatched KL sequences scored without gradients. Ratios are of medians, all from one invocation. The last line
with --json is the whole result as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("dpo", "orpo", "simpo", "kto")


def batches(folder: Path, rows_per_batch: int, steps: int) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(folder / "train").to_pydict()
    n = len(next(iter(table.values())))
    if n < rows_per_batch * (steps + 1):
        raise SystemExit(f"{folder}: {n} training rows, fewer than {rows_per_batch * (steps + 1)} for "
                         f"{steps + 1} steps of {rows_per_batch}: lower --steps or --batch, or raise --pairs")
    return [{k: v[i * rows_per_batch:(i + 1) * rows_per_batch] for k, v in table.items()} for i in range(steps + 1)]


def one_run(method: str, model_dir: str, data: Path, batch: int, steps: int, seed: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.train import dpo
    from pipelines.train.base import attach_lora
    from pipelines.train.config import DPOSection, LoraSection

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = attach_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                        LoraSection(r=16, alpha=32, dropout=0.0), seed)
    model.train()
    cfg = DPOSection(method=method)
    loss_fn = dpo.make_loss(cfg, kto_weights=(1.0, 1.0) if method == "kto" else None)
    collate = dpo._kto_collate(pad) if method == "kto" else dpo._collate(pad)
    rows = 2 * batch if method == "kto" else batch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds = []
    for b in batches(data, rows, steps):
        t0 = time.perf_counter()
        total, n, _ = loss_fn(model, collate(b))
        (total / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="an HF model folder; default: the tests' tiny Llama, built here")
    ap.add_argument("--pairs", default=str(REPO / "tests" / "data" / "preference" / "qa_feedback_pairs.jsonl"))
    ap.add_argument("--max-pairs", type=int, default=60)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per run (one more is run first, untimed)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import ray
    import torch

    from pipelines.artifacts.models import build_tiny_model
    from pipelines.train import dpo
    from pipelines.train.config import DPOSection, TrainSetup

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="align-bench-"))
    model_dir = args.model or build_tiny_model(work / "tiny-llama", arch="llama", seed=0)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        setup = TrainSetup(model_dir=model_dir)
        common = dict(train_path=args.pairs, max_pairs=args.max_pairs, max_length=args.max_length,
                      validation_fraction=0.0)
        # DPO's pairs (reference = the base) serve ORPO and SimPO too (they ignore the reference columns)
        data = {"pairs": dpo.prepare(DPOSection(start="base", **common), setup, None, work / "pairs"),
                "kto": dpo.prepare(DPOSection(method="kto", start="base", **common), setup, None, work / "kto")}
    finally:
        ray.shutdown()
    runs: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(args.repeats):  # interleaved: a slow spell of the machine hits every method alike
        for m in METHODS:
            runs[m].append(one_run(m, model_dir, data["kto" if m == "kto" else "pairs"], args.batch, args.steps, r))
    med = {m: statistics.median(v) for m, v in runs.items()}
    result = {"model": str(model_dir), "batch_pairs": args.batch, "steps": args.steps, "repeats": args.repeats,
              "seconds_per_step": runs, "median_seconds_per_step": med,
              "ratio_vs_dpo": {m: med[m] / med["dpo"] for m in METHODS}}
    print(f"{'method':<7} {'s/step (median)':>16} {'x DPO':>7}   runs")
    for m in METHODS:
        print(f"{m:<7} {med[m]:>16.4f} {result['ratio_vs_dpo'][m]:>7.2f}   "
              + " ".join(f"{s:.4f}" for s in runs[m]))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
