"""eval_report.md + one bar chart per metric (base / few-shot base / each adapter), and the few-shot verdict."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# metric -> (label, higher is better)
METRICS = {"rougeL": ("ROUGE-L F", True), "rouge1": ("ROUGE-1 F", True), "rouge2": ("ROUGE-2 F", True),
           "bleu": ("BLEU", True), "chrf": ("chrF", True), "bertscore_f1": ("BERTScore F1", True),
           "exact_match": ("exact match", True), "perplexity": ("perplexity of references", False),
           "judge": ("LLM judge (1-10)", True)}


def verdicts(scores: dict[str, dict[str, float]], adapters: list[str]) -> dict[str, str]:
    """One plain sentence per adapter: does it beat the base, and does it beat the few-shot base, on ROUGE-L?"""
    out = {}
    base = scores["base"]["rougeL"]
    few = scores.get("few_shot", {}).get("rougeL")
    for name in adapters:
        mine = scores[name]["rougeL"]
        if few is not None and few >= mine:
            out[name] = (f"The few-shot base wins (ROUGE-L {few:.3f} vs {mine:.3f} for {name!r}): "
                         "the fine-tune did not help.")
        elif mine <= base:
            out[name] = f"{name!r} does not beat the base model (ROUGE-L {mine:.3f} vs {base:.3f})."
        else:
            vs_few = f" and the few-shot base ({few:.3f})" if few is not None else ""
            out[name] = (f"The fine-tune helped: {name!r} ROUGE-L {mine:.3f} beats the base ({base:.3f})"
                         f"{vs_few}.")
    return out


def write(results: dict[str, Any], out: Path) -> Path:
    """Write the markdown report and the plots into `out`; returns the report's path."""
    scores = results["variants"]
    variants = list(scores)
    metrics = [m for m in METRICS if any(_finite(scores[v].get(m)) for v in variants)]
    lines = [f"# Evaluation: {Path(results['base_model']).name}", "",
             f"{results['n_test']} test rows; few-shot base with k={results['few_shot_k']} examples; "
             f"generation backend: {results['backend']} (greedy).", "", "## Verdict", ""]
    lines += [f"- {v}" for v in results["verdicts"].values()] or ["- no adapter evaluated"]
    lines += ["", "## Scores", "", "| metric | " + " | ".join(variants) + " |",
              "|---|" + "---|" * len(variants)]
    for m in metrics:
        lines.append(f"| {METRICS[m][0]} | " + " | ".join(_fmt(scores[v].get(m)) for v in variants) + " |")
    if results.get("forgetting"):
        lines += ["", "## Forgetting (vs base)", "", "| variant | MMLU acc | Δ | general NLL (nats/token) | Δ |",
                  "|---|---|---|---|---|"]
        for v, row in results["forgetting"].items():
            lines.append(f"| {v} | {_fmt(row.get('mmlu_accuracy'))} | {_fmt(row.get('mmlu_accuracy_delta'))} | "
                         f"{_fmt(row.get('general_nll'))} | {_fmt(row.get('general_nll_delta'))} |")
        lines += ["", "Small models sit at chance on MMLU; the general-text NLL delta is the signal there."]
    if results.get("judge"):
        lines += ["", "## LLM judge", "", results["judge"]["caveat"]]
    lines += ["", "## Plots", ""] + [f"![{m}](plot_{m}.png)" for m in metrics]
    lines += ["", "## Samples", ""]
    for s in results.get("samples", [])[:4]:
        lines.append(f"- **prompt** {s['prompt']!r} · **reference** {s['reference']!r}")
        lines += [f"  - {v}: {s.get(v, '')!r}" for v in variants]
    for m in metrics:
        _bar(m, {v: scores[v].get(m) for v in variants}, out / f"plot_{m}.png")
    path = out / "eval_report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if _finite(x) else "–"


def _bar(metric: str, values: dict[str, float | None], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, v in values.items() if _finite(v)]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bars = ax.bar(names, [values[n] for n in names], color=["#999999", "#c9a227"] + ["#2a7ab0"] * len(names))
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    label, higher = METRICS[metric]
    ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)")
    ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
