"""Sweep stage: Ray Tune searches LoRA rank / alpha / learning rate over the SFT trainer, with ASHA early stopping.

    loraforge tune configs/tune-tiny-cpu.yaml                  # 2-core CPU sweep (what the tests run)
    loraforge tune configs/tune-smollm2-gpu.yaml --register smollm2-sweep

Each trial is a function that fits its own Ray Train `TorchTrainer` with the SFT worker loop (Ray Train V2); rank
0's reports reach Tune through `TuneReportCallback`, at the validation cadence, so ASHA compares trials on
`eval_loss` at the same step counts. Tune over Train V2 needs Ray's State API (the dashboard): without it the
placement groups of trials ASHA stops are never released and the sweep hangs; `run` refuses such a cluster up
front.

Output folder: `winner/`, an ordinary adapter folder (the best checkpoint by eval_loss over every report of every
trial) whose `manifest.json` lineage names the sweep, the trial, its config and every trial's metrics;
`sweep_results.csv`, `sweep_trials.json` (every report of every trial), `sweep_report.md`, `sweep_curves.png`,
`sweep_rank_lr.png`, and `experiments/` (Tune's own state: rerunning the same sweep restores it and does not rerun
finished trials) and `trials/` (each trial's Ray Train run and checkpoints).

What a restore keeps: finished and ASHA-stopped trials stay as they were, and the searcher's state (Optuna's
history) is restored; ASHA's rung records are not (Tune does not save the scheduler), so the trials resumed after a
restore are compared only against reports that arrive after it.

Tune's experiment state is pickles (`tuner.pkl`, the searcher's state, trials cloudpickled inside
`experiment_state-*.json`) that `Tuner.restore` unpickles: after every fit (finished, interrupted or failed) this
machine's key seals them (pipelines.train.state_seal.seal_tune), and a restore first verifies them
(verify_tune): an experiment folder in which any of them is unsealed or changed is refused (exit 2, naming the file).
A driver killed outright (SIGKILL, a lost machine) leaves its last state unsealed: remove the experiment folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from pipelines.artifacts import storage
from pipelines.artifacts.location import Location
from pipelines.artifacts.manifest import read_manifest
from pipelines.schema import DataError, Section, UserError
from pipelines.train import sft
from pipelines.train.config import LoraSection, QuantSection, TrainSection, TrainSetup, WorkerJob
from pipelines.train.driver import copy_adapter, finish_stage, fit_on_ray
from pipelines.train.loop import NO_EVAL
from pipelines.train.state_seal import machine_key, seal_tune, verify_tune
from tune.space import LogRange, TuneSection, apply_trial, grid_points, grid_size, trial_label

TRIAL_DRIVER_CPU = 0.01  # the trial function only waits on its trainer; Tune refuses a resource request of 0
RELEASE_WAIT_S = 60.0  # after fit(): how long to wait for the trials' placement groups to be removed


class ClusterNotReady(UserError, RuntimeError):
    """The Ray cluster lacks what a sweep needs (the State API)."""


class SweepInterrupted(KeyboardInterrupt):
    """The sweep driver was interrupted (Ctrl+C): Tune saved its state; rerunning the same sweep resumes it."""


class TrialContext(Section):
    """What every trial function receives besides its point of the search space."""

    tune: TuneSection
    lora: LoraSection
    train: TrainSection
    quant: QuantSection
    model_dir: str
    model_name: str | None = Field(None, description="model.name (WorkerJob.model_name).")
    dtype: str
    data: Location = Field(description="The tokenized data (read from the store by the workers when it has a URI).")
    trials_dir: str = Field(description="Ray Train storage of the trials: <trials_dir>/<trial id>/ (a folder or a "
                                        "store URI).")
    log_dir: str = Field(description="Local folder of the trial-start log.")
    data_manifest: dict = Field(description="The tokenized data's manifest (trials on other nodes do not read it).")
    store: Any = Field(None, description=(
        "The object store's pyarrow filesystem, built on the driver (trial actors lack its credentials)."))


def run(tune_cfg: TuneSection, lora: LoraSection, setup: TrainSetup, data: Location | str | os.PathLike,
        out: Location | str | os.PathLike) -> Path:
    """Run (or restore) the sweep over the tokenized data in `data`; export the winner into out's folder.

    With out in an object store (a URI), Tune's experiment state, the trials' Ray Train checkpoints and the
    ledger of finished trials live in out/ray_tune there, so that a driver on another machine restores the sweep
    from them; else in out's folder. With data in the store, the trials' workers read it there. A sweep always
    restores what it finds (setup.resume is not needed) and runs on Ray (setup.local is refused)."""
    from ray import tune

    if setup.local:
        raise UserError("a sweep runs its trials on Ray Train workers; --local has no sweep: run it without --local")
    data, where = Location.of(data), Location.of(out)
    out = where.path
    out.mkdir(parents=True, exist_ok=True)
    data_manifest = read_manifest(data.path, kind="tokenized_dataset")
    if "validation" not in data_manifest.get("outputs", {}):
        raise DataError(f"{data.path}: the tokenized data has no validation split, and a sweep ranks trials on "
                        "eval_loss; set data.split.validation > 0 and rerun `loraforge tokenize`")
    check_state_api()
    train, state_uri = setup.train, where.child("ray_tune").uri
    state = state_uri or str(out)
    store_fs, state_path = storage.filesystem(state) if state_uri else (None, state)
    ctx = TrialContext(tune=tune_cfg, lora=lora, train=train, quant=setup.quant, model_dir=setup.model_dir,
                       model_name=setup.model_name, dtype=setup.dtype, data=data, trials_dir=f"{state}/trials",
                       log_dir=str(out), data_manifest=data_manifest, store=store_fs)
    key = sweep_key(ctx, data_manifest)
    name, experiments = f"sweep-{key}", f"{state}/experiments"
    tune_root = f"{state_path}/experiments"  # inside store_fs (None: the local filesystem)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"cpu": TRIAL_DRIVER_CPU})
    parent_run = mlflow_parent(train, out, name)
    ledger = out / "trials_finished.jsonl"
    if state_uri and storage.exists(f"{state}/{ledger.name}"):  # another driver's ledger: pull it
        storage.pull(f"{state}/{ledger.name}", out)
    callbacks = [progress_callback(tune_cfg.steps(train), ledger, f"{state}/{ledger.name}" if state_uri else None)
                 ] + mlflow_callbacks(train, out, parent_run)
    t0 = time.time()
    experiment, seal_key = f"{tune_root}/{name}" if store_fs else os.path.abspath(f"{tune_root}/{name}"), machine_key()
    if tune.Tuner.can_restore(experiment, storage_filesystem=store_fs):
        verify_tune(experiment, seal_key, store_fs)  # nothing unpickled from a folder this machine did not write
        print(f"[tune] restoring {name}: finished trials are kept, unfinished ones resume", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=store_fs)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(tune_cfg),
                           tune_config=tune_config(tune_cfg, train),
                           run_config=tune.RunConfig(name=name, storage_path=tune_root, storage_filesystem=store_fs,
                                                     verbose=0, failure_config=tune.FailureConfig(
                                                         max_failures=tune_cfg.max_failures),
                                                     callbacks=callbacks))
    before = live_placement_groups()
    try:
        grid = tuner.fit()
    finally:  # what this fit wrote (Ctrl-C included) is what the next run may restore
        seal_tune(experiment, seal_key, store_fs)
    wall = time.time() - t0
    expected = tune_cfg.num_samples * (grid_size(tune_cfg.space) if tune_cfg.searcher == "grid" else 1)
    # Tune returns normally after a SIGINT, marking the trials it cut short TERMINATED too; a trial that really
    # ended (ran to max_t, or was stopped by ASHA) has done=True in its last result, a failed one an error. A trial
    # restored from an earlier run may have lost its done flag (Tune restores the last logged result), so the
    # progress callback also keeps a ledger of the trials that ended for real.
    ended = {json.loads(line)["trial_id"] for line in ledger.read_text().splitlines()} if ledger.is_file() else set()
    finished = sum(1 for r in grid if r.error or (r.metrics or {}).get("done") or result_trial_id(r) in ended)
    if finished < expected:
        print(f"[tune] interrupted: {finished} of {expected} trials finished; the sweep's state is saved in "
              f"{experiments}/{name}. Run the same command again to resume it (finished trials are not rerun)",
              flush=True)
        raise SweepInterrupted(f"sweep {name} interrupted after {finished} of {expected} trials")
    left = wait_released(before)  # a finished sweep hands every CPU/GPU back before the next stage (not on Ctrl+C)
    if left:
        print(f"[tune] {len(left)} placement group(s) of this sweep still held {RELEASE_WAIT_S:.0f} s after it "
              f"ended: {', '.join(left)} (Ray Train's cleaner removes them once their controller is gone)", flush=True)
    trials = trial_table(grid, tune_cfg.steps(train))
    if not any(t["best_eval_loss"] is not None for t in trials):
        errors = "; ".join(f"{t['trial_id']}: {t['error']}" for t in trials if t["error"])
        raise RuntimeError(f"sweep {name}: no trial reported an eval_loss ({errors or 'no reports'})")
    winner = export_winner(trials, ctx, out, name, data_manifest, wall, parent_run)
    write_report(trials, winner, tune_cfg, train, out, name, wall)
    return out


def live_placement_groups() -> set[str]:
    """Ids of this job's placement groups that are not removed (pending, created, rescheduling): the trials' and
    their Ray Train workers' (other jobs on a shared cluster are not waited for). Through the State API, which a
    sweep needs anyway (check_state_api)."""
    import ray
    from ray.util.state import list_placement_groups

    job = ray.get_runtime_context().get_job_id()
    return {pg.placement_group_id for pg in list_placement_groups(
        address=ray.get_runtime_context().gcs_address, filters=[("creator_job_id", "=", job)], limit=10_000,
        timeout=20, raise_on_missing_output=False) if pg.state != "REMOVED"}


def wait_released(before: set[str], timeout: float | None = None) -> list[str]:
    """Wait until every placement group made since `before` (the trials' and their Ray Train workers') is
    removed, so what runs next in this driver gets their CPUs/GPUs; returns the ids still held at the timeout."""
    deadline = time.time() + (RELEASE_WAIT_S if timeout is None else timeout)
    while True:
        left = sorted(live_placement_groups() - before)
        if not left or time.time() >= deadline:
            return left
        time.sleep(0.5)


def check_state_api() -> None:
    """Refuse a cluster without the State API (no dashboard): Tune over Train V2 would hang on it."""
    import ray
    from ray.util.state import list_actors

    try:  # this cluster's address: without one the client looks for a Ray on this machine, and refuses when
        # several run here (a second local instance, a test cluster)
        list_actors(address=ray.get_runtime_context().gcs_address, limit=1, timeout=20,
                    raise_on_missing_output=False)
    except Exception as e:  # the State API client raises plain exceptions for an absent dashboard
        raise ClusterNotReady(
            f"this Ray cluster has no State API ({type(e).__name__}: {str(e).splitlines()[0][:200]}): Ray Tune over "
            "Ray Train V2 needs it to free the resources of trials ASHA stops. Start the cluster with the dashboard "
            "(`ray start --head --include-dashboard=true`), or let loraforge start a local one (no ray.address)"
        ) from None


def sweep_key(ctx: TrialContext, data_manifest: dict) -> str:
    """Content address of a sweep: the same sections, base and data give the same experiment (and a restore)."""
    doc = {"ctx": ctx.model_dump(exclude={"trials_dir", "data", "log_dir", "data_manifest", "store"}),
           "data": data_manifest.get("inputs") or data_manifest.get("source"),
           "outputs": data_manifest.get("outputs")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:10]


POINT = "point"  # a shuffled grid is one grid_search over whole points, under this key


def param_space(cfg: TuneSection) -> dict[str, Any]:
    """The space as Tune's sampling objects: grid_search for `grid` (over whole points in a seeded shuffled order,
    unless tune.grid_order=as_written), choice / loguniform otherwise."""
    import random

    from ray import tune

    if cfg.searcher == "grid" and cfg.grid_order == "shuffled":
        points = grid_points(cfg.space)
        random.Random(cfg.seed).shuffle(points)
        return {POINT: tune.grid_search(points)}
    space = {}
    for name, values in cfg.space.axes().items():
        if isinstance(values, LogRange):
            space[name] = tune.loguniform(values.low, values.high)
        elif cfg.searcher == "grid":
            space[name] = tune.grid_search(list(values))
        else:
            space[name] = tune.choice(list(values))
    return space


def tune_config(cfg: TuneSection, train: TrainSection):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    limit = concurrency(cfg, train)
    if cfg.searcher == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search = ConcurrencyLimiter(OptunaSearch(seed=cfg.seed), max_concurrent=limit)
    else:  # Tune ignores max_concurrent_trials for a generator it did not build: the limit goes in here
        search = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=limit)
    scheduler = None
    if cfg.asha:
        scheduler = ASHAScheduler(time_attr="step", max_t=cfg.asha.max_t, grace_period=cfg.asha.grace_period,
                                  reduction_factor=cfg.asha.reduction_factor)
    return tune.TuneConfig(metric=cfg.metric, mode="min", search_alg=search, scheduler=scheduler,
                           num_samples=cfg.num_samples)


def concurrency(cfg: TuneSection, train: TrainSection) -> int:
    """Trials at once: the configured number, else what the cluster's CPUs (GPUs) fit by one trial's workers."""
    import ray

    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    res = ray.cluster_resources()
    if train.use_gpu:
        fit = int(res.get("GPU", 0) // train.num_workers)
    else:
        fit = int(res.get("CPU", 0) // (train.num_workers * train.cpus_per_worker + TRIAL_DRIVER_CPU))
    if fit < 1:
        raise ClusterNotReady(f"one trial needs {train.num_workers} workers × "
                              f"{'1 GPU' if train.use_gpu else f'{train.cpus_per_worker} CPU'}; the cluster has "
                              f"{res.get('GPU' if train.use_gpu else 'CPU', 0)}: lower train.num_workers or "
                              "train.cpus_per_worker")
    return fit


def run_trial(point: dict[str, Any], ctx: TrialContext) -> None:
    """One trial: the SFT worker loop on its own TorchTrainer, reports forwarded to Tune. Its Train run lives
    under trials/<trial id>/ and is kept, so a trial Tune restarts resumes from its last checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    lora, train = apply_trial(flat(point), ctx.tune, ctx.lora, ctx.train)
    job = WorkerJob(model_dir=ctx.model_dir, model_name=ctx.model_name, dtype=ctx.dtype, quant=ctx.quant,
                    train=train, lora=lora, storage=f"{ctx.trials_dir}/{trial_id}", data=ctx.data)
    Path(ctx.log_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(ctx.log_dir) / "trial_starts.log", "a") as log:  # who ran when (resume tests)
        log.write(json.dumps({"trial_id": trial_id, "time": time.time()}) + "\n")
    fit_on_ray(sft.train_loop_per_worker, job, ctx.data_manifest, trial_id,
               callbacks=[TuneReportCallback()], fresh=False, store_fs=ctx.store)


