"""The driver half SFT and DPO share: build and fit the TorchTrainer over the data stage's splits, export the
best checkpoint's adapter, and finish the stage (loss plot, adapter health, MLflow run, manifest).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipelines.artifacts import storage
from pipelines.artifacts.manifest import hash_path, read_manifest, write_manifest
from pipelines.schema import UserError, redact
from pipelines.train import worker
from pipelines.train.config import TrainSetup, WorkerJob, check_combination


def adapter_health(adapter_dir: str | os.PathLike, model_dir: str) -> dict[str, Any]:
    """Per-layer ||scale·B·A|| / ||W|| from the saved adapter and the base weights (safetensors only).

    Mean and max are over the modules whose base weight was found (`matched_modules` of `adapter_modules`); when
    none is found (base weights not in safetensors, or saved under other names) they are None: not measured,
    rather than a 0.0 that reads as "the adapter did not move". Training already applied the adapter to this base,
    so no match means the names differ, not that the adapter belongs elsewhere; it is reported, not raised."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    conf = json.loads(Path(adapter_dir, "adapter_config.json").read_text())
    r, alpha = conf["r"], conf["lora_alpha"]
    scale = alpha / (r ** 0.5) if conf.get("use_rslora") else alpha / r
    lora = load_file(str(Path(adapter_dir, "adapter_model.safetensors")))
    wanted = {}
    for key, a in lora.items():
        if ".lora_A." in key:
            module = key.split("base_model.model.", 1)[-1].split(".lora_A.")[0]
            wanted[module + ".weight"] = (module, a, lora[key.replace(".lora_A.", ".lora_B.")])
    ratios = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for wkey in set(fh.keys()) & set(wanted):
                module, a, b = wanted[wkey]
                w = fh.get_tensor(wkey).float()
                ratios[module] = float((scale * (b.float() @ a.float())).norm() / (w.norm() + 1e-12))
    vals = list(ratios.values())
    return {"delta_over_weight": ratios, "delta_over_weight_mean": sum(vals) / len(vals) if vals else None,
            "delta_over_weight_max": max(vals) if vals else None, "matched_modules": len(ratios),
            "adapter_modules": len(wanted)}


def plot_curves(series: dict[str, list[float]], path: Path, title: str) -> None:
    """One PNG with one line per named series (x = step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in series.items():
        if ys:
            xs = [x for x, _ in ys] if isinstance(ys[0], (list, tuple)) else range(1, len(ys) + 1)
            ax.plot(list(xs), [y[1] if isinstance(y, (list, tuple)) else y for y in ys], label=name)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_to_mlflow(uri: str, experiment: str, params: dict[str, Any], history: dict[str, list],
                  artifacts: Path) -> str:
    """Params, per-step metrics (from the recorded history) and the adapter folder, as one MLflow run."""
    import mlflow

    params = redact(params)  # a credential in a config value (tracking_uri's password) never becomes a param
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:  # artifacts beside the store, not in the CWD
        mlflow.create_experiment(experiment, artifact_location=str(artifacts.parent / "mlartifacts"))
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        for name, values in history.items():
            for i, v in enumerate(values):
                step, value = (v[0], v[1]) if isinstance(v, (list, tuple)) else (i + 1, v)
                mlflow.log_metric(name, float(value), step=int(step))
        mlflow.log_artifacts(str(artifacts), artifact_path="adapter")
        return run.info.run_id


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "train_state.json", "README.md",
                 "probe_logits.safetensors")


def run_stage(loop, setup: TrainSetup, job: WorkerJob, out: Path, *, name: str, title: str, data_kind: str,
              config: dict[str, Any], extra_series: dict[str, str] | None = None,
              lineage: dict[str, Any] | None = None) -> Path:
    """The driver half of a training stage, the same for SFT and DPO: fit `loop` over the data stage's splits in
    job.data (on Ray Train workers, or in this process when setup.local), export the best checkpoint's adapter
    into `out`, and finish the stage (plot, health, MLflow, manifest). setup.resume: continue the Ray Train run
    an interrupted attempt left under job.storage from its last checkpoint, instead of starting afresh;
    extra_series: plot label → key of the loop's extra history (DPO's reward accuracy); lineage: entries added to
    the manifest's lineage (DPO's parent adapter)."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_manifest = read_manifest(job.data.path, kind=data_kind)
    fit = fit_local if setup.local else fit_on_ray
    result = fit(loop, job, data_manifest, name, fresh=not setup.resume)
    state = export_adapter(result, out)
    finish_stage(out, job, kind="lora_adapter", state=state, data_manifest=data_manifest, title=title,
                 config=config, extra_series={label: state.get("extra_history", {}).get(key, [])
                                              for label, key in (extra_series or {}).items()}, lineage=lineage)
    return out


