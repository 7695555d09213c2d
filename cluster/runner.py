"""Each stage's call: on which Ray instance, on whose output, and every hand-off between stages (this run's
adapter, evaluate → gate → registry, publishing a stage's output). cluster.graph orders them for `run`; the CLI
only parses arguments.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console

from cluster.config import RunConfig
from pipelines.artifacts import storage
from pipelines.artifacts.manifest import read_manifest
from pipelines.artifacts.models import resolve_model
from pipelines.artifacts.registry import Registry, lineage_from_manifest
from pipelines.data import curate
from pipelines.data import tokenize as data
from pipelines.eval import evaluate
from pipelines.eval import gate as _gate
from pipelines.eval.gate import GateDecision
from pipelines.export import merge, quantize
from pipelines.schema import MissingInput
from pipelines.train import dpo, sft
from tune import sweep

console = Console(stderr=True, soft_wrap=True)  # a path is never broken over two lines

# Environment every Ray worker and Serve replica gets. vLLM binds its internal queues to the machine's external
# address unless told otherwise (STACK_NOTES); tokenizers' own thread pool fights Ray's workers for 2 cores.
# No DS_ACCELERATOR here: each training worker picks DeepSpeed's accelerator from the resources it holds
# (pipelines.train.engine.select_accelerator), so one CPU setting cannot leak onto GPU workers.
WORKER_ENV = {"VLLM_HOST_IP": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


_started_here = False


def init_ray(cfg: RunConfig) -> None:
    """Join the configured or submitting cluster, or start a local instance: with the dashboard (Ray's State
    API) unless ray.include_dashboard is false, and always when the config has a tune: section (a sweep needs
    the State API, and whichever stage starts Ray first decides)."""
    global _started_here
    import ray

    if ray.is_initialized():
        return
    _started_here = True
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    if not _has_cuda():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cfg.serve.kv_cache_gb))))
    for k, v in env.items():
        os.environ.setdefault(k, v)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:  # under `ray job submit`, RAY_ADDRESS points at the cluster the job runs on
        ray.init(address=address, runtime_env={"env_vars": env})
    else:  # address="local": a new instance of our own, even when other Ray instances run on this machine (with
        # no address Ray joins the newest of them, and refuses num_cpus for it: a traceback, not a run)
        dashboard = cfg.ray.include_dashboard or cfg.tune is not None
        port = free_port() if dashboard else None
        if port:  # the State API of *this* instance for its workers: Ray Train's placement-group cleaner asks it
            # with no address, and beside a second Ray instance on the machine that fails ("Found multiple active
            # Ray instances"), so a stopped trial's placement group was never removed and the sweep hung
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=dashboard,
                 **({"dashboard_port": port} if port else {}), runtime_env={"env_vars": env})


def free_port() -> int:
    """A TCP port free on this machine now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish() -> None:
    """Stop the Ray instance this process started (not one it joined), so no worker log lands after our output."""
    global _started_here
    if _started_here:
        import ray

        ray.shutdown()
        _started_here = False


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def stage_model(cfg: RunConfig) -> str:
    with console.status(f"[bold]model[/]: resolving {cfg.model.name}"):
        t0 = time.time()
        path = resolve_model(cfg.model)
    console.print(f"[bold]model[/]: {path} ({time.time() - t0:.0f} s)")
    return path


def stage_data(cfg: RunConfig, model_dir: str) -> Path:
    init_ray(cfg)
    t0 = time.time()
    out = data.run(cfg.data, model_dir, cfg.stage_dir("data"))

    m = read_manifest(out)["metrics"]
    console.print(f"[bold]data[/]: {m['rows_in']} rows in, {m['rows_kept']} kept, {m['rows_rejected']} rejected "
                  f"{m['rejected_by_reason'] or ''}; {m['tokens']} tokens ({time.time() - t0:.0f} s)")
    return out


