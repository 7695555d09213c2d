"""Curation report: `curation_report.json` (integers that add up), `curation_report.md`, and PNG plots."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np

_PENDING: list = []  # plot processes given their job by plot(), joined by wait_plots
_PLOTTER: tuple | None = None  # (process, the pipe's sending end): started, waiting for its job


def start_plotter() -> None:
    """Fork the plot process now (once): at a low CPU priority (nice 10) it imports matplotlib while the stage
    works, then waits for plot()'s job. Without it, plot() forks one itself."""
    global _PLOTTER
    if _PLOTTER is None:
        ctx = multiprocessing.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_serve, args=(recv, send), daemon=True)
        proc.start()
        recv.close()
        _PLOTTER = (proc, send)


def cancel_plotter() -> None:
    """Stop a started plot process that will get no job (the stage failed before its report)."""
    global _PLOTTER
    if _PLOTTER is not None:
        proc, send = _PLOTTER
        _PLOTTER = None
        send.close()  # its recv ends (EOFError) and it exits without drawing
        proc.join()


def _serve(recv, send) -> None:
    send.close()
    # Below the stage's own processes, so it imports and draws mostly on CPU time they leave idle; not the lowest
    # (19), at which busy processes on a small machine starve it (wait_plots stops waiting anyway)
    os.nice(10)
    _figure()  # the import, while the parent works
    try:
        job = json.loads(recv.recv_bytes())
    except EOFError:
        return
    _draw_job(job)


def _draw_job(job: dict[str, Any]) -> None:
    _draw(np.asarray(job["lengths"], dtype=np.int64), Path(job["lengths_png"]), job["max_length"],
          job["categories"], Path(job["categories_png"]))


PLOTS = {"lengths": "length_histogram.png", "categories": "category_distribution.png"}


def plot(out: Path, lengths: np.ndarray, max_length: int, categories: dict[str, int]) -> None:
    """Give the plot process (start_plotter's, or one forked now) its job: the PNG plots of out, drawn while this
    process goes on; wait_plots() joins it."""
    global _PLOTTER

    start_plotter()
    proc, send = _PLOTTER
    _PLOTTER = None
    job = {"lengths": np.asarray(lengths).tolist(), "lengths_png": str(out / PLOTS["lengths"]),
           "max_length": max_length, "categories": categories, "categories_png": str(out / PLOTS["categories"])}
    send.send_bytes(json.dumps(job).encode())
    send.close()
    _PENDING.append((proc, job))


def write_report(out: Path, report: dict[str, Any], lengths: np.ndarray) -> None:
    """curation_report.json and .md (naming the PNG plots plot() draws)."""
    report["plots"] = dict(PLOTS)
    if len(lengths):
        report["length_tokens"] = {"min": int(lengths.min()), "median": float(np.median(lengths)),
                                   "p99": float(np.percentile(lengths, 99)), "max": int(lengths.max())}
    (out / "curation_report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "curation_report.md").write_text(markdown(report))


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Curation report ({r['kind']})", "",
             f"**{r['rows_in']}** rows in = **{r['rows_kept']}** kept + **{r['rows_rejected']}** rejected "
             f"({r['rows_faulty']} broken or low quality; the rest are duplicates, caps or mixing quota).", "",
             "| split | rows |", "|---|---:|"]
    lines += [f"| {s} | {n} |" for s, n in r["split_rows"].items()]
    if r.get("labels"):
        lines += ["", "## Labels (unpaired feedback)", "", "| split | desirable | undesirable |", "|---|---:|---:|"]
        lines += [f"| {s} | {n['desirable']} | {n['undesirable']} |" for s, n in r["labels"].items()]
    lines += ["", "## Rejected, by reason", "", "| reason | rows |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in r["rejected_by_reason"].items()] or ["| (none) | 0 |"]
    if r.get("formats"):
        lines += ["", "## Formats, decided per file (data.format)", "", "| file | format |", "|---|---|"]
        lines += [f"| {Path(f).name} | {fmt} |" for f, fmt in r["formats"].items()]
    lines += ["", "## Kept, by category", "", "| category | rows |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in r["kept_by_category"].items()]
    d = r["dedup"]
    lines += ["", "## Duplicate clusters", "",
              f"{d['near_pairs']} near-duplicate pairs confirmed (exact word-3-gram Jaccard); LSH bands x rows "
              f"= {d['lsh_bands']}. Largest clusters (first row kept):", ""]
    for c in d["examples"]:
        lines.append(f"- cluster of {c['size']}:")
        lines += [f"  - {'kept' if x['kept'] else 'dropped'} `{x['row_id']}`: {x['text'][:120]!r}" for x in c["rows"]]
    if r.get("phases"):
        lines += ["", "## Where the time went", "", "| phase | seconds |", "|---|---:|"]
        lines += [f"| {k} (wall) | {v:.2f} |" for k, v in r["phases"]["wall_seconds"].items()]
        lines += [f"| {k} (worker seconds, all tasks) | {v:.2f} |" for k, v in r["phases"]["task_seconds"].items()]
    lines += ["", f"![token lengths]({r['plots']['lengths']})", "",
              f"![categories]({r['plots']['categories']})", ""]
    return "\n".join(lines)


def wait_plots(patience_s: float = 5.0) -> None:
    """Join the plot processes plot() gave a job; one that failed is an error (the report names its plots). One
    still drawing after patience_s (its low priority starved by other work on this node) is stopped and its plots
    are drawn here, at this process's priority."""
    while _PENDING:
        proc, job = _PENDING.pop()
        proc.join(patience_s)
        if proc.exitcode is None:
            proc.terminate()
            proc.join()
            _draw_job(job)
            continue
        if proc.exitcode != 0:
            raise RuntimeError(f"drawing the curation report's plots failed (exit code {proc.exitcode}); the "
                               "traceback is in the log above")


def _draw(lengths: np.ndarray, lengths_png: Path, max_length: int, categories: dict[str, int],
          categories_png: Path) -> None:
    _plot_lengths(lengths, lengths_png, max_length)
    _plot_categories(categories, categories_png)


def _figure():
    """matplotlib's Figure class: drawn and saved through the Agg canvas, without pyplot (its import and global
    figure registry are not needed to write PNGs)."""
    from matplotlib.figure import Figure

    return Figure


def _plot_lengths(lengths: np.ndarray, path: Path, max_length: int) -> None:
    fig = _figure()(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.hist(lengths if len(lengths) else [0], bins=50)
    ax.axvline(max_length, color="red", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per kept row (chat template)")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})


def _plot_categories(counts: dict[str, int], path: Path) -> None:
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:30]
    fig = _figure()(figsize=(6, max(2.5, 0.3 * len(items) + 1)))
    ax = fig.subplots()
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1])
    ax.set_xlabel("kept rows")
    ax.set_title("category distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
