"""Every stage of a run, declared once: its name, upstream stages, config sections, when it is on, what its
command checks first, what it runs, what it hands the stages after it, and its one-line summary.

    data → sft → [dpo] → [rl] → [tune] → [evaluate → gate (→ registry)] → [merge → [quantize]] → serve → demo

cluster.graph orders and caches them for `loraforge run`; each stage command (cluster.cli_stages) is a thin
wrapper over the same entry, and `cli.COMMANDS` lists the commands from this table. A new stage is its
pipelines module, its config section and one entry here (with its command: `command=` names it, and a stage
without options of its own gets the generic one).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from cluster import session
from cluster.config import CURATED_TEST, RunConfig
from pipelines.artifacts import storage
from pipelines.artifacts.location import Location
from pipelines.artifacts.manifest import read_manifest
from pipelines.artifacts.models import resolve_model
from pipelines.artifacts.registry import Registry, lineage_from_manifest
from pipelines.data import tokenize as data
from pipelines.eval import evaluate, served_parity
from pipelines.eval import gate as gating
from pipelines.eval.gate import GateDecision
from pipelines.export import merge, quantize
from pipelines.schema import MissingInput
from pipelines.train import dpo, sft
from pipelines.train.config import TrainSetup
from pipelines.train.rl_config import ParitySection
from tune import sweep

console = Console(stderr=True, soft_wrap=True)  # a path is never broken over two lines


class GateRefused(Exception):
    """The gate refused the run's adapter: the run ends with exit 3, nothing after the gate runs."""

    def __init__(self, reasons: list[str]):
        super().__init__("gate refused: " + "; ".join(reasons))
        self.reasons = reasons


@dataclass
class Context:
    """What the stages hand each other within one run (or one command): the model folder, the adapters, the
    gate's decision, the serving URL; and what a command set: explicit adapters, folders, --local, --force."""

    cfg: RunConfig
    roles: dict[str, str] = field(default_factory=dict)  # "sft" / "dpo" / "rl" / "tune" → adapter folder
    given: dict[str, str] | None = None  # adapters named on the command line (--adapter)
    places: dict[str, Path] = field(default_factory=dict)  # stage name → folder the command chose (--out, --model)
    local: bool = False  # the training loop in this process, without Ray (sft --local)
    force: bool = False  # the gate publishes even on a refusal (evaluate --gate --force)
    decision: GateDecision | None = None
    published: str | None = None  # the candidate's registry version when the gate published it (name@N)
    built: tuple[str, str] | None = None  # (what, folder) of the model the run built: merged, then quantized
    url: str | None = None
    _model_dir: str | None = None

    # The candidate (evaluated first, gated, merged, served) is the first present. rl before dpo: online RL is the
    # last training stage of the chain (SFT → preference tuning → RL with verifiable rewards; rl.start=dpo).
    PRIORITY = ("rl", "dpo", "tune", "sft")

    @property
    def model_dir(self) -> str:
        if self._model_dir is None:
            self._model_dir = resolve_base(self.cfg)
        return self._model_dir

    @property
    def adapters(self) -> dict[str, str]:
        """name → folder, the candidate first: `<run>-rl`, `<run>-dpo`, `<run>-sweep`, `<run>` (the SFT adapter)."""
        if self.given is not None:
            return self.given
        suffix = {"rl": "-rl", "dpo": "-dpo", "tune": "-sweep", "sft": ""}
        return {f"{self.cfg.name}{suffix[r]}": self.roles[r] for r in self.PRIORITY if r in self.roles}

    def folder(self, stage: "Stage") -> Path:
        return self.places.get(stage.name) or stage.folder(self.cfg)


def _nothing(ctx: Context, out: Path) -> None:
    return None