def stage_curate(cfg: RunConfig, model_dir: str) -> Path:
    init_ray(cfg)
    t0 = time.time()
    out = curate.run(cfg.data, cfg.stage_dir("curated"), model_dir=model_dir)
    m = read_manifest(out)["metrics"]
    console.print(f"[bold]curate[/]: {m['rows_in']} rows in, {m['rows_kept']} kept, {m['rows_rejected']} rejected "
                  f"({time.time() - t0:.0f} s)")
    return out


def stage_sft(cfg: RunConfig, model_dir: str, data_dir: Path, *, resume: bool = False, local: bool = False) -> Path:
    """SFT on this run's tokenized data; resume=True continues an interrupted run from its last checkpoint;
    local=True runs the loop in this process on one device, without Ray."""
    if not local:
        init_ray(cfg)
    t0 = time.time()
    out = sft.run(cfg.lora, cfg.train, model_dir, data_dir, cfg.stage_dir("sft"), dtype=cfg.model.dtype,
                  quant=cfg.quant, model_id=cfg.model.name, resume=resume, storage=cfg.train_storage("sft"),
                  data_uri=None if local else _in_store(cfg, "data"), local=local)

    m = read_manifest(out)["metrics"]
    console.print(f"[bold]sft[/]: {m['steps']} steps, loss {m['loss_first']:.3f} → {m['loss_last']:.3f}, "
                  f"{m['trainable_params']:,} LoRA parameters ({time.time() - t0:.0f} s); curve in {out / 'loss.png'}")
    return out


def _in_store(cfg: RunConfig, stage: str) -> str | None:
    """A stage's folder in the object store, when output_dir is one and the graph pushed that stage there (a stage
    command run alone works in the mirror only)."""
    remote = cfg.remote_run()
    return f"{remote}/{stage}" if remote and storage.exists(f"{remote}/{stage}/manifest.json") else None


def stage_dpo(cfg: RunConfig, model_dir: str, sft_dir: Path, *, resume: bool = False) -> Path:
    init_ray(cfg)
    t0 = time.time()
    remote, sft_uri = cfg.remote_run(), _in_store(cfg, "sft")  # a run in a store: every node reads from there
    data = dpo.prepare(cfg.dpo, model_dir, str(sft_dir), cfg.stage_dir("dpo_data"), dtype=cfg.model.dtype,
                       quant=cfg.quant, sft_uri=sft_uri, model_name=cfg.model.name)
    if remote:
        storage.push(data, f"{remote}/dpo_data")
    m = read_manifest(data)["metrics"]
    console.print(f"[bold]dpo data[/]: {m['rows_in']} pairs in, {m['train']} train, {m['validation']} held out, "
                  f"{m['rows_rejected']} rejected {m['rejected_by_reason'] or ''}")
    out = dpo.run(cfg.dpo, cfg.train, model_dir, sft_dir, data, cfg.stage_dir("dpo"), dtype=cfg.model.dtype,
                  quant=cfg.quant, model_id=cfg.model.name, resume=resume, storage=cfg.train_storage("dpo"),
                  data_uri=f"{remote}/dpo_data" if remote else None, sft_uri=sft_uri)
    m = read_manifest(out)["metrics"]
    acc = m.get("reward_accuracy_history") or [float("nan")]
    console.print(f"[bold]dpo[/]: {m['steps']} steps, loss {m['loss_first']:.3f} → {m['loss_last']:.3f}, reward "
                  f"accuracy {acc[0]:.2f} → {acc[-1]:.2f} ({time.time() - t0:.0f} s)")
    return out


def stage_tune(cfg: RunConfig, model_dir: str, data_dir: Path) -> Path:
    """The sweep (tune: section, checked by preflight's "tune") over this run's tokenized data; its winner lands
    in <run>/tune/winner. With output_dir in an object store, Tune's state, the trials' checkpoints and the ledger
    of finished trials live in <run>/tune/ray_tune there (a driver elsewhere restores the sweep from them)."""
    init_ray(cfg)
    t0 = time.time()
    remote = cfg.remote_run()
    out = sweep.run(cfg.tune, cfg.lora, cfg.train, model_dir, data_dir, cfg.stage_dir("tune"),
                    dtype=cfg.model.dtype, quant=cfg.quant, model_id=cfg.model.name,
                    state_uri=f"{remote}/tune/ray_tune" if remote else None, data_uri=_in_store(cfg, "data"))
    winner = read_manifest(out / "winner")["lineage"]["sweep"]
    trials = winner["trials"]
    console.print(f"[bold]tune[/]: {len(trials)} trials, {sum(t['status'] == 'stopped early' for t in trials)} "
                  f"stopped early; winner {winner['winner']['label']} eval_loss {winner['winner']['eval_loss']:.4f} "
                  f"at step {winner['winner']['step']} ({time.time() - t0:.0f} s); report in "
                  f"{out / 'sweep_report.md'}")
    return out


