"""Data pipeline throughput and memory: our Ray Data curate+tokenize vs `datasets.map(num_proc=2)` (issues 4, 19).

    .venv/bin/python bench/data_pipeline.py                        # 1,000 / 10,000 Alpaca rows, ~4 min on 2 cores
    .venv/bin/python bench/data_pipeline.py --rows 5000 --scale 10 --repeats 3 --json   # issue 19's goals
    .venv/bin/python bench/data_pipeline.py --scale-test 1000000   # ours alone on N synthetic rows (not in CI)

Input: the first --rows rows of ../shared/data/sft/alpaca_5000.json (1x) and --rows x --scale rows (10x: the
source cycled). Every row is perturbed the same way at both sizes: a replica tag ("r0", "r1", ...) is inserted
after every second word of instruction, input and output, so each word 3-gram carries its replica's tag and
neither exact nor MinHash near-duplicate removal collapses the copies (it makes rows ~1.5x longer than plain
Alpaca). The files are written as JSONL under a temporary folder; nothing is copied into the repository.

(a) Ours: `pipelines.data.run` (Ray Data: read, parse, validate, normalise, quality filters, exact + MinHash LSH
    near-dedup over the whole set, seeded 80/10/10 split, Parquet; then chat-template tokenization with
    assistant-only labels, Parquet) on a local Ray instance with num_cpus=2. Timed: `data.run` only (ray.init
    and, as for (b), the driver's tokenizer and pandas imports excluded (`import datasets` imports pandas; pyarrow
    imports it on the first array a process builds); Ray worker start-up, transformers import and
    tokenizer load inside the workers included). data.engine auto runs 1x (5,000 rows, ~4.5 MiB) in the driver;
    the "engine ray, forced" row runs the same 1x input on Ray Data tasks.
(b) Baseline: `datasets` in one process: load_dataset("json") → Dataset.map(num_proc=2) doing the same per-row
    work through the same pure functions (alpaca_to_messages, normalise_record, quality_reason with the default
    thresholds and the max_length token bound, exact_key, tokenize_messages) → filter refused rows → exact
    de-duplication on the key (driver, first occurrence kept) → to_parquet. Timed from load_dataset to the
    Parquet file (tokenizer loaded before the timer, in the parent; the forked map workers inherit it).
    The baseline OMITS: MinHash near-dup detection and LSH, the split (one output file), the rejected/ quarantine
    files, the curation report (Markdown + PNG plots), the manifests and content hash, and the per-row token
    count that curation does before tokenizing. It therefore does less work than (a).
(c) Same-work baseline: (b) plus what (a) does besides: the map also MinHash-signs each kept row (datasketch,
    the same permutations and word 3-grams), then datasketch's MinHashLSH (the bands x rows curation uses) finds
    near-duplicate candidates, each confirmed by the exact Jaccard as curation does, a union-find keeps the
    first of each cluster, and the seeded hash split writes train/validation/test Parquet files. Still without
    the quarantine files, report, plots and manifests. `same_work_ratio` = ours rows/s over (c)'s.
Ours also reports where its time went (curation_report.json `phases`, the tokenized manifest's
`phase_seconds`): wall seconds per pass on the driver, and worker seconds per phase of the parse pass.

Each measurement runs in a fresh Python subprocess (its own Ray instance for (a)), so one run's memory does not
leak into the next. Peak RSS: the subprocess and all its descendants (Ray's GCS, raylet and workers for (a); the
map workers for (b)), summed, sampled with psutil every 0.2 s. Ray's object store is shared memory: psutil
counts the pages each process has touched in its RSS, so shared pages may count more than once, and pages
nobody maps at the sample instant are missed. Peak PSS (each shared page split among its sharers) is sampled
every 1 s only: reading it costs the kernel ~55 ms of CPU per sample of a Ray instance's ~20 processes (every
0.2 s, that slowed ours ~10% on 2 cores and the 2-process baseline hardly at all). Figures are medians over
--repeats (default 1, for time: a single
run's numbers are noisy on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import ALPACA, PeakRSS  # noqa: E402

from cluster import session
from cluster.config import load_config
from pipelines.artifacts.manifest import read_manifest
from pipelines.artifacts.models import ModelConfig, resolve_model
from pipelines.data import tokenize as data
from pipelines.data.chat import load_tokenizer, tokenize_messages
from pipelines.data.config import DedupSection, FilterSection, SplitSection
from pipelines.data.dedup import SPLITS, assign_split, clusters, jaccard, optimal_bands, shingles
from pipelines.data.filters import dedup_text, exact_key, full_text, normalise_record, quality_reason
from pipelines.data.rowformats import RowError, alpaca_to_messages

_WORDS = re.compile(r"(\S+)")


def _tag(text: str, tag: str) -> str:
    """Insert `tag` after every second word (layout kept), so every word 3-gram contains the tag."""
    parts = _WORDS.split(text)  # [sep, word, sep, word, ..., sep]
    out, n = [], 0
    for i, p in enumerate(parts):
        out.append(p)
        if i % 2 == 1:
            n += 1
            if n % 2 == 0:
                out.append(" " + tag)
    return "".join(out)


def write_input(n: int, out: Path) -> Path:
    """n perturbed Alpaca rows as JSONL (the source cycled; replica k tagged 'r<k>')."""
    src = json.loads(ALPACA.read_text())
    with open(out, "w") as fh:
        for i in range(n):
            k, r = divmod(i, len(src))
            row = src[r]
            tag = f"r{k}"
            fh.write(json.dumps({f: _tag(row.get(f) or "", tag) if isinstance(row.get(f), str) else row.get(f)
                                 for f in ("instruction", "input", "output")}) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- children


def child_ray(args) -> dict:
    cfg = load_config(None, ["ray.num_cpus=2", f"model.name={args.model}", f"data.train_path={args.input}",
                             "data.format=alpaca", f"data.max_length={args.max_length}",
                             f"data.engine={args.engine}"])
    session.init_ray(cfg)
    load_tokenizer(args.model_dir)  # as the baseline: the driver's tokenizer import before the timer
    import pandas  # noqa: F401  as the baseline's `import datasets` (pandas and pyarrow with it), before the timer
    try:
        with PeakRSS(pss=True) as rss:
            t0 = time.perf_counter()
            out = data.run(cfg.data, args.model_dir, Path(args.work) / "ray_out")
            secs = time.perf_counter() - t0
    finally:
        session.finish()
    m = read_manifest(out, kind="tokenized_dataset")["metrics"]
    return {"seconds": secs, "peak_rss": rss.peak, "peak_pss": rss.peak_pss, "rows_in": m["rows_in"],
            "rows_kept": m["rows_kept"],
            "rejected_by_reason": m["rejected_by_reason"], "phases": phases_of(out)}


_TOK = {}


def _baseline_row(row, model_dir: str, max_length: int, sign: bool = False) -> dict:
    if model_dir not in _TOK:
        from transformers import AutoTokenizer

        f = FilterSection()
        _TOK[model_dir] = (AutoTokenizer.from_pretrained(model_dir),
                           f)
    tok, th = _TOK[model_dir]
    res = {"input_ids": [], "labels": [], "reason": "", "key": "", "sig": [], "dtext": ""}
    try:
        rec = normalise_record("sft", {"messages": alpaca_to_messages(row)})
        reason = quality_reason("sft", rec, th)
        if reason:
            raise RowError(reason, "")
        t = tokenize_messages(tok, rec["messages"], max_length)  # too_long refused here (the token bound)
        res.update(input_ids=t.input_ids, labels=t.labels, key=exact_key(full_text("sft", rec)))
        if sign:
            from datasketch import MinHash

            dtext = dedup_text(full_text("sft", rec))
            m = MinHash(num_perm=DedupSection().num_perm, seed=1, scheme="affine32")
            m.update_batch([x.encode() for x in shingles(dtext)])
            res.update(sig=m.hashvalues.tolist(), dtext=dtext)
    except RowError as e:
        res["reason"] = e.reason
    return res


def child_datasets(args, same_work: bool = False) -> dict:
    os.environ["HF_DATASETS_CACHE"] = str(Path(args.work) / "hf_cache")
    import datasets

    datasets.disable_progress_bars()
    _baseline_row({"instruction": "warm", "output": "up"}, args.model_dir, args.max_length)  # tokenizer loaded
    with PeakRSS(pss=True) as rss:
        t0 = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=args.input, split="train",
                                   cache_dir=str(Path(args.work) / "hf_cache"))
        n_in = len(ds)
        ds = ds.map(_baseline_row, fn_kwargs={"model_dir": args.model_dir, "max_length": args.max_length,
                                              "sign": same_work},
                    num_proc=2, remove_columns=ds.column_names, load_from_cache_file=False)
        reasons = ds["reason"]
        keys = ds["key"]
        seen, keep = set(), []
        for i, (r, k) in enumerate(zip(reasons, keys)):
            if not r and k not in seen:
                seen.add(k)
                keep.append(i)
        near = 0
        if same_work:
            keep, near = _near_dedup(ds, keep)
            _split_write(ds, keep, keys, Path(args.work))
        else:
            ds.select(keep).remove_columns(["reason", "key", "sig", "dtext"]).to_parquet(
                str(Path(args.work) / "baseline.parquet"))
        secs = time.perf_counter() - t0
    by_reason: dict[str, int] = {}
    for r in reasons:
        if r:
            by_reason[r] = by_reason.get(r, 0) + 1
    if near:
        by_reason["near_duplicate"] = near
    by_reason["exact_duplicate"] = n_in - len(keep) - sum(by_reason.values())
    return {"seconds": secs, "peak_rss": rss.peak, "peak_pss": rss.peak_pss, "rows_in": n_in, "rows_kept": len(keep),
            "rejected_by_reason": by_reason}


def _near_dedup(ds, keep: list[int]) -> tuple[list[int], int]:
    """datasketch MinHashLSH over the kept rows' signatures (curation's bands x rows), candidates confirmed by
    the exact word-3-gram Jaccard, union-find clusters; the first row of each cluster stays."""
    import numpy as np
    from datasketch import MinHash, MinHashLSH

    cfg = DedupSection()
    sigs, texts = ds.select(keep)["sig"], ds.select(keep)["dtext"]
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=optimal_bands(cfg.threshold, cfg.num_perm))
    ms = [MinHash(num_perm=cfg.num_perm, seed=1, hashvalues=np.asarray(s, dtype=np.uint32), scheme="affine32")
          for s in sigs]
    for i, m in enumerate(ms):
        lsh.insert(i, m)
    pairs = [(i, j) for i, m in enumerate(ms) for j in lsh.query(m)
             if i < j and m.jaccard(ms[j]) >= cfg.threshold - 0.15
             and jaccard(shingles(texts[i]), shingles(texts[j])) >= cfg.threshold]
    roots = clusters(len(ms), pairs)
    kept = [k for i, k in enumerate(keep) if roots[i] == i]
    return kept, len(keep) - len(kept)


def _split_write(ds, keep: list[int], keys: list[str], work: Path) -> None:
    from collections import defaultdict

    cfg = SplitSection()
    by_split = defaultdict(list)
    for i in keep:
        by_split[SPLITS[assign_split(keys[i], cfg.seed, cfg.fractions())]].append(i)
    body = ds.remove_columns(["reason", "key", "sig", "dtext"])
    for name, rows in by_split.items():
        body.select(rows).to_parquet(str(work / f"same_work_{name}.parquet"))


def write_synthetic(n: int, out: Path) -> Path:
    """n synthetic Alpaca-shaped rows, streamed to disk (never all in memory): words drawn from a fixed
    vocabulary by a seeded generator, instruction 8-20 words, input 0-30, output 20-120."""
    import random

    rng = random.Random(0)
    vocab = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ra", "si", "tu") for b in range(400)]
    with open(out, "w") as fh:
        for _ in range(n):
            words = lambda lo, hi: " ".join(rng.choices(vocab, k=rng.randint(lo, hi)))  # noqa: E731
            fh.write(json.dumps({"instruction": words(8, 20).capitalize() + "?", "input": words(0, 30),
                                 "output": words(20, 120).capitalize() + "."}) + "\n")
    return out


def phases_of(out: Path) -> dict:
    """Where ours spent its time: the curation report's phases and the tokenize stage's."""
    rep = json.loads((out / "curation_report.json").read_text())
    tok = read_manifest(out, kind="tokenized_dataset")["metrics"].get("phase_seconds", {})
    return {"engine": rep.get("phases", {}).get("engine", "ray"),
            "curate_wall": rep.get("phases", {}).get("wall_seconds", {}),
            "curate_worker": rep.get("phases", {}).get("task_seconds", {}),
            "lsh_cluster": rep.get("dedup", {}).get("lsh_cluster_seconds"), "tokenize_wall": tok}


# ---------------------------------------------------------------------------------------------- driver


def run_child(kind: str, jsonl: Path, model_dir: str, args, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    kind, _, engine = kind.partition(":")
    cmd = [sys.executable, __file__, "--child", kind, "--engine", engine or "auto", "--input", str(jsonl),
           "--model-dir", model_dir,
           "--model", args.model, "--max-length", str(args.max_length), "--work", str(work)]
    # the datasets baseline forks its map workers: Rust tokenizer threads off there (as datasets advises); ours
    # runs in one process (engine local) or Ray workers, where the tokenizer's own threads are its parallelism
    env = dict(os.environ, RAY_DEDUP_LOGS="1")
    env.pop("TOKENIZERS_PARALLELISM", None)
    if kind in ("datasets", "same_work"):
        env["TOKENIZERS_PARALLELISM"] = "false"
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        raise RuntimeError(f"{kind} child failed (rc {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(lines[-1])


def median_of(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for k in ("seconds", "peak_rss", "peak_pss"):
        out[k] = statistics.median(r.get(k, 0) for r in runs)
    out["rows_per_s"] = out["rows_in"] / out["seconds"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1000, help="rows at 1x (default 1000)")
    ap.add_argument("--scale", type=int, default=10, help="the large size is this many times --rows (default 10)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per measurement; medians reported (default 1)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="tokenizer: a built-in name or HF folder")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--scale-test", type=int, metavar="N", help="only ours, on N synthetic Alpaca-shaped rows")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON object, last line")
    ap.add_argument("--child", choices=["ray", "datasets", "same_work"], help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        res = {"ray": child_ray, "datasets": child_datasets,
               "same_work": lambda a: child_datasets(a, same_work=True)}[args.child](args)
        print(json.dumps(res), flush=True)
        return
    model_dir = resolve_model(ModelConfig(name=args.model))
    if args.scale_test:
        return scale_test(args, model_dir)
    figures = compare(args, model_dir)
    if args.json:
        print(json.dumps(figures))


def timed_runs(plan: list[tuple[str, str, Path]], model_dir: str, args, tmp: Path) -> dict[str, list]:
    res: dict[str, list] = {name: [] for name, _, _ in plan}
    for rep in range(args.repeats):
        for name, kind, src in plan:  # interleaved, so drift on the machine hits every contender alike
            t = time.time()
            print(f"[{name} run {rep + 1}/{args.repeats}] ...", end=" ", file=sys.stderr, flush=True)
            res[name].append(run_child(kind, src, model_dir, args, tmp / f"{name}_{rep}"))
            print(f"{time.time() - t:.0f} s", file=sys.stderr, flush=True)
    return res


def compare(args, model_dir: str) -> dict:
    n1, n10 = args.rows, args.rows * args.scale
    with tempfile.TemporaryDirectory(prefix="lf-bench-data-") as tmp:
        tmp = Path(tmp)
        small, big = write_input(n1, tmp / "in_1x.jsonl"), write_input(n10, tmp / "in_big.jsonl")
        res = timed_runs([("ds_1x", "datasets", small), ("same_1x", "same_work", small), ("ray_1x", "ray", small),
                          ("tasks_1x", "ray:ray", small), ("ray_big", "ray", big)], model_dir, args, tmp)
        same_tokens = tokens_agree(tmp / "ray_1x_0" / "ray_out" / "tokens", tmp / "ds_1x_0" / "baseline.parquet")
    r1, d1, s1, t1, rb = (median_of(res[k]) for k in ("ray_1x", "ds_1x", "same_1x", "tasks_1x", "ray_big"))
    mib = 1024 ** 2
    figures = {
        "rows_1x": n1, "rows_big": n10, "scale": args.scale, "repeats": args.repeats, "model": args.model,
        "ray_rows_per_s": round(r1["rows_per_s"], 1), "datasets_rows_per_s": round(d1["rows_per_s"], 1),
        "same_work_rows_per_s": round(s1["rows_per_s"], 1),
        "rows_per_s_ratio": round(r1["rows_per_s"] / d1["rows_per_s"], 3),
        "same_work_ratio": round(r1["rows_per_s"] / s1["rows_per_s"], 3),
        "engine_1x": r1["phases"]["engine"], "engine_big": rb["phases"]["engine"],
        "ray_tasks_rows_per_s_1x": round(t1["rows_per_s"], 1),
        "ray_tasks_ratio_1x": round(t1["rows_per_s"] / d1["rows_per_s"], 3),
        "ray_seconds_1x": round(r1["seconds"], 1), "datasets_seconds_1x": round(d1["seconds"], 1),
        "same_work_seconds_1x": round(s1["seconds"], 1),
        "ray_rows_per_s_big": round(rb["rows_per_s"], 1), "ray_seconds_big": round(rb["seconds"], 1),
        "ray_rows_kept_1x": r1["rows_kept"], "datasets_rows_kept_1x": d1["rows_kept"],
        "same_work_rows_kept_1x": s1["rows_kept"], "ray_rows_kept_big": rb["rows_kept"],
        "ray_rejected_by_reason_1x": r1["rejected_by_reason"],
        "datasets_rejected_by_reason_1x": d1["rejected_by_reason"],
        "same_work_rejected_by_reason_1x": s1["rejected_by_reason"],
        "ray_rejected_by_reason_big": rb["rejected_by_reason"],
        "peak_rss_mib_1x": round(r1["peak_rss"] / mib, 1), "peak_rss_mib_big": round(rb["peak_rss"] / mib, 1),
        "datasets_peak_rss_mib_1x": round(d1["peak_rss"] / mib, 1),
        "rss_10x_over_1x": round(rb["peak_rss"] / r1["peak_rss"], 3),
        "peak_pss_mib_1x": round(r1["peak_pss"] / mib, 1), "peak_pss_mib_big": round(rb["peak_pss"] / mib, 1),
        "datasets_peak_pss_mib_1x": round(d1["peak_pss"] / mib, 1),
        "pss_10x_over_1x": round(rb["peak_pss"] / r1["peak_pss"], 3) if r1["peak_pss"] else None,
        "tokens_equal_to_baseline_1x": same_tokens,
        "phases_1x": median_phases([r["phases"] for r in res["ray_1x"]]),
        "phases_big": median_phases([r["phases"] for r in res["ray_big"]]),
    }
    w = 36
    print(f"\nData pipeline, curate + tokenize ({args.model}, max_length {args.max_length}, "
          f"median of {args.repeats} run{'s' if args.repeats > 1 else ''}, 2 CPUs)")
    print(f"{'':{w}} {'rows in':>9} {'kept':>7} {'seconds':>8} {'rows/s':>8} {'peak RSS MiB':>13} "
          f"{'peak PSS MiB':>13}")
    for label, r in (("datasets.map(num_proc=2), 1x", d1), ("same work: + MinHash LSH + split, 1x", s1),
                     (f"ours (engine {r1['phases']['engine']}), 1x", r1), ("ours (engine ray, forced), 1x", t1),
                     (f"ours (engine {rb['phases']['engine']}), {args.scale}x", rb)):
        print(f"{label:{w}} {r['rows_in']:>9} {r['rows_kept']:>7} {r['seconds']:>8.1f} {r['rows_per_s']:>8.1f} "
              f"{r['peak_rss'] / mib:>13.0f} {r['peak_pss'] / mib:>13.0f}")
    print(f"rows/s ratio, ours over datasets.map at 1x: {figures['rows_per_s_ratio']:.2f} (goal >= 1.0); "
          f"over the same-work baseline: {figures['same_work_ratio']:.2f} (goal >= 1.5)")
    print(f"peak RSS (process tree, psutil; object store shm counted as mapped), {args.scale}x over 1x: "
          f"{figures['rss_10x_over_1x']:.2f} (streaming target <= 1.2); peak PSS (a page shared by forked processes "
          f"counted once): {figures['pss_10x_over_1x']}")
    print(f"the same token ids and labels as datasets.map's, row for row (as multisets), at 1x: {same_tokens}")
    print_phases(figures["phases_1x"], "1x")
    print_phases(figures["phases_big"], f"{args.scale}x")
    return figures


def tokens_agree(ours: Path, baseline: Path) -> bool:
    """Whether our tokenized rows (all splits) and the baseline's are the same (input_ids, labels) multiset: the
    same work was done, by other code paths (ours encodes each conversation once, in curation)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    def rows(table) -> list:
        return sorted(zip(map(tuple, table["input_ids"].to_pylist()), map(tuple, table["labels"].to_pylist())))

    return rows(pads.dataset(str(ours), format="parquet").to_table(columns=["input_ids", "labels"])) == rows(
        pq.read_table(baseline, columns=["input_ids", "labels"]))


