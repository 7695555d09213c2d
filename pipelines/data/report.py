"""Curation report: `curation_report.json` (integers that add up), `curation_report.md`, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

_PENDING: list = []  # plot processes started by write_report(wait=False), joined by wait_plots


def write_report(out: Path, report: dict[str, Any], lengths: np.ndarray, cfg, wait: bool = True) -> None:
    """The JSON and Markdown report now; the PNG plots in a forked process (importing matplotlib and drawing cost
    ~1.5 s of the driver's time, which the next stage's work can overlap): joined here, or with wait=False by
    wait_plots()."""
    import multiprocessing

    plots = {"lengths": "length_histogram.png", "categories": "category_distribution.png"}
    proc = multiprocessing.get_context("fork").Process(
        target=_draw, args=(lengths, out / plots["lengths"], cfg.max_length, report["kept_by_category"],
                            out / plots["categories"]), daemon=True)
    proc.start()
    _PENDING.append(proc)
    if wait:
        wait_plots()
    report["plots"] = plots
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


def wait_plots() -> None:
    """Join the plot processes write_report started; one that failed is an error (the report names its plots)."""
    while _PENDING:
        proc = _PENDING.pop()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"drawing the curation report's plots failed (exit code {proc.exitcode}); the "
                               "traceback is in the log above")


def _draw(lengths: np.ndarray, lengths_png: Path, max_length: int, categories: dict[str, int],
          categories_png: Path) -> None:
    _plot_lengths(lengths, lengths_png, max_length)
    _plot_categories(categories, categories_png)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_lengths(lengths: np.ndarray, path: Path, max_length: int) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths if len(lengths) else [0], bins=50)
    ax.axvline(max_length, color="red", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per kept row (chat template)")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _plot_categories(counts: dict[str, int], path: Path) -> None:
    plt = _plt()
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:30]
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.3 * len(items) + 1)))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1])
    ax.set_xlabel("kept rows")
    ax.set_title("category distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