def _always(cfg: RunConfig) -> str | None:
    return None


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]
    sections: tuple[str, ...]  # config sections its result depends on (the graph's cache key)
    run: Callable[[Context, bool], Path]  # (ctx, resume) → its output folder
    enabled: Callable[[RunConfig], str | None] = _always  # None: runs; else why it is left out
    needs: tuple[str, ...] = ()  # what its command checks before any Ray work (cluster.config.preflight)
    requires: tuple[str, ...] = ()  # upstream stages whose output its command alone must find
    hand: Callable[[Context, Path], None] = _nothing  # what it hands the stages after it (run now, or cached)
    summary: Callable[[Path], str] | None = None  # its one line after it ran
    cached: bool = True  # serve and demo always run
    marker: str = "manifest.json"  # the file in its folder that says its output is finished
    ray: bool = True  # works in a Ray instance (joined or started)
    command: str | None = None  # its CLI command
    inputs: Callable[[RunConfig], tuple[str, ...]] | None = None  # the upstream stages it reads under this config
    resumable: bool = True  # an interrupted run continues from its last checkpoint (else it starts again)

    def reads(self, cfg: RunConfig) -> tuple[str, ...]:
        """The upstream stages whose output it reads under this config (its key covers theirs)."""
        return self.inputs(cfg) if self.inputs else self.upstream

    def folder(self, cfg: RunConfig) -> Path:
        return cfg.stage_dir(self.name)

    def finished(self, cfg: RunConfig) -> bool:
        return (self.folder(cfg) / self.marker).is_file()

    def __call__(self, ctx: Context, resume: bool = False) -> Path:
        """Run it (in the Ray session unless the command runs it locally) and print its summary."""
        if self.ray and not ctx.local:
            session.init_ray(ctx.cfg)
        t0 = time.time()
        out = self.run(ctx, resume)
        if self.summary:
            console.print(f"[bold]{self.name}[/]: {self.summary(out)} ({time.time() - t0:.0f} s)")
        return out


def resolve_base(cfg: RunConfig) -> str:
    """The base model's local folder (a built-in built, a hub id downloaded, once per machine)."""
    with console.status(f"[bold]model[/]: resolving {cfg.model.name}"):
        t0 = time.time()
        path = resolve_model(cfg.model)
    console.print(f"[bold]model[/]: {path} ({time.time() - t0:.0f} s)")
    return path


def _found(cfg: RunConfig, stage: Stage) -> Location:
    """An upstream stage's output: its folder here, and its folder in the object store when output_dir is one and
    the graph pushed that stage there (a stage command run alone works in the mirror only)."""
    remote = cfg.remote_run()
    found = remote and storage.exists(f"{remote}/{stage.name}/manifest.json")
    return Location(stage.folder(cfg), f"{remote}/{stage.name}" if found else None)


def _output(cfg: RunConfig, name: str) -> Location:
    """Where a stage writes: its folder here, and in the store when output_dir is one (the graph pushes it there
    after the stage; Ray Train and Tune keep their state there directly, so a driver elsewhere resumes)."""
    remote = cfg.remote_run()
    return Location(cfg.stage_dir(name), f"{remote}/{name}" if remote else None)


def _setup(ctx: Context, resume: bool) -> TrainSetup:
    cfg = ctx.cfg
    return TrainSetup(model_dir=ctx.model_dir, model_name=cfg.model.name, dtype=cfg.model.dtype, quant=cfg.quant,
                      train=cfg.train, resume=resume, local=ctx.local)


def _absolute(spec: str) -> str:
    """A local path made absolute (Ray workers need not share the driver's working directory); URIs as given."""
    return spec if "://" in spec else str(Path(spec).resolve())


def _metrics(out: Path) -> dict[str, Any]:
    return read_manifest(out)["metrics"]


# -- the stages' runs -----------------------------------------------------------------------------------------
def _data(ctx: Context, resume: bool) -> Path:
    """Data stage alone: raw rows → curated rows → token ids with assistant-only labels (Ray Data)."""
    return data.run(ctx.cfg.data, ctx.model_dir, DATA.folder(ctx.cfg))


def _data_summary(out: Path) -> str:
    m = _metrics(out)
    return (f"{m['rows_in']} rows in, {m['rows_kept']} kept, {m['rows_rejected']} rejected "
            f"{m['rejected_by_reason'] or ''}; {m['tokens']} tokens")


def _sft(ctx: Context, resume: bool) -> Path:
    data = _found(ctx.cfg, DATA)
    return sft.run(_setup(ctx, resume), ctx.cfg.lora, data.local() if ctx.local else data, _output(ctx.cfg, SFT.name))


def _sft_summary(out: Path) -> str:
    m = _metrics(out)
    return (f"{m['steps']} steps, loss {m['loss_first']:.3f} → {m['loss_last']:.3f}, {m['trainable_params']:,} "
            f"LoRA parameters; curve in {out / 'loss.png'}")