def stage_quantize(cfg: RunConfig, source: str, out: Path | None = None) -> Path:
    """Quantize `source` in a Ray task (on a GPU node when quantize.num_gpus > 0); recovery measured inside."""
    import ray

    q = cfg.quantize
    curated = cfg.stage_dir("data") / "curated"
    # Calibration rows are meant to be training-like (QuantizeSection.calibration_path), so training data is the
    # default there; recovery must be measured on held-out rows and never falls back to training rows.
    calibration = q.calibration_path or (str(curated / "train") if (curated / "train").is_dir()
                                         else cfg.data.train_path)
    if not calibration:
        raise MissingInput("quantize: no calibration rows: set quantize.calibration_path or data.train_path")
    evaluation = q.eval_path
    if not evaluation:
        test_rows = None
        if (curated / "manifest.json").is_file():
            test_rows = int(read_manifest(curated).get("metrics", {}).get("split_rows", {}).get("test") or 0)
        if not test_rows:
            found = f"{curated / 'test'} holds no rows" if test_rows == 0 else f"no finished data stage in {curated}"
            raise MissingInput(
                f"quantize: no held-out rows to measure recovery on ({found}). Set quantize.eval_path=FILE, or "
                "produce a test split (data.split.test > 0, then `loraforge tokenize`). Training rows are not "
                "used: they would measure memorisation, not what quantization kept")
        evaluation = str(curated / "test")
    out = Path(out or cfg.stage_dir(f"quantize-{q.method}")).resolve()
    init_ray(cfg)
    t0 = time.time()
    task = ray.remote(num_cpus=q.num_cpus, num_gpus=q.num_gpus)(quantize.run)
    with console.status(f"[bold]quantize[/]: {q.method} of {source}"):
        path = ray.get(task.remote(q, source, str(out), calibration=_absolute(calibration),
                                   evaluation=_absolute(evaluation)))
    report = json.loads((Path(path) / "quantize.json").read_text())
    console.print(f"[bold]quantize[/]: {report['scheme']}: perplexity x{report['perplexity_ratio']:.3f}, size "
                  f"x{report['size_ratio']:.2f} of the source ({time.time() - t0:.0f} s)")
    return Path(path)


def stage_evaluate(cfg: RunConfig, model_dir: str, adapters: dict[str, str], *, gate: bool = False,
                   force: bool = False) -> tuple[Path, GateDecision | None]:
    """Evaluate base, few-shot base and adapters; with `gate`, apply it to the first adapter, which publishes
    it to the registry and moves the gate's alias when it passes (or is forced)."""
    init_ray(cfg)
    t0 = time.time()
    with console.status(f"[bold]evaluate[/]: base, few-shot base and {len(adapters)} adapter(s) on "
                        f"{cfg.eval.max_samples} held-out rows ({cfg.eval.backend})"):
        out = evaluate.run(cfg.eval_section(), model_dir, adapters, cfg.stage_dir("evaluate"))
    variants = json.loads((Path(out) / "eval.json").read_text())["variants"]
    console.print("[bold]evaluate[/]: " + ", ".join(f"{v} ROUGE-L {s['rougeL']:.3f} exact {s['exact_match']:.2f}"
                                                     for v, s in variants.items())
                  + f" ({time.time() - t0:.0f} s); report in {Path(out) / 'eval_report.md'}")
    return out, (stage_gate(cfg, adapters, force=force) if gate else None)


