"""A canary that acts: the split of one registry adapter between an incumbent and a candidate version ramps through
serve.canary.<name>.steps while the candidate's quality signals (serve.signals) hold against the incumbent's, and
falls back to 0% on a breach, the alias moved back to the incumbent. Every step, the promotion and the rollback is
an entry of the registry's audit log with the figures that decided it. Judge scores of sampled answers
(serve.judging) count too: a candidate judged worse than the incumbent by serve.canary.<name>.max_judge_drop (and by
z standard errors) is a breach once each side has min_judged scores; with fewer, the judge does not block the ramp
(the audit entry's figures say so under `judge`).

One place decides: `CanaryController`, a one-replica Serve deployment of the app. Engine replicas send it each
answer's signals (serve.signals.Recorder); every ingress replica asks it for the current split (`CanaryView`, at
most POLL_S old) and routes with serve.routing's sticky hash, so all replicas apply the same split and a caller
keeps its version while the share only grows. A controller that restarts resumes from the audit log.

`Canary` is the policy, pure (no Ray, an injected clock) and unit-tested; the controller runs it.

    serve:
      registry: registry
      canary:
        city: {incumbent: 3, candidate: 4, alias: production, steps: [5, 25, 50, 100], step_window_s: 600}
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipelines.artifacts.registry import Registry, RegistryError
from pipelines.artifacts.signals import Figures, figures
from serve.config import CanaryConfig, ServeConfig

logger = logging.getLogger("loraforge.serve")
POLL_S = 0.5  # how stale an ingress replica's copy of the split may be
WAITING, RAMPING, PROMOTED, ROLLED_BACK = "waiting", "ramping", "promoted", "rolled_back"
STATE_CODE = {WAITING: 0, RAMPING: 1, PROMOTED: 2, ROLLED_BACK: -1}  # the loraforge_canary_state gauge


def breaches(cand: Figures, inc: Figures, cfg: CanaryConfig) -> list[str]:
    """Why the candidate's figures do not hold against the incumbent's (empty: they hold). Entropy is compared once
    each side has min_answers answers with an entropy (serve.signals.sample_rate measures a sample)."""
    out = []
    if cand.entropy_mean is not None and inc.entropy_mean is not None and \
            min(cand.entropy_answers, inc.entropy_answers) >= cfg.min_answers:
        diff = cand.entropy_mean - inc.entropy_mean
        se = math.sqrt((cand.entropy_se or 0) ** 2 + (inc.entropy_se or 0) ** 2)
        if diff > cfg.max_entropy_increase and diff > cfg.z * se:
            out.append(f"entropy {cand.entropy_mean:.3f} vs incumbent {inc.entropy_mean:.3f} nats: +{diff:.3f} > "
                       f"max_entropy_increase {cfg.max_entropy_increase} and > {cfg.z:g} standard errors ({se:.3f})")
    for name, cap in (("empty", cfg.max_empty_rate_increase), ("refusal", cfg.max_refusal_rate_increase),
                      ("length", cfg.max_length_rate_increase)):
        c, i = getattr(cand, f"{name}_rate"), getattr(inc, f"{name}_rate")
        if cap is not None and c - i > cap:
            out.append(f"{name} rate {c:.3f} vs incumbent {i:.3f}: +{c - i:.3f} > max_{name}_rate_increase {cap}")
    if cand.error_rate > cfg.max_error_rate:
        out.append(f"error rate {cand.error_rate:.3f} > max_error_rate {cfg.max_error_rate}")
    return out


def judge_figures(cand: list[float], inc: list[float], cfg: CanaryConfig) -> dict[str, Any]:
    """The judge scores (serve.judge) of both sides: judged answers, mean, sd; `counts`: whether they may breach
    (each side has min_judged scores and max_judge_drop is set: with fewer the judge does not block the ramp);
    `breach`: why the candidate's scores do not hold (candidate mean below the incumbent's by more than
    max_judge_drop and by more than z standard errors), else None."""
    def side(xs: list[float]) -> dict[str, Any]:
        n = len(xs)
        mean = sum(xs) / n if n else None
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n >= 2 else None
        return {"judged": n, "mean": None if mean is None else round(mean, 3),
                "sd": None if sd is None else round(sd, 3)}

    c, i = side(cand), side(inc)
    counts = cfg.max_judge_drop is not None and min(c["judged"], i["judged"]) >= cfg.min_judged
    out: dict[str, Any] = {"candidate": c, "incumbent": i, "counts": counts, "breach": None}
    if not counts:
        out["note"] = (f"fewer than min_judged={cfg.min_judged} judged answers on a side: the judge does not block"
                       if cfg.max_judge_drop is not None else "max_judge_drop unset: judge scores never breach")
        return out
    drop = i["mean"] - c["mean"]
    se = math.sqrt(c["sd"] ** 2 / c["judged"] + i["sd"] ** 2 / i["judged"])
    if drop > cfg.max_judge_drop and drop > cfg.z * se:
        out["breach"] = (f"judge score {c['mean']:.2f} vs incumbent {i['mean']:.2f}: -{drop:.2f} > max_judge_drop "
                         f"{cfg.max_judge_drop} and > {cfg.z:g} standard errors ({se:.2f})")
    return out


@dataclass
class Decision:
    """A change the controller makes and logs: action is canary_start, canary_step, canary_promote or
    canary_rollback."""

    action: str
    percent: float
    figures: dict[str, Any]
    reasons: list[str] = field(default_factory=list)


class Canary:
    """The policy of one canary. Answers arrive through `observe`; `decide` is called every tick and returns the
    change to make, if any; `weights` is the split now."""

    def __init__(self, name: str, cfg: CanaryConfig, clock: Callable[[], float] = time.monotonic,
                 entropy: bool = True):
        # entropy: the engines measure it (serve.signals on, top_k > 0, sample_rate > 0); a step then waits for
        # min_answers answers with an entropy on each side, not only min_answers answers
        self.name, self.cfg, self.clock, self.entropy = name, cfg, clock, entropy
        self.state, self.step, self.step_started, self.started = WAITING, -1, 0.0, 0.0
        self.inc_rows: list[dict[str, Any]] = []  # the incumbent's answers since the canary started ramping
        self.cand_rows: list[dict[str, Any]] = []  # the candidate's answers in the current step
        self.served = {"incumbent": 0, "candidate": 0}  # answers seen since the start, per side
        self.scores: dict[str, list[float]] = {"incumbent": [], "candidate": []}  # judge scores since the start
        self.last: Decision | None = None

    @property
    def refs(self) -> tuple[str, str]:
        return f"{self.name}@{self.cfg.incumbent}", f"{self.name}@{self.cfg.candidate}"

    @property
    def percent(self) -> float:
        if self.state == RAMPING:
            return self.cfg.steps[self.step]
        return 100.0 if self.state == PROMOTED else 0.0

    def weights(self) -> dict[str, float]:
        inc, cand = self.refs
        p = self.percent
        return {ref: w for ref, w in ((inc, 100.0 - p), (cand, p)) if w > 0}

    def observe(self, row: dict[str, Any]) -> None:
        if self.state not in (RAMPING,):
            return
        version = str(row.get("version"))
        if version == str(self.cfg.incumbent):
            self.inc_rows.append(row)
            self.served["incumbent"] += 1
        elif version == str(self.cfg.candidate):
            self.cand_rows.append(row)
            self.served["candidate"] += 1

    def observe_judged(self, row: dict[str, Any]) -> None:
        """A judge score of one sampled answer (serve.judging): kept since the start, per side, for every step."""
        if self.state != RAMPING or row.get("score") is None:
            return
        version = str(row.get("version"))
        side = "incumbent" if version == str(self.cfg.incumbent) else \
            "candidate" if version == str(self.cfg.candidate) else None
        if side:
            self.scores[side].append(float(row["score"]))

    def start(self, ready: bool) -> Decision | None:
        """Begin ramping once both versions are registered (`ready`)."""
        if self.state != WAITING or not ready:
            return None
        self.state, self.step = RAMPING, 0
        self.step_started = self.started = self.clock()
        return self._decided("canary_start", {})

    def resume(self, action: str, percent: float) -> None:
        """Pick up where the audit log says a previous controller left this canary."""
        if action == "canary_rollback":
            self.state = ROLLED_BACK
        elif action == "canary_promote":
            self.state = PROMOTED
        elif percent in self.cfg.steps:
            self.state, self.step = RAMPING, self.cfg.steps.index(percent)
            self.step_started = self.started = self.clock()

    def decide(self) -> Decision | None:
        if self.state != RAMPING:
            return None
        cand, inc = figures(self.cand_rows), figures(self.inc_rows)
        judge = judge_figures(self.scores["candidate"], self.scores["incumbent"], self.cfg)
        figs = {"candidate": cand.row(), "incumbent": inc.row(), "step_s": round(self.clock() - self.step_started, 1),
                "served": dict(self.served), "judge": judge}
        need = self.cfg.min_answers
        if min(cand.answers, inc.answers) < need or \
                (self.entropy and min(cand.entropy_answers, inc.entropy_answers) < need):
            return None
        if reasons := breaches(cand, inc, self.cfg) + ([judge["breach"]] if judge["breach"] else []):
            self.state = ROLLED_BACK
            return self._decided("canary_rollback", figs, reasons)
        if self.clock() - self.step_started < self.cfg.step_window_s:
            return None
        if self.step == len(self.cfg.steps) - 1:
            self.state = PROMOTED
            return self._decided("canary_promote", figs)
        self.step += 1
        self.step_started, self.cand_rows = self.clock(), []
        return self._decided("canary_step", figs)

    def _decided(self, action: str, figs: dict[str, Any], reasons: list[str] | None = None) -> Decision:
        self.last = Decision(action, self.percent, figs, reasons or [])
        return self.last

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "percent": self.percent, "incumbent": self.cfg.incumbent,
                "candidate": self.cfg.candidate, "served": dict(self.served),
                "since_start_s": round(self.clock() - self.started, 1) if self.started else None,
                "last": None if self.last is None else self.last.__dict__,
                "candidate_figures": figures(self.cand_rows).row(), "incumbent_figures": figures(self.inc_rows).row(),
                "judge": judge_figures(self.scores["candidate"], self.scores["incumbent"], self.cfg)}


def public_splits(canaries: dict[str, Canary]) -> dict[str, dict[str, float]]:
    """The split of every canary, under its name and name@alias: what the ingress routes with."""
    out = {}
    for name, c in canaries.items():
        w = c.weights()
        out[name] = w
        if c.cfg.alias:
            out[f"{name}@{c.cfg.alias}"] = w
    return out


class CanaryController:
    """The Serve deployment that holds every canary of the app (one replica). Methods: `split` (for the ingress),
    `observe` (answers from the engine replicas), `status`."""

    async def __init__(self, cfg: ServeConfig):
        self.cfg, self.registry = cfg, Registry(cfg.registry)
        sig = cfg.signals
        entropy = sig.enabled and sig.top_k > 0 and sig.sample_rate > 0
        self.canaries = {name: Canary(name, c, entropy=entropy) for name, c in cfg.canary.items()}
        self._metrics: Any = None
        await asyncio.to_thread(self._resume)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def _resume(self) -> None:
        for entry in self.registry.audit():
            c = self.canaries.get(str(entry.get("name")))
            if c and entry.get("action", "").startswith("canary_") and entry.get("incumbent") == c.cfg.incumbent \
                    and entry.get("candidate") == c.cfg.candidate:
                c.resume(entry["action"], float(entry.get("percent", -1)))

    async def split(self) -> dict[str, dict[str, float]]:
        return public_splits(self.canaries)

    async def observe(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            c = self.canaries.get(row.get("adapter"))
            if c is not None:
                c.observe(row)

    async def observe_judged(self, rows: list[dict[str, Any]]) -> None:
        """Judge scores of sampled answers from the judge replica (serve.judging)."""
        for row in rows:
            c = self.canaries.get(row.get("adapter"))
            if c is not None:
                c.observe_judged(row)

    async def status(self) -> dict[str, Any]:
        return {name: c.status() for name, c in self.canaries.items()}

    async def _loop(self) -> None:
        tick = min(c.cfg.tick_s for c in self.canaries.values()) if self.canaries else 1.0
        while True:
            for c in self.canaries.values():
                try:
                    decision = c.start(await asyncio.to_thread(self._ready, c)) if c.state == WAITING else c.decide()
                    if decision is not None:
                        await asyncio.to_thread(self._act, c, decision)
                    self._export(c)
                except Exception:  # noqa: BLE001 - one canary's failure (a registry hiccup) must not stop the others
                    logger.exception("loraforge: canary %s: tick failed", c.name)
            await asyncio.sleep(tick)

    def _ready(self, c: Canary) -> bool:
        try:
            versions = self.registry.show(c.name)["versions"]
        except RegistryError:
            return False
        return str(c.cfg.incumbent) in versions and str(c.cfg.candidate) in versions

    def _act(self, c: Canary, d: Decision) -> None:
        """Log the decision with its figures; on a rollback put the alias back on the incumbent, on a promotion
        move it to the candidate (the registry logs those moves too)."""
        alias = c.cfg.alias
        self.registry.record(d.action, name=c.name, incumbent=c.cfg.incumbent, candidate=c.cfg.candidate,
                             percent=d.percent, figures=d.figures, reasons=d.reasons)
        logger.warning("loraforge: canary %s: %s at %g%% %s", c.name, d.action, d.percent, "; ".join(d.reasons))
        if not alias:
            return
        aliases = self.registry.show(c.name)["aliases"]
        if d.action == "canary_rollback" and aliases.get(alias) != c.cfg.incumbent:
            self.registry.promote(c.name, c.cfg.incumbent, alias, reason="canary rollback: " + "; ".join(d.reasons))
        elif d.action == "canary_promote" and aliases.get(alias) != c.cfg.candidate:
            self.registry.promote(c.name, c.cfg.candidate, alias, reason=f"canary held at 100% for "
                                  f"{c.cfg.step_window_s:g} s")

    def _export(self, c: Canary) -> None:
        if self._metrics is None:
            from ray.util.metrics import Gauge

            tags = ("adapter", "incumbent", "candidate")
            self._metrics = (Gauge("loraforge_canary_percent", "Candidate share of a canary's traffic (%).",
                                   tag_keys=tags),
                             Gauge("loraforge_canary_state", "Canary state: 0 waiting, 1 ramping, 2 promoted, "
                                   "-1 rolled back.", tag_keys=tags))
        t = {"adapter": c.name, "incumbent": str(c.cfg.incumbent), "candidate": str(c.cfg.candidate)}
        self._metrics[0].set(c.percent, tags=t)
        self._metrics[1].set(STATE_CODE[c.state], tags=t)


class CanaryView:
    """An ingress replica's copy of the controller's split, at most POLL_S old: the first request waits for it,
    later ones use the copy while a refresh runs in the background."""

    def __init__(self, handle: Any, cfg: ServeConfig, poll_s: float = POLL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.handle, self.poll_s, self.clock = handle, poll_s, clock
        # Until the controller first answers: every canary's name to its incumbent (never the newest version).
        self.splits = public_splits({name: Canary(name, c) for name, c in cfg.canary.items()})
        self._fetched = False
        self._at, self._task = -math.inf, None

    async def refresh(self) -> None:
        if self.clock() - self._at < self.poll_s or (self._task is not None and not self._task.done()):
            return
        self._at = self.clock()
        if not self._fetched:
            await self._fetch()
        else:
            self._task = asyncio.get_running_loop().create_task(self._fetch())

    async def _fetch(self) -> None:
        try:
            self.splits, self._fetched = await self.handle.split.remote(), True
        except Exception as e:  # noqa: BLE001 - keep routing with the last split; the controller is restarted by Serve
            logger.warning("loraforge: canary controller unavailable (%s); keeping the last split", e)

    def merged(self, splits: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        return {**splits, **self.splits}