def _dpo(ctx: Context, resume: bool) -> Path:
    """Preference tuning alone (dpo.method: dpo, orpo, simpo or kto) on dpo.train_path, on top of this run's SFT
    adapter (or a fresh adapter on the base: dpo.start=base)."""
    cfg, setup = ctx.cfg, _setup(ctx, resume)
    start = _found(cfg, SFT) if cfg.dpo.start == "sft" else None
    pairs = _output(cfg, f"{DPO.name}_data")  # a run in a store: read there
    prepared = dpo.prepare(cfg.dpo, setup, start, pairs.path)
    if pairs.uri:
        storage.push(prepared, pairs.uri)
    m = _metrics(prepared)
    n = m.get("labels", {}).get("train")  # unpaired rows (kto): their desirable/undesirable counts
    labels = f" ({n['desirable']} desirable, {n['undesirable']} undesirable)" if n else ""
    console.print(f"[bold]{DPO.name} data[/]: {m['rows_in']} rows in, {m['train']} train{labels}, "
                  f"{m['validation']} held out, {m['rows_rejected']} rejected {m['rejected_by_reason'] or ''}")
    return dpo.run(cfg.dpo, setup, start, pairs, _output(cfg, DPO.name), lora=cfg.lora)


def _dpo_summary(out: Path) -> str:
    m = _metrics(out)
    acc = m.get("reward_accuracy_history") or [float("nan")]
    method = read_manifest(out).get("config", {}).get("method", "dpo")
    return (f"{method}: {m['steps']} steps, loss {m['loss_first']:.3f} → {m['loss_last']:.3f}, reward accuracy "
            f"{acc[0]:.2f} → {acc[-1]:.2f}")


def _rl(ctx: Context, resume: bool) -> Path:
    """Online RL (GRPO family) on rl.prompts_path with the rl: section's rewards: rollouts on a vLLM Ray actor,
    the adapter synced to it as immutable versions policy@N, the parity gate between trainer and rollouts; from a
    fresh adapter on the base, this run's SFT adapter or its preference-tuned one (rl.start)."""
    cfg = ctx.cfg
    start = _found(cfg, STAGE[cfg.rl.start]) if cfg.rl.start != "base" else None
    # rl.run on a rollout engine started for it, then, with the same engine (serving's engine settings), the
    # served-engine parity of the saved adapter, which the gate checks before it publishes
    return served_parity.train_and_check(cfg.rl, _setup(ctx, resume), cfg.lora, cfg.serve, _output(cfg, RL.name),
                                         sft=start)


def _rl_summary(out: Path) -> str:
    m = _metrics(out)
    sync, served = m.get("sync_s_median"), served_parity.read(out)
    return (f"{m['steps']} steps, reward {m['reward_first']:.3f} → {m['reward_last']:.3f}, parity |Δ log p| mean "
            f"{max(m['parity_mean_history']):.2g} / max {max(m['parity_max_history']):.2g} (worst step), sync median "
            + (f"{sync:.3f} s" if sync is not None else "n/a")
            + (f", served engine {served['mean']:.2g} / {served['max']:.2g}" if served else "")
            + f"; curve in {out / 'reward.png'}")


def _rl_reads(cfg: RunConfig) -> tuple[str, ...]:
    return (cfg.rl.start,) if cfg.rl and cfg.rl.start != "base" else ()


def _tune(ctx: Context, resume: bool) -> Path:
    """The sweep over this run's tokenized data; its winner lands in <run>/tune/winner. With output_dir in an
    object store, Tune's state, the trials' checkpoints and the ledger of finished trials live in
    <run>/tune/ray_tune there (a driver elsewhere restores the sweep from them)."""
    return sweep.run(ctx.cfg.tune, ctx.cfg.lora, _setup(ctx, resume), _found(ctx.cfg, DATA),
                     _output(ctx.cfg, TUNE.name))


def _tune_summary(out: Path) -> str:
    winner = read_manifest(out / "winner")["lineage"]["sweep"]
    trials, best = winner["trials"], winner["winner"]
    return (f"{len(trials)} trials, {sum(t['status'] == 'stopped early' for t in trials)} stopped early; winner "
            f"{best['label']} eval_loss {best['eval_loss']:.4f} at step {best['step']}; report in "
            f"{out / 'sweep_report.md'}")


def eval_section(cfg: RunConfig):
    """eval with its test rows resolved (`curated` → the data stage's curated/test folder)."""
    path = cfg.eval_test_path()
    if path == CURATED_TEST:
        path = str(DATA.folder(cfg) / "curated" / "test")
    return cfg.eval if path == cfg.eval.test_path else cfg.eval.model_copy(update={"test_path": path})