def stage_gate(cfg: RunConfig, adapters: dict[str, str], *, force: bool = False) -> GateDecision:
    """The gate over this run's evaluation, for the first adapter: a pass (or force) publishes it to the registry
    under registry.name (default the run name) and moves gate.alias."""
    results = json.loads((cfg.stage_dir("evaluate") / "eval.json").read_text())
    first = next(iter(adapters))
    decision = _gate.apply(results, first, adapters[first], cfg.gate, cfg.registry.root,
                           cfg.registry.name or cfg.name, force=force)
    console.print(f"[bold]gate[/]: {'passed' if decision.passed else 'FORCED' if decision.forced else 'refused'} "
                  f"for {first}" + (f": {cfg.registry.name or cfg.name}@{decision.version}" if decision.version
                                    else "") + "".join(f"\n  {r}" for r in decision.reasons))
    return decision


def stage_merge(cfg: RunConfig, model_dir: str, adapters: list[str], out: Path | None = None) -> Path:
    init_ray(cfg)  # the merge runs as a Ray task, on a GPU when the cluster has one
    return merge.run(cfg.merge, model_dir, adapters, out or cfg.stage_dir("merge"))


def publish(cfg: RunConfig, folder: Path, name: str, kind: str) -> str:
    """Publish a stage's output folder as the next version of `name` in the run's registry."""
    version = Registry(cfg.registry.root).publish(name, folder, kind, lineage_from_manifest(folder))
    return f"registry: {name}@{version} ({kind}) in {cfg.registry.root}"


def run_adapters(cfg: RunConfig) -> dict[str, str]:
    """This run's adapter, {run name: its sft/ folder}, once SFT has written one; else {}."""
    sft_dir = cfg.stage_dir("sft")
    return {cfg.name: str(sft_dir.resolve())} if (sft_dir / "adapter_config.json").is_file() else {}


def adapters_from(specs: list[str] | None, cfg: RunConfig) -> dict[str, str]:
    """`NAME=FOLDER` / `FOLDER` specs as {name: folder}; none given: this run's adapter (or MissingInput)."""
    if not specs:
        found = run_adapters(cfg)
        if not found:
            raise MissingInput(f"no --adapter given and {cfg.stage_dir('sft')} holds no adapter: run `loraforge "
                               "sft` first or pass --adapter FOLDER")
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


def _absolute(spec: str) -> str:
    """A local path made absolute (Ray workers need not share the driver's working directory); URIs as given."""
    return spec if "://" in spec else str(Path(spec).resolve())


def start_serving(cfg: RunConfig, model_dir: str, adapters: dict[str, str]) -> str:
    from serve.app import start

    init_ray(cfg)
    t0 = time.time()
    with console.status("[bold]serve[/]: starting vLLM behind Ray Serve"):
        url = start(cfg.serve, model_dir, adapters)
    console.print(f"[bold]serve[/]: {url} up in {time.time() - t0:.0f} s; models: {cfg.serve.model_alias}"
                  + "".join(f", {cfg.serve.model_alias}:{a}" for a in adapters))
    return url


def demo(cfg: RunConfig, url: str, adapter: str) -> list[dict[str, str]]:
    """Ask every demo prompt of the base and of the adapter through the real OpenAI client; print both."""
    import openai
    from rich.table import Table

    client = openai.OpenAI(base_url=url, api_key=cfg.serve.api_key or "none")
    rows = []
    for prompt in cfg.demo.prompts:
        answers = {}
        for model in (cfg.serve.model_alias, f"{cfg.serve.model_alias}:{adapter}"):
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=cfg.demo.max_tokens, temperature=0.0)
            answers[model] = r.choices[0].message.content or ""
        rows.append({"prompt": prompt, "base": answers[cfg.serve.model_alias],
                     "adapter": answers[f"{cfg.serve.model_alias}:{adapter}"]})
    table = Table(title=f"base vs adapter '{adapter}' (greedy, via {url})", show_lines=True)
    for col in ("prompt", "base", "adapter"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["prompt"], r["base"], r["adapter"])
    console.print(table)
    return rows
