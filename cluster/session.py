"""The Ray instance a command works in: the configured or submitting cluster it joins, or a local instance it
starts (and stops again before its last line, so no worker log lands after the output folder).
"""

from __future__ import annotations

import os

from cluster.config import RunConfig

# Environment every Ray worker and Serve replica gets. vLLM binds its internal queues to the machine's external
# address unless VLLM_HOST_IP says otherwise; tokenizers' own thread pool fights Ray's workers for the cores.
# No DS_ACCELERATOR here: each training worker picks DeepSpeed's accelerator from the device it holds
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
    if not has_cuda():
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


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