def _evaluate(ctx: Context, resume: bool) -> Path:
    cfg = ctx.cfg
    with console.status(f"[bold]{EVALUATE.name}[/]: base, few-shot base and {len(ctx.adapters)} adapter(s) on "
                        f"{cfg.eval.max_samples} held-out rows ({cfg.eval.backend})"):
        return evaluate.run(eval_section(cfg), ctx.model_dir, ctx.adapters, ctx.folder(EVALUATE))


def _evaluate_summary(out: Path) -> str:
    variants = json.loads((out / "eval.json").read_text())["variants"]
    return (", ".join(f"{v} ROUGE-L {s['rougeL']:.3f} exact {s['exact_match']:.2f}" for v, s in variants.items())
            + f"; report in {out / 'eval_report.md'}")


def _gate(ctx: Context, resume: bool) -> Path:
    """The gate over this run's evaluation, for the first adapter: a pass (or ctx.force) publishes it to the
    registry under registry.name (default the run name) and moves gate.alias. The decision passes in memory
    (ctx.decision); gate.json keeps it for a cached rerun."""
    cfg = ctx.cfg
    results = json.loads((ctx.folder(EVALUATE) / "eval.json").read_text())
    first = next(iter(ctx.adapters))
    d = gating.apply(results, first, ctx.adapters[first], cfg.gate, cfg.registry.root, cfg.registry.name or cfg.name,
                     force=ctx.force, parity_stop=(cfg.rl.parity if cfg.rl else ParitySection()).stop)
    console.print(f"[bold]{GATE.name}[/]: {'passed' if d.passed else 'FORCED' if d.forced else 'refused'} for "
                  f"{first}" + (f": {cfg.registry.name or cfg.name}@{d.version}" if d.version else "")
                  + "".join(f"\n  {r}" for r in d.reasons))
    out = ctx.folder(GATE)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate.json").write_text(json.dumps({"passed": d.passed, "reasons": d.reasons, "name": d.name,
                                               "version": d.version, "adapter": d.adapter,
                                               "served_parity": d.served_parity}, indent=1))
    ctx.decision = d
    return out


def _gate_hand(ctx: Context, out: Path) -> None:
    """A refusal ends the run; after a pass the candidate is served from its registry version."""
    d = ctx.decision
    doc = {"passed": d.passed, "reasons": d.reasons, "name": d.name, "version": d.version} if d \
        else json.loads((out / "gate.json").read_text())  # cached: what the gate decided then
    if not doc["passed"]:
        raise GateRefused(doc["reasons"])
    ref = f"{doc['name']}@{doc['version']}"
    art = Registry(ctx.cfg.registry.root).resolve(ref)
    role = next(r for r in ctx.PRIORITY if r in ctx.roles)
    ctx.roles[role], ctx.published = str(art.path.resolve()), ref


def _merge(ctx: Context, resume: bool) -> Path:
    """Merge adapter(s) into an unquantized copy of the base; parity-check; save an HF folder. The graph merges
    the run's candidate; a command merges every adapter it was given, in order."""
    adapters = list(ctx.given.values()) if ctx.given is not None else [next(iter(ctx.adapters.values()))]
    return merge.run(ctx.cfg.merge, ctx.model_dir, adapters, ctx.folder(MERGE))


def _quantize(ctx: Context, resume: bool) -> Path:
    """Quantize the merged model in a Ray task (on a GPU node when quantize.num_gpus > 0); recovery measured
    inside, on held-out rows only."""
    import ray

    cfg, q = ctx.cfg, ctx.cfg.quantize
    source = str(ctx.folder(MERGE).resolve())
    calibration, evaluation = _quantize_rows(cfg)  # refused before any Ray work
    session.init_ray(cfg)
    out = ctx.folder(QUANTIZE).resolve()
    task = ray.remote(num_cpus=q.num_cpus, num_gpus=q.num_gpus)(quantize.run)
    with console.status(f"[bold]{QUANTIZE.name}[/]: {q.method} of {source}"):
        return Path(ray.get(task.remote(q, source, str(out), calibration=_absolute(calibration),
                                        evaluation=_absolute(evaluation))))