def median_phases(runs: list[dict]) -> dict:
    """The per-phase medians over runs (same nested shape as one run's phases)."""
    out: dict = {"engine": runs[0].get("engine")}
    for group in ("curate_wall", "curate_worker", "tokenize_wall"):
        keys = runs[0].get(group, {})
        out[group] = {k: round(statistics.median(r[group].get(k, 0.0) for r in runs), 2) for k in keys}
    out["lsh_cluster"] = round(statistics.median(r.get("lsh_cluster") or 0.0 for r in runs), 2)
    return out


def print_phases(ph: dict, label: str) -> None:
    cells = [f"{k} {v:.1f}" for k, v in ph["curate_wall"].items()] + [f"tokenize.{k} {v:.1f}"
                                                                      for k, v in ph["tokenize_wall"].items()]
    print(f"ours {label}, wall s: " + ", ".join(cells) + f" (of which lsh+cluster {ph['lsh_cluster']:.1f})")
    print(f"ours {label}, parse-pass worker s: " + ", ".join(f"{k} {v:.1f}" for k, v in ph["curate_worker"].items()))


def scale_test(args, model_dir: str) -> None:
    """Ours alone on --scale-test N synthetic rows written by this script: rows/s and peak RSS (must stay flat)."""
    with tempfile.TemporaryDirectory(prefix="lf-bench-scale-") as tmp:
        tmp = Path(tmp)
        t = time.time()
        src = write_synthetic(args.scale_test, tmp / "synthetic.jsonl")
        print(f"wrote {args.scale_test} rows ({src.stat().st_size / 1024 ** 2:.0f} MiB) in {time.time() - t:.0f} s",
              file=sys.stderr)
        r = run_child("ray", src, model_dir, args, tmp / "ray")
    mib = 1024 ** 2
    figures = {"scale_test_rows": r["rows_in"], "rows_kept": r["rows_kept"], "seconds": round(r["seconds"], 1),
               "rows_per_s": round(r["rows_in"] / r["seconds"], 1), "peak_rss_mib": round(r["peak_rss"] / mib, 1),
               "rejected_by_reason": r["rejected_by_reason"], "phases": r["phases"]}
    print(f"\nscale test: {r['rows_in']} rows in {r['seconds']:.0f} s = {figures['rows_per_s']:.0f} rows/s, "
          f"peak RSS {figures['peak_rss_mib']:.0f} MiB (process tree)")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
