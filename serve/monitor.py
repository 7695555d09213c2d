"""`loraforge monitor`: each served adapter version's live quality signals against the baseline the gate froze
with it in the registry, and a judgement per version -- the same rule as serve/monitoring/alerts.yml; beside them
the judge's mean score of the version's sampled answers over the window (serve.judging), with the answers judged
and the judge calls that failed.

Live figures come from the app's Prometheus export (Ray's metrics endpoint, `http://<node>:<metrics port>/metrics`):
read twice `window_s` apart, the difference is the window (one read: everything since the replicas started). A
version's mean entropy over the window is judged against its baseline band, baseline mean +- z standard errors
(the baseline's per-answer sd / sqrt(answers in the window), pipelines.artifacts.signals.band); the empty and
refusal shares against the baseline's plus a margin. Pure apart from `scrape`.
"""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict
from typing import Any

from pipelines.artifacts.registry import Registry, RegistryError
from pipelines.artifacts.signals import band

Key = tuple[str, str]  # (adapter, version)
RATE_MARGIN = 0.1  # a share (empty, refusal) may exceed the baseline's by this much
MIN_ANSWERS = 10  # fewer answers in the window: no judgement


def scrape(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def counters(text: str) -> dict[str, dict[tuple, float]]:
    """The loraforge samples of a Prometheus text export: sample name -> {sorted label items: value} (summed over
    the series that share them, e.g. several replicas)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_loraforge_"):
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k in ("adapter", "version",
                                                                                   "finish_reason", "flag", "outcome")))
                out[s.name][labels] += s.value
    return out


def gauges(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name]


def live(after: str, before: str | None = None) -> dict[Key, dict[str, Any]]:
    """Per (adapter, version): answers, entropy_mean and the empty / refusal / length / error shares of the answers
    between two exports (`before` None: since the start)."""
    a, b = counters(after), counters(before) if before else {}

    def delta(name: str) -> dict[tuple, float]:
        now, then = a.get(name, {}), b.get(name, {})
        return {k: v - then.get(k, 0.0) for k, v in now.items()}

    per: dict[Key, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for labels, v in delta("ray_loraforge_answers_total").items():
        d = dict(labels)
        key = (d.get("adapter", ""), d.get("version", ""))
        per[key]["answers"] += v
        per[key][d.get("finish_reason", "")] += v
    for labels, v in delta("ray_loraforge_answers_flagged_total").items():
        d = dict(labels)
        per[(d.get("adapter", ""), d.get("version", ""))][d.get("flag", "")] += v
    for name, field in (("ray_loraforge_answer_entropy_nats_total", "entropy_sum"),
                        ("ray_loraforge_answer_entropy_count", "entropy_count")):
        for labels, v in delta(name).items():
            d = dict(labels)
            per[(d.get("adapter", ""), d.get("version", ""))][field] += v
    for labels, v in delta("ray_loraforge_judged_total").items():
        d = dict(labels)
        per[(d.get("adapter", ""), d.get("version", ""))]["judge_" + d.get("outcome", "")] += v
    for name, field in (("ray_loraforge_judge_score_points_total", "judge_sum"),
                        ("ray_loraforge_judge_score_count", "judge_count")):
        for labels, v in delta(name).items():
            d = dict(labels)
            per[(d.get("adapter", ""), d.get("version", ""))][field] += v
    out = {}
    for key, p in per.items():
        n = p.get("answers", 0.0)
        if n <= 0:
            continue
        out[key] = {"answers": int(round(n)),
                    "entropy_mean": p["entropy_sum"] / p["entropy_count"] if p.get("entropy_count") else None,
                    **{f"{k}_rate": p.get(k, 0.0) / n for k in ("empty", "refusal", "length", "error")},
                    "judged": int(round(p.get("judge_scored", 0.0))),
                    "judge_mean": p["judge_sum"] / p["judge_count"] if p.get("judge_count") else None,
                    "judge_failed": int(round(p.get("judge_error", 0.0) + p.get("judge_dropped", 0.0))),
                    "judge_no_score": int(round(p.get("judge_no_score", 0.0)))}
    return out


def judge(figs: dict[str, Any], base: dict[str, Any] | None, z: float) -> tuple[str, list[str]]:
    """("ok" | "breach" | "no baseline" | "too few answers", reasons) for one version's live figures."""
    if not base:
        return "no baseline", []
    if figs["answers"] < MIN_ANSWERS:
        return "too few answers", []
    reasons = []
    b = band(base, figs["answers"], z)
    ent = figs.get("entropy_mean")
    if b is not None and ent is not None and not b[0] <= ent <= b[1]:
        reasons.append(f"entropy {ent:.3f} outside the baseline band [{b[0]:.3f}, {b[1]:.3f}]")
    for k in ("empty", "refusal"):
        live_rate, base_rate = figs.get(f"{k}_rate", 0.0), base.get(f"{k}_rate", 0.0)
        if live_rate - base_rate > RATE_MARGIN:
            reasons.append(f"{k} rate {live_rate:.3f} > baseline {base_rate:.3f} + {RATE_MARGIN}")
    return ("breach" if reasons else "ok"), reasons


def baselines(registry: str | None, keys: list[Key]) -> dict[Key, dict[str, Any] | None]:
    """The `serve_baseline` the gate stored with each version (None: not in the registry, or none stored)."""
    out: dict[Key, dict[str, Any] | None] = {k: None for k in keys}
    if not registry:
        return out
    reg = Registry(registry)
    for name in sorted({a for a, _ in keys if a}):
        try:
            versions = reg.show(name)["versions"]
        except RegistryError:
            continue
        for key in keys:
            if key[0] == name and key[1] in versions:
                out[key] = (versions[key[1]].get("lineage") or {}).get("serve_baseline")
    return out


def report(url: str, registry: str | None, window_s: float, z: float,
           fetch: Any = scrape, sleep: Any = time.sleep) -> dict[str, Any]:
    """Everything `loraforge monitor` prints: per version its live figures, baseline, band and judgement; the
    canaries' state."""
    before = fetch(url) if window_s > 0 else None
    if before is not None:
        sleep(window_s)
    after = fetch(url)
    figs = live(after, before)
    bases = baselines(registry, list(figs))
    versions = []
    for (adapter, version), f in sorted(figs.items()):
        base = bases[(adapter, version)]
        verdict, reasons = judge(f, base, z)
        b = band(base, f["answers"], z) if base else None
        versions.append({"adapter": adapter or "(base)", "version": version, **f, "baseline": base,
                         "band": list(b) if b else None, "judgement": verdict, "reasons": reasons})
    states = {int(v): k for k, v in {"waiting": 0, "ramping": 1, "promoted": 2, "rolled_back": -1}.items()}
    percent = {(d.get("adapter"), d.get("incumbent"), d.get("candidate")): v
               for d, v in gauges(after, "ray_loraforge_canary_percent")}
    canaries = [{"adapter": d.get("adapter"), "incumbent": d.get("incumbent"), "candidate": d.get("candidate"),
                 "state": states.get(int(v), str(v)),
                 "percent": percent.get((d.get("adapter"), d.get("incumbent"), d.get("candidate")))}
                for d, v in gauges(after, "ray_loraforge_canary_state")]
    return {"window_s": window_s, "z": z, "versions": versions, "canaries": canaries}


def lines(rep: dict[str, Any]) -> list[str]:
    """The report as text: one line per version, one per canary."""
    out = [f"{'adapter@version':<28} {'answers':>7} {'entropy':>8} {'baseline band':>17} {'empty':>6} "
           f"{'refusal':>7} {'length':>6} {'judge (n, failed)':>18}  judgement"]
    for v in rep["versions"]:
        ent = "-" if v["entropy_mean"] is None else f"{v['entropy_mean']:.3f}"
        mean = v.get("judge_mean")
        jud = "-" if mean is None and not v.get("judge_failed") else \
            f"{'-' if mean is None else f'{mean:.2f}'} ({v.get('judged', 0)}, {v.get('judge_failed', 0)})"
        b = "-" if not v["band"] else f"[{v['band'][0]:.2f}, {v['band'][1]:.2f}]"
        name = f"{v['adapter']}@{v['version']}" if v["version"] else v["adapter"]
        why = ": " + "; ".join(v["reasons"]) if v["reasons"] else ""
        out.append(f"{name:<28} {v['answers']:>7} {ent:>8} {b:>17} {v['empty_rate']:>6.2f} "
                   f"{v['refusal_rate']:>7.2f} {v['length_rate']:>6.2f} {jud:>18}  {v['judgement']}{why}")
    for c in rep["canaries"]:
        share = "?" if c["percent"] is None else f"{c['percent']:g}"
        out.append(f"canary {c['adapter']}: {c['incumbent']} -> {c['candidate']} {c['state']} at {share}%")
    return out