def _quantize_rows(cfg: RunConfig) -> tuple[str, str]:
    """(calibration rows, held-out rows) of the quantize stage. Calibration rows are meant to be training-like, so
    training data is the default there; recovery is measured on held-out rows and never on training rows."""
    q, curated = cfg.quantize, DATA.folder(cfg) / "curated"
    calibration = q.calibration_path or (str(curated / "train") if (curated / "train").is_dir()
                                         else cfg.data.train_path)
    if not calibration:
        raise MissingInput("quantize: no calibration rows: set quantize.calibration_path or data.train_path")
    if q.eval_path:
        return calibration, q.eval_path
    test_rows = None
    if (curated / "manifest.json").is_file():
        test_rows = int(read_manifest(curated).get("metrics", {}).get("split_rows", {}).get("test") or 0)
    if not test_rows:
        found = f"{curated / 'test'} holds no rows" if test_rows == 0 else f"no finished data stage in {curated}"
        raise MissingInput(
            f"quantize: no held-out rows to measure recovery on ({found}). Set quantize.eval_path=FILE, or "
            "produce a test split (data.split.test > 0, then `loraforge tokenize`). Training rows are not "
            "used: they would measure memorisation, not what quantization kept")
    return calibration, str(curated / "test")


def _quantize_summary(out: Path) -> str:
    report = json.loads((out / "quantize.json").read_text())
    return (f"{report['scheme']}: perplexity x{report['perplexity_ratio']:.3f}, size x{report['size_ratio']:.2f} "
            "of the source")


def _serve(ctx: Context, resume: bool) -> Path:
    ctx.url = start_serving(ctx.cfg, served(ctx))
    return SERVE.folder(ctx.cfg)


def _demo(ctx: Context, resume: bool) -> Path:
    demo(ctx.cfg, ctx.url, served(ctx))
    return DEMO.folder(ctx.cfg)


def _sft_role(ctx: Context, out: Path) -> None:
    ctx.roles["sft"] = str(out.resolve())


def _dpo_role(ctx: Context, out: Path) -> None:
    ctx.roles["dpo"] = str(out.resolve())


def _rl_role(ctx: Context, out: Path) -> None:
    ctx.roles["rl"] = str(out.resolve())


def _winner_role(ctx: Context, out: Path) -> None:
    ctx.roles["tune"] = str((out / "winner").resolve())


def _merged(ctx: Context, out: Path) -> None:
    ctx.built = ("merged model", str(out.resolve()))


def _quantized(ctx: Context, out: Path) -> None:
    """A quantize stage that finished passed its recovery check (quantize.run refuses otherwise)."""
    ctx.built = (f"quantized model ({json.loads((out / 'quantize.json').read_text())['scheme']})",
                 str(out.resolve()))