def fit_on_ray(loop, job: WorkerJob, data_manifest: dict, name: str, *, callbacks: list | None = None,
               fresh: bool = True, store_fs=None):
    """Build the TorchTrainer over the data stage's splits (job.data) and run it; each worker gets `{"job": job}`.
    callbacks: Ray Train callbacks (a sweep trial's TuneReportCallback); fresh=False keeps an earlier run under
    the same storage and name, which Ray Train then resumes from its last checkpoint (a restored sweep trial).
    store_fs: the object store's pyarrow filesystem, built where the credentials and endpoint are (a sweep
    trial runs in an actor whose environment has neither); default: built here from this process's."""
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = job.train
    check_combination(job.quant, train)
    # A fresh stage run starts from scratch: Ray Train would otherwise resume an older run found under the same
    # storage path and name. Resumption after a worker dies happens inside this fit (FailureConfig).
    storage_fs, storage_path = None, job.storage
    if storage.is_uri(job.storage):  # an object store (s3://...): Ray Train writes its checkpoints there directly
        if fresh:
            storage.delete(job.storage)
        storage_fs, storage_path = storage.filesystem(job.storage)
        storage_fs = store_fs or storage_fs
    else:
        if fresh:
            shutil.rmtree(job.storage, ignore_errors=True)
        Path(job.storage).mkdir(parents=True, exist_ok=True)

    datasets = {}
    # num_cpus=0: the trainer workers hold the CPUs, and a read task waiting for a whole one would deadlock the
    # stream feeding them (the stream waits on 1 CPU while the workers hold them all); the reads overlap the
    # workers instead. Ray Data's V2 parquet source adds a file-listing task that always asks for 1 CPU and takes
    # no remote args, so the workers can starve it; the V1 source reads with no listing task.
    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    read_fs, read_root = job.data.reader(store_fs)
    try:
        for split in ("train", "validation"):
            rel = data_manifest.get("outputs", {}).get(split)
            if rel:
                datasets[split] = ray.data.read_parquet(f"{read_root}/{rel}", filesystem=read_fs, num_cpus=0)
    finally:
        context.use_datasource_v2 = v2
    has_val = "validation" in datasets
    trainer = TorchTrainer(
        loop,
        # the store's filesystem travels with the job: a worker copies what it reads from the store (DPO's SFT
        # adapter) with the driver's endpoint and credentials, which its own environment may not have
        train_loop_config={"job": job, "store_fs": store_fs or read_fs or storage_fs},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker},
                                     placement_strategy=train.placement_strategy),
        datasets=datasets,
        # preserve_order: the same data gives the same batches run after run (reproducible losses, exact resume)
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs, callbacks=callbacks or None,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=train.keep_checkpoints,
                checkpoint_score_attribute="eval_loss" if has_val else None,
                checkpoint_score_order="min")),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name} finished without a checkpoint: {result.error}")
    return result


def fit_local(loop, job: WorkerJob, data_manifest: dict, name: str, *, fresh: bool = True):
    """The same worker loop in this process, as one worker on one device (cuda when there is one), without Ray:
    data read from the data stage's parquet splits in order, checkpoints as folders under `job.storage`/name, a
    result shaped as Ray Train's. train.num_workers is not used (one rank)."""
    train = job.train
    check_combination(job.quant, train)
    if storage.is_uri(job.storage) or job.data.uri:
        raise UserError("--local trains from and into local folders; this run's data or output is in an object "
                        "store: run without --local, or set output_dir to a local folder")
    if train.fail_once_at_step:
        raise UserError("train.fail_once_at_step is a drill of Ray Train's worker restart; --local has no worker "
                        "to restart: unset it or run without --local")
    root = Path(job.storage) / name
    if fresh:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    outputs = data_manifest.get("outputs", {})
    data = {split: job.data.path / outputs[split] for split in ("train", "validation") if outputs.get(split)}
    here = worker.LocalWorker(data, root, train.keep_checkpoints)
    print(f"[{name}] local: one worker on {here.device}, no Ray", flush=True)
    with here.session():
        loop({"job": job, "store_fs": None})
    result = here.result()
    if result.checkpoint is None:
        raise RuntimeError(f"{name} finished without a checkpoint")
    return result