def flat(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's point as axis → value (a shuffled grid's trials carry it under POINT)."""
    config = dict(config)
    return {**config.pop(POINT), **config} if isinstance(config.get(POINT), dict) else config


def result_trial_id(result) -> str:
    """A Tune Result's trial id: from its last metrics, or from its folder name (<trainable>_<trial id>_...)."""
    return (result.metrics or {}).get("trial_id") or Path(result.path).name.split("_")[1]


def trial_table(grid, max_t: int) -> list[dict[str, Any]]:
    """One row per trial from every report it made (Tune's metric history, not only the last report)."""
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        reports = [] if df is None or "eval_loss" not in df else [
            {"step": int(r["step"]), "eval_loss": float(r["eval_loss"]), "checkpoint_path": r.get("checkpoint_path")}
            for r in df.to_dict("records") if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"])
            and r["eval_loss"] < NO_EVAL]
        steps = max((r["step"] for r in reports), default=0)
        best = min(reports, key=lambda r: r["eval_loss"], default=None)
        status = ("error" if result.error else "completed" if steps >= max_t else "stopped early")
        rows.append({"trial_id": result_trial_id(result),
                     "config": flat(result.config), "label": trial_label(flat(result.config)), "status": status,
                     "steps": steps, "final_eval_loss": reports[-1]["eval_loss"] if reports else None,
                     "best_eval_loss": best["eval_loss"] if best else None, "best_step": best["step"] if best else None,
                     "reports": reports, "error": str(result.error).splitlines()[0][:300] if result.error else None})
    return rows


