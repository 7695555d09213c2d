"""The quality signals of answers, defined once: measured on live traffic by the serving replicas (serve.signals),
on the evaluation outputs by the eval stage, and stored with a version in the registry by the gate as its baseline
(lineage `serve_baseline`), which `loraforge monitor` and the shipped alert rules compare live traffic against.

Per answer: the mean top-k token entropy (nats; each token's top-k log-probs renormalised: 0 for a certain token,
log k for k equally likely ones), the generated tokens, the finish reason (stop / length / abort / error), empty
(nothing but whitespace) and refusal (the answer opens with a refusal phrase). Pure: the standard library only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

TOP_K = 20  # log-probs per token the entropy is computed over (vLLM's default max_logprobs)
# Answers opening with one of these (case-insensitive, after leading punctuation/space) count as refusals.
REFUSAL = re.compile(
    r"\A[\W_]*(?:i'?m sorry|i am sorry|sorry,? (?:but )?i|i (?:cannot|can'?t|won'?t|will not|am unable|'m unable)"
    r"|i'?m not able to|as an ai\b|i apologi[sz]e)", re.IGNORECASE)


def topk_entropy(logprobs: Iterable[float]) -> float:
    """Entropy in nats of the distribution the given log-probs make once renormalised (top-k truncation);
    -inf entries have no mass. 0.0 for no entries."""
    lps = [lp for lp in logprobs if lp > -math.inf]
    if not lps:
        return 0.0
    top, exp = max(lps), math.exp
    z = s = 0.0
    for lp in lps:
        w = exp(lp - top)
        z += w
        s += w * (lp - top)
    return max(0.0, math.log(z) - s / z)


def is_refusal(text: str) -> bool:
    return bool(REFUSAL.match(text or ""))


def is_empty(text: str) -> bool:
    return not (text or "").strip()


@dataclass
class Figures:
    """What a set of answers shows: answers, mean and standard deviation of the per-answer entropy, its standard
    error (sd / sqrt(n)), and the shares of empty, refusing, length-cut and failed answers. entropy_answers: the
    answers that carry an entropy (all of them, unless serve.signals.sample_rate measures a sample)."""

    answers: int = 0
    entropy_mean: float | None = None
    entropy_sd: float | None = None
    entropy_se: float | None = None
    empty_rate: float = 0.0
    refusal_rate: float = 0.0
    length_rate: float = 0.0
    error_rate: float = 0.0
    mean_tokens: float = 0.0
    entropy_answers: int = 0

    def row(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def figures(rows: list[dict[str, Any]]) -> Figures:
    """Figures of answer rows ({entropy, tokens, finish_reason, empty, refusal}; missing keys count as absent)."""
    n = len(rows)
    if not n:
        return Figures()
    ent = [float(r["entropy"]) for r in rows if r.get("entropy") is not None]
    mean = sum(ent) / len(ent) if ent else None
    sd = se = None
    if mean is not None and len(ent) >= 2:
        sd = math.sqrt(sum((e - mean) ** 2 for e in ent) / (len(ent) - 1))
        se = sd / math.sqrt(len(ent))

    def share(key: str, value: Any = True) -> float:
        return sum(1 for r in rows if r.get(key) == value) / n

    return Figures(n, mean, sd, se, share("empty"), share("refusal"), share("finish_reason", "length"),
                   share("finish_reason", "error"), sum(int(r.get("tokens") or 0) for r in rows) / n, len(ent))


def baseline(rows: list[dict[str, Any]], top_k: int = TOP_K) -> dict[str, Any]:
    """What the gate stores with a version (lineage `serve_baseline`): the figures of its evaluation answers."""
    return {**figures(rows).row(), "top_k": top_k}


def band(base: dict[str, Any], answers: int, z: float, floor: float = 0.05) -> tuple[float, float] | None:
    """The entropy band a window of `answers` live answers of a version should fall in: baseline mean +- z
    standard errors (the baseline's per-answer sd / sqrt(answers)), at least +- `floor` nats; None without a
    baseline sd."""
    mean, sd = base.get("entropy_mean"), base.get("entropy_sd")
    if mean is None or sd is None or answers < 1:
        return None
    half = max(floor, z * sd / math.sqrt(answers))
    return mean - half, mean + half