def export_adapter(result, out: Path) -> dict[str, Any]:
    """Copy the best checkpoint's adapter (lowest validation loss, else the last) into out; return the last
    checkpoint's training state, which holds the whole history."""
    with result.checkpoint.as_directory() as last:
        state = checkpoint_state(Path(last))
    best = result.checkpoint
    if result.best_checkpoints and any("eval_loss" in m for _, m in result.best_checkpoints):
        best = min(result.best_checkpoints, key=lambda cm: cm[1].get("eval_loss", float("inf")))[0]
    with best.as_directory() as d:
        state["selected_step"] = copy_adapter(Path(d), out)["step"]
    return state


def copy_adapter(checkpoint_dir: Path, out: Path) -> dict[str, Any]:
    """Copy a training checkpoint's adapter and tokenizer files into out; return that checkpoint's state."""
    for f in checkpoint_dir.iterdir():
        if f.name in ADAPTER_FILES or f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy2(f, out / f.name)
    return checkpoint_state(checkpoint_dir)


def checkpoint_state(checkpoint_dir: Path) -> dict[str, Any]:
    """A checkpoint's training state (step, histories) with the worker's static facts under "static"."""
    state = json.loads((checkpoint_dir / "train_state.json").read_text())
    state["static"] = json.loads((checkpoint_dir / "static.json").read_text())
    return state


def finish_stage(out: Path, job: WorkerJob, *, kind: str, state: dict, data_manifest: dict, title: str,
                 config: dict, extra_series: dict | None = None, lineage: dict[str, Any] | None = None) -> None:
    """Plot, health, MLflow, manifest: the same ending for SFT, DPO and a sweep's winner."""
    model_dir, model_id = job.model_dir, job.model_name

    series = {"train loss": state["loss_history"], "validation loss": state["eval_history"]}
    plot_curves({**series, **(extra_series or {})}, out / "loss.png", f"{title} loss")
    metrics = {"steps": state["step"], "selected_step": state.get("selected_step"),
               "loss_first": state["loss_history"][0], "loss_last": state["loss_history"][-1],
               "loss_history": state["loss_history"], "eval_history": state["eval_history"],
               "best_eval_loss": None if state["best_eval"] == float("inf") else state["best_eval"],
               "stopped_early": state.get("stopped_early", False), "throughput": state.get("throughput"),
               "zero_grad_share": state.get("zero_grad_share"), "engine": state.get("engine"),
               "memory": state.get("memory"),
               **{f"{k}_history": v for k, v in state.get("extra_history", {}).items()},
               "eval_extra_history": state.get("eval_extra_history", {}),
               **state.get("static", {}), **adapter_health(out, model_dir)}
    uri = job.train.tracking_uri or f"sqlite:///{out.parent / 'mlflow.db'}"  # one store per run
    run_id = None
    if uri != "off":
        run_id = log_to_mlflow(uri, f"loraforge-{kind}", {**_flat(config)},
                               {"loss": state["loss_history"], "eval_loss": state["eval_history"],
                                **state.get("extra_history", {})}, out)
    write_manifest(out, kind=kind, inputs={"data": str(job.data.path), "base_model": model_dir}, config=config,
                   metrics=metrics,
                   extra={"lineage": {"base_model": model_id or model_dir, "base_model_hash": hash_path(model_dir),
                                      "data_hash": data_manifest.get("inputs", {}).get("train", {}).get("hash")
                                      or data_manifest.get("source", {}).get("hash"),
                                      "mlflow": {"tracking_uri": uri, "run_id": run_id}, **(lineage or {})}})


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