def export_winner(trials: list[dict], ctx: TrialContext, out: Path, name: str, data_manifest: dict, wall: float,
                  parent_run: str | None) -> dict[str, Any]:
    """The best report (lowest eval_loss) of any trial whose checkpoint still exists, exported into out/winner."""
    from ray.train import Checkpoint

    dest = out / "winner"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    candidates = sorted(((r["eval_loss"], t, r) for t in trials for r in t["reports"] if r["checkpoint_path"]),
                        key=lambda c: c[0])
    best_reported = candidates[0][0] if candidates else None
    for loss, trial, report in candidates:
        try:
            with Checkpoint(report["checkpoint_path"], filesystem=ctx.store).as_directory() as d:
                state = copy_adapter(Path(d), dest)
        except (FileNotFoundError, OSError):  # deleted by keep_checkpoints: take the next best that exists
            continue
        break
    else:
        raise RuntimeError(f"sweep {name}: no trial checkpoint is left to export")
    lora, train = apply_trial(trial["config"], ctx.tune, ctx.lora, ctx.train)
    job = WorkerJob(model_dir=ctx.model_dir, model_name=ctx.model_name, dtype=ctx.dtype, quant=ctx.quant,
                    train=train, lora=lora, storage=f"{ctx.trials_dir}/{trial['trial_id']}", data=ctx.data)
    state["selected_step"] = report["step"]
    winner = {"trial_id": trial["trial_id"], "label": trial["label"], "step": report["step"], "eval_loss": loss,
              "best_reported_eval_loss": best_reported, "checkpoint": report["checkpoint_path"]}
    lineage = {"sweep": {"name": name, "folder": f"{ctx.trials_dir.rsplit('/', 1)[0]}/experiments/{name}",
                         "wall_s": round(wall, 1),
                         "mlflow_parent_run": parent_run, "winner": winner,
                         "trials": [{k: t[k] for k in ("trial_id", "config", "status", "steps", "final_eval_loss",
                                                       "best_eval_loss", "best_step")} for t in trials]},
               "trial": {"id": trial["trial_id"], "point": trial["config"]}}
    finish_stage(dest, job, kind="lora_adapter", state=state, data_manifest=data_manifest,
                 title=f"Sweep winner {trial['label']}",
                 config={"lora": lora.model_dump(), "quant": ctx.quant.model_dump(), "train": train.model_dump(),
                         "dtype": ctx.dtype, "tune": ctx.tune.model_dump(mode="json")}, lineage=lineage)
    return winner


