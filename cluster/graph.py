"""The job graph of `loraforge run`: the stages of cluster.stages run in order, each skipped when its result is
current.

    data → sft → [dpo] → [rl] → [tune] → [evaluate → gate (→ registry)] → [merge → [quantize]] → serve → demo

A stage's key covers the config sections it depends on, the recorded outputs of its upstream stages and the code
(a hash of the package sources). When a stage finishes, `<run>/<stage>/stage.json` records its key and the hash
of what it wrote. On the next run a stage whose record has the same key, and whose output still hashes to what
was recorded, is `cached`: not run again. A stage that started under the same key and never finished (its
driver was killed) runs again and resumes: SFT and DPO from their last Ray Train checkpoint, the sweep from
Tune's saved state; rl starts again (it does not resume yet). `--force STAGE` reruns one stage, `--from STAGE`
it and every stage after it, `--until STAGE` stops after it; downstream stages rerun when an upstream output
changed. Outputs of other runs are never touched.

Optional stages run when their section says so: dpo with `dpo.train_path`, rl with an `rl:` section (its adapter
is then the candidate), tune with a `tune:` section, evaluate and gate with `eval.test_path`, or on the run's
curated test split when the config has an `eval:` or `gate:` section without one (the gate publishes a passing
adapter to the registry and moves its alias; a refusal ends the run with exit 3 and the reasons, before anything
is served), merge with a `merge:` section, quantize with a `quantize:` section (after merge). serve and demo
always run: they are not cached.

With `output_dir` an object-store URI (s3://...), the graph pulls the run's records and outputs into a local
mirror first (pipelines.artifacts.storage), pushes each record as it is written and each finished stage's folder
before its `done` record, and Ray Train writes checkpoints to the store itself: a driver on another machine sees
what ran and resumes from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cluster
import pipelines
import serve
import tune
from cluster.config import RunConfig
from cluster.stages import NAMES, STAGE, STAGES, Context, GateRefused, Stage
from pipelines.artifacts import storage
from pipelines.artifacts.manifest import hash_path
from pipelines.schema import UserError

__all__ = ["Graph", "GateRefused", "Plan", "NAMES", "STAGES", "source_hash"]

RECORD = "stage.json"
PACKAGES = tuple(pkg.__name__ for pkg in (pipelines, cluster, serve, tune))  # the code a stage's key hashes
STORE_ONLY = ("ray_train", "ray_tune")  # written to the store by Ray Train / Tune themselves: never pulled or pushed


def source_hash() -> str:
    """The code version a stage ran with: sha256 over the package sources (works without git, e.g. in a job's
    working_dir)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Plan:
    """What a run will do, stage by stage: run / cached / resume / off / stop, and why."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        width = max(len(n) for n in NAMES)
        lines = [f"{'stage':<{width}}  {'upstream':<22}  {'status':<7}  why"]
        for r in self.rows:
            lines.append(f"{r['stage']:<{width}}  {','.join(r['upstream']) or '-':<22}  {r['status']:<7}  {r['why']}")
        return "\n".join(lines)


class Graph:
    """One run's stages over one config: plan (dry run) and execute."""

    def __init__(self, cfg: RunConfig, *, force: tuple[str, ...] = (), start: str | None = None,
                 until: str | None = None, runners: dict[str, Callable[..., Path]] | None = None):
        """runners: stage name → fn(ctx, resume) -> output folder, in place of the stages' own runs (tests)."""
        for name in (*force, *(x for x in (start, until) if x)):
            if name not in NAMES:
                raise UserError(f"unknown stage {name!r}: the stages are {', '.join(NAMES)}")
        self.cfg = cfg
        self.force = set(force) | (set(NAMES[NAMES.index(start):]) if start else set())
        self.until = until
        self.code = source_hash()
        self.outputs: dict[str, str] = {}  # stage → hash of its output, for the keys of downstream stages
        self.folders: dict[str, Path] = {}
        self.runners = runners or {}
        self.ctx: Context | None = None  # what the stages handed each other in the last run()
        self.remote = cfg.remote_run()  # output_dir in an object store: this machine works in a mirror of it
        if self.remote:  # what earlier drivers (anywhere) recorded and wrote; Ray Train checkpoints stay there
            storage.pull(self.remote, cfg.run_dir(), skip=STORE_ONLY)

    # -- keys and records ------------------------------------------------------------------------------------
    def folder(self, stage: Stage) -> Path:
        return self.cfg.stage_dir(stage.name)

    def parts(self, stage: Stage, upstream_hashes: dict[str, str]) -> dict[str, Any]:
        return {"config": {s: _digest(getattr(self.cfg, s).model_dump(mode="json")
                                      if getattr(self.cfg, s) is not None else None) for s in stage.sections},
                "upstream": upstream_hashes, "code": self.code}

    def record(self, stage: Stage) -> dict[str, Any] | None:
        path = self.folder(stage) / RECORD
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _write_record(self, stage: Stage, doc: dict[str, Any]) -> None:
        path = self.folder(stage) / RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
        if self.remote:
            storage.push(path, f"{self.remote}/{stage.name}/{RECORD}")

    def _push(self, stage: Stage) -> None:
        """A finished stage's folder to the store (its ray_train/ is there already), the record last: a record
        in the store always describes outputs that are there."""
        if self.remote:
            storage.push(self.folder(stage), f"{self.remote}/{stage.name}", skip=(*STORE_ONLY, RECORD))

    def output_hash(self, stage: Stage) -> str:
        return hash_path(self.folder(stage), skip=(RECORD, RECORD.replace(".json", ".tmp")))

    # -- planning --------------------------------------------------------------------------------------------
    def decide(self, stage: Stage, will_run: set[str]) -> tuple[str, str, dict[str, Any] | None]:
        """(status, why, key parts) for a stage, given which upstream stages will run before it."""
        off = stage.enabled(self.cfg)
        if off:
            return "off", off, None
        if self.until and NAMES.index(stage.name) > NAMES.index(self.until):
            return "stop", f"after --until {self.until}", None
        if not stage.cached:
            return "run", "always runs", None
        ups = [u for u in stage.reads(self.cfg) if u in self.outputs or u in will_run]
        changed = [u for u in ups if u in will_run]
        parts = self.parts(stage, {u: self.outputs.get(u) for u in ups})
        rec = self.record(stage)
        if stage.name in self.force:
            return "run", "forced (--force / --from)", parts
        if changed:
            return "run", f"upstream {', '.join(changed)} will run", parts
        if rec is None:
            return "run", "no record: never ran here", parts
        if rec.get("status") != "done":
            same = rec.get("key") == _digest(parts)
            if same and not stage.resumable:
                return "run", f"interrupted earlier: {stage.name} does not resume, it starts again", parts
            return ("resume" if same else "run"), ("interrupted earlier under the same key: resumes from its last "
                                                   "checkpoint" if same else "interrupted earlier, and its inputs "
                                                   "changed since"), parts
        if rec.get("key") == _digest(parts):
            if self.output_hash(stage) != rec.get("output"):
                return "run", "its output changed since it was recorded", parts
            return "cached", f"key {rec['key'][:8]} matches (finished {rec.get('finished', '?')})", parts
        old = rec.get("parts", {})
        why = [f"{s} section changed" for s, h in parts["config"].items() if old.get("config", {}).get(s) != h]
        why += [f"upstream {u} output changed" for u, h in parts["upstream"].items()
                if old.get("upstream", {}).get(u) != h]
        if old.get("code") != parts["code"]:
            why.append("code changed")
        return "run", "; ".join(why) or "key changed", parts

    def plan(self) -> Plan:
        plan, will_run = Plan(), set()
        saved = dict(self.outputs)
        for stage in STAGES:
            status, why, _ = self.decide(stage, will_run)
            if status in ("run", "resume"):
                will_run.add(stage.name)
            elif status == "cached":
                self.outputs[stage.name] = self.record(stage)["output"]
            plan.rows.append({"stage": stage.name, "upstream": [u for u in stage.reads(self.cfg)
                                                                if STAGE[u].enabled(self.cfg) is None],
                              "status": status, "why": why})
        self.outputs = saved
        return plan

    # -- running ---------------------------------------------------------------------------------------------
    def run(self, log: Callable[[str], None] = print) -> dict[str, Path]:
        """Run every stage the plan says to, in order; returns stage → output folder of the stages that ran or
        were cached. Raises GateRefused when the gate refuses."""
        ctx = self.ctx = Context(self.cfg)
        for stage in STAGES:
            status, why, parts = self.decide(stage, set())
            if status in ("off", "stop"):
                continue
            if status == "cached":
                self.outputs[stage.name] = self.record(stage)["output"]
                self.folders[stage.name] = self.folder(stage)
                log(f"[graph] {stage.name}: cached ({why})")
                stage.hand(ctx, self.folder(stage))
                continue
            log(f"[graph] {stage.name}: {status} ({why})")
            key = _digest(parts) if parts else None
            if stage.cached:
                self._write_record(stage, {"stage": stage.name, "status": "running", "key": key, "parts": parts,
                                           "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
            t0 = time.time()
            run = self.runners.get(stage.name, stage)
            out = run(ctx, resume=status == "resume")
            self.folders[stage.name] = out
            if stage.cached:
                self.outputs[stage.name] = self.output_hash(stage)
                self._push(stage)
                self._write_record(stage, {"stage": stage.name, "status": "done", "key": key, "parts": parts,
                                           "output": self.outputs[stage.name], "seconds": round(time.time() - t0, 1),
                                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
            stage.hand(ctx, out)  # a refusing gate raises here, its record written
        return self.folders