# -- what is served -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    """What a run serves: `model`, the folder vLLM loads as its base, and the adapters on it (none when the run
    built a merged or quantized model, which holds the adapter); `what` names it in one line."""

    model: str
    adapters: dict[str, str]
    what: str


def served(ctx: Context) -> Served:
    """The one rule for what `run`, `serve` and `deploy` serve: the quantized model when the quantize stage ran
    (it passed its recovery check), else the merged model when merge ran, else the base with the run's adapters,
    the candidate first (rl's, else DPO's, else the sweep winner's, else SFT's; its registry version when the gate
    published it). Adapters named on the command line are served on the base as given."""
    if ctx.built and ctx.given is None:
        what, folder = ctx.built
        return Served(folder, {}, f"{what} {folder}")
    adapters = ctx.adapters
    if not adapters:
        return Served(ctx.model_dir, {}, f"base {ctx.cfg.model.name} alone (no adapter)")
    first = next(iter(adapters))
    version = f" = {ctx.published}" if ctx.published and ctx.given is None else ""
    return Served(ctx.model_dir, adapters, f"base {ctx.cfg.model.name} + adapter {first}{version} "
                                           f"({adapters[first]})")


def built_so_far(cfg: RunConfig) -> Context:
    """A Context of what this run's folder holds: every enabled stage whose output is finished hands it on, as
    it would in `run` (a gate that refused raises GateRefused). What `serve` and `deploy` serve: `served(...)`."""
    ctx = Context(cfg)
    for stage in STAGES:
        if stage.cached and stage.enabled(cfg) is None and stage.finished(cfg):
            stage.hand(ctx, stage.folder(cfg))
    return ctx


def served_in_plan(cfg: RunConfig, statuses: dict[str, str]) -> str:
    """`served` read from a plan (stage → run / cached / resume / off / stop): what the run will serve."""
    on = {name for name, status in statuses.items() if status in ("run", "cached", "resume")}
    if QUANTIZE.name in on:
        return f"quantized model ({cfg.quantize.method}) {QUANTIZE.folder(cfg)}"
    if MERGE.name in on:
        return f"merged model {MERGE.folder(cfg)}"
    role = next((r for r in Context.PRIORITY if r in on), None)
    if role is None:
        return f"base {cfg.model.name} alone (no adapter)"
    folder = TUNE.folder(cfg) / "winner" if role == TUNE.name else STAGE[role].folder(cfg)
    gate = f", as its registry version under {cfg.registry.name or cfg.name}" if GATE.name in on else ""
    return f"base {cfg.model.name} + adapter {folder}{gate}"


# -- when a stage is on ---------------------------------------------------------------------------------------
def _sft_on(cfg: RunConfig) -> str | None:
    """SFT runs unless every later training stage that is on starts from the base."""
    dpo_base = cfg.dpo.train_path and cfg.dpo.start == "base"
    rl_from = cfg.rl.start if cfg.rl else None
    if rl_from == "sft" or (rl_from == "dpo" and not dpo_base):
        return None
    if dpo_base:
        return "dpo.start=base: preference tuning starts from the base" + (
            " (and rl.start=base)" if rl_from == "base" else "")
    if rl_from == "base" and not cfg.dpo.train_path:
        return "rl.start=base: online RL starts from the base"
    return None


def _dpo_on(cfg: RunConfig) -> str | None:
    return None if cfg.dpo.train_path else "dpo.train_path is not set"


def _rl_on(cfg: RunConfig) -> str | None:
    return None if cfg.rl else "no rl: section"


def _tune_on(cfg: RunConfig) -> str | None:
    return None if cfg.tune else "no tune: section"


def _evaluate_on(cfg: RunConfig) -> str | None:
    if cfg.eval_test_path():
        return None
    if cfg.asks_evaluation():
        return "eval.test_path is not set and data.split.test is 0 (no curated test split)"
    return "no eval: or gate: section (or eval.test_path)"


def _merge_on(cfg: RunConfig) -> str | None:
    return None if MERGE.name in cfg.model_fields_set else "no merge: section"


def _quantize_on(cfg: RunConfig) -> str | None:
    if QUANTIZE.name not in cfg.model_fields_set:
        return "no quantize: section"
    return None if _merge_on(cfg) is None else "quantize needs merge (add a merge: section)"


DATA = Stage("data", (), ("model", "data"), _data, needs=("model", "train_rows"), summary=_data_summary,
             command="tokenize")
SFT = Stage("sft", ("data",), ("model", "lora", "quant", "train"), _sft, _sft_on, needs=("model",),
            requires=("data",), hand=_sft_role, summary=_sft_summary, command="sft")
DPO = Stage("dpo", ("sft",), ("model", "lora", "quant", "train", "dpo"), _dpo, _dpo_on, needs=("model", "pairs"),
            requires=("sft",), hand=_dpo_role, summary=_dpo_summary, command="dpo")
RL = Stage("rl", ("sft", "dpo"), ("model", "lora", "quant", "train", "rl"), _rl, _rl_on,
           needs=("model", "prompts", "serving"), hand=_rl_role, summary=_rl_summary, command="rl", inputs=_rl_reads,
           resumable=False)
TUNE = Stage("tune", ("data",), ("model", "lora", "quant", "train", "tune"), _tune, _tune_on,
             needs=("model", "train_rows", "sweep"), hand=_winner_role, summary=_tune_summary, command="tune",
             marker="winner/manifest.json")
EVALUATE = Stage("evaluate", ("sft", "dpo", "rl", "tune"), ("model", "eval"), _evaluate, _evaluate_on,
                 needs=("model", "test_rows"), summary=_evaluate_summary, command="evaluate")
GATE = Stage("gate", ("evaluate",), ("gate", "registry"), _gate, _evaluate_on, hand=_gate_hand, marker="gate.json")
MERGE = Stage("merge", ("sft", "dpo", "rl", "tune", "gate"), ("model", "merge"), _merge, _merge_on, needs=("model",),
              hand=_merged, command="merge")
QUANTIZE = Stage("quantize", ("merge",), ("quantize",), _quantize, _quantize_on, needs=("quantize_rows",),
                 hand=_quantized, summary=_quantize_summary, ray=False, command="quantize")
SERVE = Stage("serve", ("sft", "dpo", "rl", "tune", "gate"), ("model", "serve"), _serve, cached=False,
              needs=("model", "serving"), command="serve")
DEMO = Stage("demo", ("serve",), ("demo",), _demo, cached=False)

STAGES: tuple[Stage, ...] = (DATA, SFT, DPO, RL, TUNE, EVALUATE, GATE, MERGE, QUANTIZE, SERVE, DEMO)
STAGE = {s.name: s for s in STAGES}
NAMES = tuple(STAGE)


# -- what commands and stages share ---------------------------------------------------------------------------
def needs_output(cfg: RunConfig, stage: Stage, source: str) -> None:
    """A stage command run alone on an earlier stage's output: that output is there (MissingInput naming the
    command that makes it)."""
    for name in (*stage.requires, *(stage.reads(cfg) if stage.inputs else ())):
        up = STAGE[name]
        if up.enabled(cfg) is None and not up.finished(cfg):  # an upstream stage that is off is not read
            raise MissingInput(f"{source}: {up.folder(cfg)} holds no {up.name} output: run `loraforge "
                               f"{up.command} {source}` first")


def publish(cfg: RunConfig, folder: Path, name: str, kind: str) -> str:
    """Publish a stage's output folder as the next version of `name` in the run's registry."""
    version = Registry(cfg.registry.root).publish(name, folder, kind, lineage_from_manifest(folder))
    return f"registry: {name}@{version} ({kind}) in {cfg.registry.root}"


def run_adapters(cfg: RunConfig) -> dict[str, str]:
    """This run's adapter, {run name: its SFT folder}, once SFT has written one; else {}."""
    folder = SFT.folder(cfg)
    return {cfg.name: str(folder.resolve())} if (folder / "adapter_config.json").is_file() else {}


