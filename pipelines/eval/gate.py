"""The deploy gate: thresholds on eval.json; a pass publishes the adapter to the registry and moves an alias,
a failure refuses with every reason listed. `force` overrides a failure and is recorded in the audit log.

    loraforge evaluate CONFIG --adapter runs/x/sft --gate [--force]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from pipelines.artifacts.registry import Registry, lineage_from_manifest
from pipelines.eval import served_parity
from pipelines.schema import Section


class GateSection(Section):
    """What an adapter must show in evaluation before it is promoted."""

    min_rougeL_gain_over_base: float = Field(0.05, description="ROUGE-L (0-1) gain over the base model, at least.")
    min_rougeL_gain_over_few_shot: float = Field(0.0, description=(
        "ROUGE-L gain over the few-shot base, at least (if few-shot wins, the fine-tune did not help)."))
    max_general_nll_increase: float | None = Field(0.25, description=(
        "Largest allowed rise in per-token NLL (nats) on held-out general text vs the base; None: not checked."))
    max_mmlu_drop: float | None = Field(None, description="Largest allowed drop in MMLU accuracy; None: not checked.")
    min_exact_match: float | None = Field(None, ge=0, le=1, description="Least exact-match share; None: not checked.")
    alias: str = Field("candidate", description="Registry alias a passing adapter is promoted to.")


@dataclass
class GateDecision:
    adapter: str
    passed: bool
    reasons: list[str] = field(default_factory=list)
    forced: bool = False
    version: int | None = None
    name: str = ""
    served_parity: dict[str, Any] | None = None  # trainer vs serving engine (pipelines.eval.served_parity)


def check(results: dict[str, Any], adapter: str, cfg: GateSection) -> list[str]:
    """Reasons the adapter fails the gate (empty list: it passes). `results` is eval.json's content."""
    variants = results["variants"]
    if adapter not in variants:
        return [f"adapter {adapter!r} was not evaluated"]
    tuned, base = variants[adapter], variants["base"]
    reasons = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            reasons.append(msg)

    gain = tuned["rougeL"] - base["rougeL"]
    need(gain >= cfg.min_rougeL_gain_over_base,
         f"ROUGE-L gain over base {gain:+.4f} < required {cfg.min_rougeL_gain_over_base:+.4f}")
    if "few_shot" in variants:
        gain_fs = tuned["rougeL"] - variants["few_shot"]["rougeL"]
        need(gain_fs >= cfg.min_rougeL_gain_over_few_shot,
             f"ROUGE-L gain over few-shot base {gain_fs:+.4f} < required {cfg.min_rougeL_gain_over_few_shot:+.4f}")
    forgetting = results.get("forgetting", {}).get(adapter, {})
    if cfg.max_general_nll_increase is not None and "general_nll_delta" in forgetting:
        d = forgetting["general_nll_delta"]
        need(d <= cfg.max_general_nll_increase,
             f"general-text NLL rose by {d:+.4f} nats/token > allowed {cfg.max_general_nll_increase:+.4f}")
    if cfg.max_mmlu_drop is not None and "mmlu_accuracy_delta" in forgetting:
        drop = -forgetting["mmlu_accuracy_delta"]
        need(drop <= cfg.max_mmlu_drop, f"MMLU accuracy dropped by {drop:.4f} > allowed {cfg.max_mmlu_drop:.4f}")
    if cfg.min_exact_match is not None:
        need(tuned["exact_match"] >= cfg.min_exact_match,
             f"exact match {tuned['exact_match']:.4f} < required {cfg.min_exact_match:.4f}")
    return reasons


def apply(results: dict[str, Any], adapter: str, adapter_dir: str | os.PathLike, cfg: GateSection,
          registry_root: str | os.PathLike, name: str, *, force: bool = False,
          parity_stop: float | None = None) -> GateDecision:
    """Check the gate; on a pass (or force) publish the adapter with its eval scores and move `cfg.alias`. An
    adapter whose folder holds served-engine parity figures (an rl adapter) is refused when their mean is above
    `parity_stop`; the figures go into the decision and the published version's lineage."""

    reasons = check(results, adapter, cfg)
    served = served_parity.read(adapter_dir)
    why = served_parity.refusal(served, parity_stop) if parity_stop is not None else None
    if why:
        reasons.append(why)
    decision = GateDecision(adapter=adapter, passed=not reasons, reasons=reasons, forced=bool(reasons) and force,
                            name=name, served_parity=served)
    reg = Registry(registry_root)
    if reasons and not force:
        reg.record("gate_refused", name=name, adapter_dir=str(adapter_dir), alias=cfg.alias, reasons=reasons)
        return decision
    scores = {k: v for k, v in results["variants"][adapter].items() if isinstance(v, (int, float))}
    # The serving signals measured on its evaluation answers (eval.json "signals"), frozen with the version: the
    # baseline `loraforge monitor` and serve/monitoring/alerts.yml judge its live traffic against.
    frozen = {"serve_baseline": results["signals"][adapter]} if adapter in results.get("signals", {}) else {}
    lineage = lineage_from_manifest(adapter_dir, eval_scores=scores,
                                    gate={"passed": not reasons, "forced": decision.forced, "reasons": reasons,
                                          **({"served_parity": served} if served else {})},
                                    **frozen)
    decision.version = reg.publish(name, adapter_dir, "lora_adapter", lineage, note="gate")
    why = "gate passed" if not reasons else "FORCED past a failed gate: " + "; ".join(reasons)
    reg.promote(name, decision.version, cfg.alias, reason=why, force=decision.forced)
    return decision
