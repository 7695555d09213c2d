"""Sweep efficiency: a full grid (every point to max_t) vs the same grid under ASHA, side by side, per seed.

    .venv/bin/python bench/tune_efficiency.py                  # tiny Llama, Alpaca sample, 3 seeds, ~20 min, 2 cores
    .venv/bin/python bench/tune_efficiency.py --seeds 0 --json # one seed

Both arms are real sweeps (`tune.sweep.run`: Ray Tune over Ray Train V2 trials of the SFT loop) over the same 16
points (rank × learning rate, alpha = 2r) and the same tokenized rows (the first --rows of the shared Alpaca sample,
90/10 train/validation); the seed (`train.seed`: LoRA init and data order) changes per repetition. Per seed:
trial-steps spent (sum over trials of the optimizer steps each ran), best eval loss, and the Spearman correlation
of the grid trials' eval-loss ranks at the first rung (grace_period) with their ranks at max_t: how far early
losses predict final ones, which is what lets ASHA stop trials. The JSON (last line) holds the medians over seeds.
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
sys.path.insert(0, str(REPO / "bench"))

from common import ALPACA  # noqa: E402

RANKS = [4, 8, 16, 32]
LRS = [1e-4, 5e-4, 2e-3, 8e-3]  # 4 x 4 = the 16-point grid the ASHA arithmetic is usually quoted for


def tokenized(model_dir: str, rows: int, max_length: int, out: Path) -> Path:
    """The first `rows` Alpaca rows as chat-template token ids, 90/10 train/validation Parquet + manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from pipelines.artifacts.manifest import write_manifest
    from pipelines.data.chat import tokenize_messages
    from pipelines.data.rowformats import RowError, alpaca_to_messages

    tok = AutoTokenizer.from_pretrained(model_dir)
    data, too_long = [], 0
    for r in json.loads(ALPACA.read_text()):
        try:
            data.append(tokenize_messages(tok, alpaca_to_messages(r), max_length))
        except RowError:  # longer than max_length: left out (and counted), as the data stage would reject it
            too_long += 1
        if len(data) == rows:
            break
    print(f"data: {len(data)} Alpaca rows of at most {max_length} tokens ({too_long} longer ones left out)")
    cut = int(len(data) * 0.9)
    for split, toks in (("train", data[:cut]), ("validation", data[cut:])):
        (out / split).mkdir(parents=True)
        pq.write_table(pa.table({"input_ids": [t.input_ids for t in toks], "labels": [t.labels for t in toks]}),
                       out / split / "part-0.parquet")
    write_manifest(out, kind="tokenized_dataset", inputs={"train": f"{ALPACA}[:{rows}]"}, config={},
                   extra={"outputs": {"train": "train", "validation": "validation"}})
    return out


def one_arm(model_dir: str, data_dir: Path, out: Path, seed: int, args, asha: bool) -> dict:
    from pipelines.train.config import LoraSection, TrainSection, TrainSetup
    from tune import sweep
    from tune.space import TuneSection

    cfg = TuneSection.model_validate({
        "space": {"r": args.ranks, "alpha": "ratio", "alpha_ratio": 2, "lr": args.lrs}, "searcher": "grid",
        "num_samples": 1,
        "asha": ({"grace_period": args.grace, "reduction_factor": args.reduction, "max_t": args.max_t}
                 if asha else None),
        "max_t": args.max_t, "eval_every": args.eval_every, "max_concurrent_trials": args.concurrent})
    train = TrainSection(num_workers=1, cpus_per_worker=0.95, batch_size=args.batch, warmup_steps=1, seed=seed,
                         eval_max_batches=args.eval_batches, log_every=1000, tracking_uri="off")
    lora = LoraSection(r=8, dropout=0.0, target_modules="all-linear")
    t0 = time.time()
    folder = sweep.run(cfg, lora, TrainSetup(model_dir=model_dir, model_name="tiny-llama", train=train), data_dir, out)
    wall = time.time() - t0
    trials = json.loads((folder / "sweep_trials.json").read_text())["trials"]
    curves = {(int(t["config"]["r"]), float(t["config"]["lr"])): {r["step"]: r["eval_loss"] for r in t["reports"]}
              for t in trials}
    return {"wall_s": wall, "trial_steps": sum(t["steps"] for t in trials),
            "best": min(t["best_eval_loss"] for t in trials), "stopped": sum(t["status"] == "stopped early"
                                                                            for t in trials),
            "curves": curves}


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--max-t", type=int, default=24)
    ap.add_argument("--grace", type=int, default=2)
    ap.add_argument("--reduction", type=float, default=3)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--ranks", type=int, nargs="+", default=RANKS)
    ap.add_argument("--lrs", type=float, nargs="+", default=LRS)
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = ap.parse_args()

    import ray

    from pipelines.artifacts.models import build_tiny_model

    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, logging_level="ERROR")
    work = Path(tempfile.mkdtemp(prefix="tune-bench-"))
    model_dir = build_tiny_model(work / "tiny-llama", arch="llama", seed=0)
    data_dir = tokenized(model_dir, args.rows, args.max_length, work / "data")
    per_seed = []
    for seed in args.seeds:
        grid = one_arm(model_dir, data_dir, work / f"grid-{seed}", seed, args, asha=False)
        asha = one_arm(model_dir, data_dir, work / f"asha-{seed}", seed, args, asha=True)
        keys = sorted(grid["curves"])
        early = [grid["curves"][k][min(s for s in grid["curves"][k] if s >= args.grace)] for k in keys]
        final = [grid["curves"][k][args.max_t] for k in keys]
        row = {"seed": seed, "grid_trial_steps": grid["trial_steps"], "asha_trial_steps": asha["trial_steps"],
               "trial_steps_ratio": asha["trial_steps"] / grid["trial_steps"],
               "grid_best": grid["best"], "asha_best": asha["best"],
               "best_loss_gap": (asha["best"] - grid["best"]) / grid["best"],
               "rank_correlation": spearman(early, final), "asha_stopped": asha["stopped"],
               "grid_wall_s": round(grid["wall_s"], 1), "asha_wall_s": round(asha["wall_s"], 1)}
        per_seed.append(row)
        print(f"seed {seed}: grid {row['grid_trial_steps']} trial-steps, best {row['grid_best']:.4f} "
              f"({row['grid_wall_s']:.0f} s) | ASHA {row['asha_trial_steps']} trial-steps "
              f"(ratio {row['trial_steps_ratio']:.3f}), best {row['asha_best']:.4f} (gap {row['best_loss_gap']:+.4f}), "
              f"{row['asha_stopped']} of {len(keys)} stopped ({row['asha_wall_s']:.0f} s) | early/final rank "
              f"Spearman {row['rank_correlation']:.3f}", flush=True)
    ray.shutdown()
    summary = {k: statistics.median(r[k] for r in per_seed) for k in
               ("grid_trial_steps", "asha_trial_steps", "trial_steps_ratio", "best_loss_gap", "rank_correlation",
                "grid_wall_s", "asha_wall_s")}
    summary.update(seeds=args.seeds, trials=len(args.ranks) * len(args.lrs), max_t=args.max_t, grace_period=args.grace,
                   reduction_factor=args.reduction, rows=args.rows, model="tiny-llama", per_seed=per_seed)
    print(f"medians over {len(per_seed)} seeds: trial_steps_ratio {summary['trial_steps_ratio']:.3f} "
          f"(goal <= 0.35), best_loss_gap {summary['best_loss_gap']:+.4f} (goal <= 0.01), rank_correlation "
          f"{summary['rank_correlation']:.3f}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
