"""Driver side of the Ray Serve app: validate, build, start, stop. The app is Ray's `ray.serve.llm` stack:
an `LLMConfig`, LLMServer replicas (serve.server) behind an OpenAiIngress (serve.ingress).

    .venv/bin/pytest tests/integration/test_serve.py -x -q -s   # tiny CPU variant, end to end (repo root)

    import ray; from serve import ServeConfig, start
    ray.init(); url = start(ServeConfig(port=8000), "/path/to/base-hf-folder", {"city": "/path/to/adapter"})
    # then: openai.OpenAI(base_url=url, api_key="x").completions.create(model="base:city", prompt="...")
    # or, adapters from the registry on first use: ServeConfig(registry="/path/to/registry"), adapters={}

`build_app` validates the base and every adapter named in `adapters` in the driver (before anything starts;
ServeInputError, a UserError, names what cannot be served) and returns the Serve application; `start` runs it
and waits for GET /health; `shutdown` removes it.
Ray's `dynamic_lora_loading_path` accepts only s3/gs/azure URIs, so it stays unset: adapters come through
LLMServer's `model_downloader` injection point instead (serve.server.SourceLoader), from a local or shared
registry alike. `ray[llm]` pins a vLLM other than the one served, so the environment has `ray[serve]` plus the
few packages `ray.serve.llm` imports.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException

from pipelines.schema import UserError, accelerator_kind, cluster_gpus
from serve.adapters import (
    AdapterSource,
    ChainSource,
    FolderSource,
    RegistrySource,
    StaticSource,
    base_identities,
    parse_ref,
    validate_adapter,
)
from serve.base import check_servable, resolve_base
from serve.canary import CanaryController
from serve.config import ServeConfig, tp_on_cpu
from serve.errors import AdapterInvalid, BadAdapterName, ServeInputError
from serve.ingress import ENDPOINTS, LoRAIngress, fastapi_app
from serve.judging import JudgeWorker
from serve.lora_support import support_for
from serve.ray_llm import to_model_metadata
from serve.server import LoRAServer

__all__ = ["build_app", "start", "shutdown", "validate_adapters", "make_source", "engine_env", "llm_config"]
log = logging.getLogger(__name__)
SERVER = "LoRAServer"  # the engine deployment is named "LoRAServer:<model_alias>"
# Serve runs user code on a second event loop thread by default; both replicas here only await (vLLM's engine
# runs in its own process), so the hop between loops is pure overhead on every request and stream chunk.
SERVE_REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def validate_adapters(adapters: dict[str, str], cfg: ServeConfig, base_model: str | None = None) -> dict[str, str]:
    """Check names and folders before a replica spends a minute starting; return name -> absolute folder.
    ServeInputError names the first adapter that cannot be served and why."""
    bases = base_identities(base_model, cfg.base_model_names) if base_model else None
    support = support_for(base_model) if base_model and adapters else None  # vLLM's LoRA layers for this base
    checked = {}
    for name, folder in adapters.items():
        try:
            if parse_ref(name)[1] is not None:
                raise BadAdapterName(f"invalid adapter name {name!r}: '@' is for versions in a registry")
        except BadAdapterName as e:
            raise ServeInputError(f"adapter {name!r}: {e}") from None
        if name == cfg.model_alias:
            raise ServeInputError(f"adapter {name!r}: the name is taken by the base model's alias")
        path = Path(folder).expanduser().resolve()
        try:
            validate_adapter(str(path), max_rank=cfg.max_lora_rank, bases=bases, support=support)
        except AdapterInvalid as e:
            raise ServeInputError(f"adapter {name!r}: {e}") from None
        checked[name] = str(path)
    return checked


def make_source(cfg: ServeConfig, adapters: dict[str, str]) -> AdapterSource:
    """Adapters named in the call first, then the adapter folder, then the registry (the first match wins)."""
    sources: list[AdapterSource] = [StaticSource(adapters)] if adapters else []
    if cfg.adapter_dir:
        sources.append(FolderSource(cfg.adapter_dir))
    if cfg.registry:
        sources.append(RegistrySource(cfg.registry))
    return sources[0] if len(sources) == 1 else ChainSource(sources)


def engine_env(cfg: ServeConfig) -> dict[str, str]:
    """Env vars vLLM reads at import time, so they must reach the replica before `import vllm`."""
    return {
        "VLLM_HOST_IP": "127.0.0.1",  # else vLLM binds its internal queues to the external address
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(cfg.kv_cache_gb))),
        **SERVE_REPLICA_ENV,
    }


# A replica whose engine died fails every health check; Serve replaces it after 3 failed checks in a row.
HEALTH_CHECK_PERIOD_S = 2


def llm_config(cfg: ServeConfig, base_model: str, *, gpu: bool) -> Any:
    """The `ray.serve.llm.LLMConfig` of the engine deployment: model, vLLM engine, LoRA, replicas.

    serve.tensor_parallel_size N > 1 (GPU replicas only; UserError on a CPU one) goes to vLLM as
    engine_kwargs.tensor_parallel_size; ray.serve.llm then derives one placement group per replica of N {"GPU": 1}
    bundles (VLLMEngineConfig.placement_bundles: tensor × pipeline parallel size, from engine_kwargs), starts
    vLLM's Ray executor in it, and adds the replica actor's CPUs to the first bundle. STRICT_PACK keeps the N
    GPUs on one node: tensor parallelism all-reduces in every layer, too often for the network between nodes."""
    from ray.serve.llm import LLMConfig

    tp = cfg.tensor_parallel_size
    if tp > 1 and not gpu:
        raise UserError(tp_on_cpu(tp))

    # Ray places the replica actor in the first bundle of the engine's placement group and adds their
    # resources. On CPU the engine is a subprocess of the replica, so the whole replica_cpus goes in the bundle
    # and the actor adds nothing; on GPU Ray's default bundle holds the GPU and the actor takes the CPUs.
    deployment: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests, "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": 30,
        "ray_actor_options": {"num_cpus": cfg.replica_cpus if gpu else 0}}
    if cfg.autoscaling is None:
        deployment["num_replicas"] = cfg.num_replicas
    else:
        a = cfg.autoscaling
        deployment["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "initial_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests, "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s, "metrics_interval_s": a.metrics_interval_s,
            "look_back_period_s": a.look_back_period_s}
    return LLMConfig(
        model_loading_config={"model_id": cfg.model_alias, "model_source": base_model},
        accelerator_config={"kind": "gpu" if gpu else "cpu"},
        engine_kwargs={
            # LoRA off only where vLLM has none for the architecture (GPT-2: a merged model serves, adapters
            # are refused by validate_adapter), else its engine would not start at all
            "dtype": cfg.engine_dtype(gpu), "max_model_len": cfg.max_model_len,
            "enable_lora": getattr(support_for(base_model), "supported", True),
            "max_lora_rank": cfg.max_lora_rank,
            # One slot more than the gate admits (SlotGate: vLLM's full-slot bug); vLLM's CPU-side LRU holds
            # the replica's adapters and loads a new one before it evicts.
            "max_loras": cfg.max_loras + 1, "max_cpu_loras": max(cfg.adapter_cache_size, cfg.max_loras + 1),
            "enforce_eager": not gpu, "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "tensor_parallel_size": tp},
        lora_config={"max_num_adapters_per_replica": cfg.adapter_cache_size},
        placement_group_config=(None if tp == 1 else {"bundle_per_worker": {"GPU": 1}, "strategy": "STRICT_PACK"})
        if gpu else {"bundles": [{"CPU": cfg.replica_cpus}]},
        runtime_env={"env_vars": engine_env(cfg)},
        callback_config={"callback_class": "serve.server:LocalModelCallback"},
        deployment_config=deployment)


def build_app(cfg: ServeConfig, base_model: str, adapters: dict[str, str],
              source: AdapterSource | None = None) -> serve.Application:
    """The Serve application for one base model and its adapters; raises ServeInputError naming a base or an
    adapter that cannot be served.
    `base_model` is a Hugging Face folder or, with cfg.registry, a registry reference (e.g. `city-merged@3`).
    `source` overrides where adapters come from (default: `adapters`, then cfg.adapter_dir, cfg.registry)."""
    from ray.serve.llm import build_llm_deployment
    from ray.serve.llm.ingress import make_fastapi_ingress

    base = resolve_base(base_model, cfg.registry)
    gpu = accelerator_kind(cfg.accelerator, cluster_gpus()) == "gpu"
    check_servable(base, has_gpu=gpu)
    checked = validate_adapters(adapters, cfg, base)
    source = source if source is not None else make_source(cfg, checked)
    llm = llm_config(cfg, base, gpu=gpu)
    # serve.canary: one controller deployment decides every canary's split; engines report to it, ingresses ask it.
    canary = {"canary": serve.deployment(CanaryController, name="CanaryController", num_replicas=1,
                                         ray_actor_options={"num_cpus": 0}).bind(cfg=cfg)} if cfg.canary else {}
    # serve.judging: one replica stores and judges the requests every ingress replica samples.
    judge = {"judge": serve.deployment(JudgeWorker, name="JudgeWorker", num_replicas=1,
                                       ray_actor_options={"num_cpus": 0}).bind(cfg=cfg, **canary)} \
        if cfg.judge.active() else {}
    if cfg.judge.enabled and cfg.judge.store is None:
        log.info("serve.judge: no store set (serve.judge.store); live traffic is not judged")
    server = build_llm_deployment(llm, name_prefix=f"{SERVER}:", deployment_cls=LoRAServer,
                                  bind_kwargs={"cfg": cfg, "source": source, "base_model": base, **canary})
    ingress = make_fastapi_ingress(LoRAIngress, endpoint_map=ENDPOINTS, app=fastapi_app(cfg))
    # The ingress holds no model: 0 CPUs, like Ray's own request router, so it never competes with engines.
    return serve.deployment(ingress, name="LoRAIngress", max_ongoing_requests=1000,
                            ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": SERVE_REPLICA_ENV}}).bind(
        llm_deployments={cfg.model_alias: server},
        model_cards={cfg.model_alias: to_model_metadata(cfg.model_alias, llm)}, cfg=cfg, source=source, **canary,
        **judge)


def start(cfg: ServeConfig, base_model: str, adapters: dict[str, str], *, name: str = "loraforge",
          source: AdapterSource | None = None, probe_host: str | None = None) -> str:
    """Run the app on the running Ray cluster and return its OpenAI base URL once GET /health answers 200.
    `probe_host`: where this process reaches the HTTP proxy (a remote head's address); default cfg.host."""
    application = build_app(cfg, base_model, adapters, source)
    if cfg.api_key is None and cfg.allow_unauthenticated:
        log.warning("loraforge: serving WITHOUT an API key on %s:%d (serve.allow_unauthenticated=true): anyone who "
                    "can connect may use every model", cfg.host, cfg.port)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    # serve.run waits for the replicas without a time limit; a thread lets startup_timeout_s bound it.
    failure: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(application, name=name, route_prefix="/", blocking=False)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            failure.append(e)

    thread = threading.Thread(target=deploy, name=f"serve-run-{name}", daemon=True)
    thread.start()
    host = probe_host or ("127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host)
    root = f"http://{host}:{cfg.port}"
    deadline = time.monotonic() + cfg.startup_timeout_s
    while time.monotonic() < deadline:
        if failure:
            raise RuntimeError(f"serve app {name!r} failed to deploy: {_deploy_message(name)}") from failure[0]
        if not thread.is_alive() and _healthy(root + "/health"):
            return root + "/v1"
        time.sleep(1.0)
    shutdown(name)
    raise TimeoutError(f"serve app {name!r} did not answer GET {root}/health within {cfg.startup_timeout_s:.0f}s")


def _deploy_message(name: str) -> str:
    """serve.run's own error says only "Failed to update the deployments"; the replica's traceback is here."""
    try:
        app_status = serve.status().applications[name]
        return "\n".join([app_status.message, *(d.message for d in app_status.deployments.values() if d.message)])
    except Exception as e:  # noqa: BLE001 - best effort: the controller may already be gone
        return f"(status unavailable: {e})"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def replica_count(name: str = "loraforge", states: tuple[str, ...] = ("RUNNING",)) -> int:
    """Engine replicas of the app in `states` (Serve's replica states; running ones by default), for autoscaling
    checks and the CLI."""
    deployments = serve.status().applications[name].deployments
    status = next(d for key, d in deployments.items() if key.startswith(SERVER + ":"))
    return sum(n for state, n in status.replica_states.items() if getattr(state, "value", state) in states)


def shutdown(name: str = "loraforge", *, only_app: bool = False) -> None:
    """Delete the app (its replicas shut their engines down) and stop Serve's controller and proxies; with
    only_app, Serve itself is stopped only when no other app is left on the cluster (a shared cluster keeps
    everyone else's endpoints).

    Safe when Serve never started: `serve.delete` then raises RayServeException ("There is no Serve instance
    running on this Ray cluster"), the one case passed over, and `serve.shutdown` does nothing. Deleting an app
    that is already gone succeeds in Serve itself. Any other failure (a delete that times out, a dead controller)
    propagates, after Serve is still shut down."""
    try:
        serve.delete(name)
    except RayServeException as e:  # no Serve instance on this cluster: nothing to delete
        log.info("serve app %r: nothing to delete (%s)", name, e)
        return
    finally:
        if not only_app:
            serve.shutdown()
    if only_app and not serve.status().applications:
        serve.shutdown()