def adapters_from(specs: list[str] | None, cfg: RunConfig) -> dict[str, str]:
    """`NAME=FOLDER` / `FOLDER` specs as {name: folder}; none given: this run's adapter (or MissingInput)."""
    if not specs:
        found = run_adapters(cfg)
        if not found:
            raise MissingInput(f"no --adapter given and {SFT.folder(cfg)} holds no adapter: run `loraforge "
                               f"{SFT.command}` first or pass --adapter FOLDER")
        return found
    out = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).resolve().name, spec
        if not (Path(folder) / "adapter_config.json").is_file():
            raise MissingInput(f"--adapter {spec}: {folder} holds no adapter (no adapter_config.json)")
        out[name] = str(Path(folder).resolve())
    return out


def start_serving(cfg: RunConfig, what: Served) -> str:
    from serve.app import start

    session.init_ray(cfg)
    t0 = time.time()
    with console.status(f"[bold]{SERVE.name}[/]: starting vLLM behind Ray Serve"):
        url = start(cfg.serve.with_judge_store(str(cfg.run_dir() / "judged")), what.model, what.adapters)
    console.print(f"[bold]{SERVE.name}[/]: {url} up in {time.time() - t0:.0f} s; serving {what.what}; models: "
                  f"{cfg.serve.model_alias}" + "".join(f", {cfg.serve.model_alias}:{a}" for a in what.adapters))
    return url


def demo(cfg: RunConfig, url: str, what: Served) -> list[dict[str, str]]:
    """Ask every demo prompt of what is served through the real OpenAI client and print the answers: the base
    beside the candidate adapter, or the merged / quantized model alone (the base is not served then)."""
    import openai
    from rich.table import Table

    client = openai.OpenAI(base_url=url, api_key=cfg.serve.api_key or "none")
    alias = cfg.serve.model_alias
    adapter = next(iter(what.adapters), None)
    models = {"base": alias, "adapter": f"{alias}:{adapter}"} if adapter else {"served": alias}
    rows = []
    for prompt in cfg.demo.prompts:
        row = {"prompt": prompt}
        for col, model in models.items():
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=cfg.demo.max_tokens, temperature=0.0)
            row[col] = r.choices[0].message.content or ""
        rows.append(row)
    title = f"base vs adapter '{adapter}'" if adapter else what.what
    table = Table(title=f"{title} (greedy, via {url})", show_lines=True)
    for col in ("prompt", *models):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*r.values())
    console.print(table)
    return rows