def write_report(trials: list[dict], winner: dict, cfg: TuneSection, train: TrainSection, out: Path, name: str,
                 wall: float) -> None:
    """sweep_results.csv, sweep_trials.json (every trial's reports), sweep_report.md and the two plots."""
    max_t = cfg.steps(train)
    (out / "sweep_trials.json").write_text(json.dumps({"name": name, "winner": winner, "trials": trials}, indent=1))
    keys = ["trial_id", "label", "status", "steps", "final_eval_loss", "best_eval_loss", "best_step", "error"]
    axes = sorted({k for t in trials for k in t["config"]})
    with open(out / "sweep_results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys + axes)
        w.writeheader()
        for t in trials:
            w.writerow({**{k: t[k] for k in keys}, **t["config"]})
    spent = sum(t["steps"] for t in trials)
    ranked = sorted(trials, key=lambda t: (t["best_eval_loss"] is None, t["best_eval_loss"] or 0))
    lines = [f"# Sweep {name}", "",
             f"Winner: trial `{winner['trial_id']}` ({winner['label']}) at step {winner['step']}, eval_loss "
             f"{winner['eval_loss']:.4f}.", "",
             f"{len(trials)} trials ({cfg.searcher} search, "
             + (f"ASHA grace {cfg.asha.grace_period}, reduction {cfg.asha.reduction_factor:g}, " if cfg.asha else "")
             + f"max_t {max_t}); {sum(t['status'] == 'stopped early' for t in trials)} stopped early, "
             f"{sum(t['status'] == 'error' for t in trials)} failed; {spent} trial-steps of the {len(trials) * max_t} "
             f"a full run of every trial would take ({spent / max(1, len(trials) * max_t):.2f}); wall {wall:.0f} s.",
             "", "| trial | config | status | steps | final eval_loss | best eval_loss (step) |",
             "|---|---|---|---|---|---|"]
    for t in ranked:
        best = f"{t['best_eval_loss']:.4f} ({t['best_step']})" if t["best_eval_loss"] is not None else "-"
        final = f"{t['final_eval_loss']:.4f}" if t["final_eval_loss"] is not None else "-"
        lines.append(f"| {t['trial_id']} | {t['label']} | {t['status']} | {t['steps']} | {final} | {best} |")
    lines += ["", "![eval loss per trial](sweep_curves.png)", "", "![rank × learning rate](sweep_rank_lr.png)", ""]
    if grid_size(cfg.space) and cfg.searcher == "grid":
        lines.insert(4, f"Grid of {grid_size(cfg.space)} points × {cfg.num_samples}.")
    (out / "sweep_report.md").write_text("\n".join(lines))
    plot_sweep(trials, winner, out)


def plot_sweep(trials: list[dict], winner: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        if not t["reports"]:
            continue
        xs, ys = [r["step"] for r in t["reports"]], [r["eval_loss"] for r in t["reports"]]
        line, = ax.plot(xs, ys, lw=2.5 if t["trial_id"] == winner["trial_id"] else 1.2, label=t["label"])
        if t["status"] != "completed":
            ax.plot(xs[-1], ys[-1], "x", color=line.get_color(), ms=9, mew=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval_loss")
    ax.set_title("Validation loss per trial (x: stopped by ASHA or failed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sweep_curves.png", dpi=110)
    plt.close(fig)

    done = [t for t in trials if t["best_eval_loss"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    lr = [t["config"].get("lr", float("nan")) for t in done]
    r = [t["config"].get("r", float("nan")) for t in done]
    sc = ax.scatter(lr, r, c=[t["best_eval_loss"] for t in done], cmap="viridis_r", s=70, edgecolors="k")
    fig.colorbar(sc, ax=ax, label="best eval_loss")
    if any(isinstance(x, float) and x > 0 for x in lr):
        ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("LoRA rank")
    ax.set_title("Rank × learning rate")
    fig.tight_layout()
    fig.savefig(out / "sweep_rank_lr.png", dpi=110)
    plt.close(fig)


def mlflow_parent(train: TrainSection, out: Path, name: str) -> str | None:
    """The sweep's parent MLflow run (the same one when a sweep is restored); None when tracking is off."""
    uri = tracking_uri(train, out)
    if uri == "off":
        return None
    import mlflow

    marker = out / "experiments" / f"{name}.mlflow_parent"
    if marker.is_file():
        return marker.read_text().strip()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name("loraforge-sweep") is None:
        mlflow.create_experiment("loraforge-sweep", artifact_location=str(out / "mlartifacts"))
    client = mlflow.MlflowClient(uri)
    run = client.create_run(mlflow.get_experiment_by_name("loraforge-sweep").experiment_id, run_name=name)
    client.set_terminated(run.info.run_id)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(run.info.run_id)
    return run.info.run_id


def tracking_uri(train: TrainSection, out: Path) -> str:
    """train.tracking_uri, else the sqlite store in the sweep folder (where the winner's own run lands too)."""
    return train.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"


def mlflow_callbacks(train: TrainSection, out: Path, parent_run: str | None) -> list:
    """Each trial as an MLflow run nested under the sweep's parent run (params, every report's metrics)."""
    if parent_run is None:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=tracking_uri(train, out),
                                 experiment_name="loraforge-sweep", tags={"mlflow.parentRunId": parent_run})]


def progress_callback(max_t: int, ledger: Path, ledger_uri: str | None = None):
    """One line per report and per finished trial, instead of Tune's tables; trials that ended for real (not cut
    short by an interrupt) are appended to the ledger (and the ledger pushed to ledger_uri, when given)."""
    from ray.tune import Callback

    class Progress(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            print(f"[tune] {trial.trial_id} ({trial_label(flat(trial.config))}) step {result.get('step')} "
                  f"eval_loss {result.get('eval_loss', float('nan')):.4f}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            step = (trial.last_result or {}).get("step", 0)
            why = "finished" if step >= max_t else f"stopped by ASHA at step {step}"
            print(f"[tune] {trial.trial_id} {why}", flush=True)
            if (trial.last_result or {}).get("done"):
                with open(ledger, "a") as f:
                    f.write(json.dumps({"trial_id": trial.trial_id, "step": step}) + "\n")
                if ledger_uri:
                    storage.push(ledger, ledger_uri)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[tune] {trial.trial_id} failed (Tune retries it up to tune.max_failures times)", flush=True)

    return Progress()
