"""The base every config section derives from (unknown keys are errors, not silently ignored), the user-error
classes every stage raises for what a user can fix, and the one rule for what a GPU-using Ray actor asks for
(evaluation's generator, DPO's reference scorer, serve replicas; quantize has its own `num_gpus`), decided from
the config and the cluster the stage runs on, never from a process-wide setting:

    actor_gpus(cfg.eval.num_gpus, cluster_gpus())   # None: one GPU when the cluster has any, else none
    torch_device(num_gpus)                          # "cuda" inside an actor that holds a GPU, else "cpu"
    accelerator_kind(cfg.serve.accelerator, cluster_gpus())
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

REDACTED = "***"
_SECRET_KEY = re.compile(r"(^|_)(api_key|apikey|password|passwd|secret|secret_key|secret_access_key|access_key|"
                         r"access_key_id|session_token|auth_token|bearer_token|hf_token|credentials)$", re.I)
_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://[^/@:\s]*):[^/@\s]*@", re.I)


def redact(value: Any) -> Any:
    """A copy of a config-like value with its secrets replaced by '***': the value of every key that names one
    (api_key, password, secret_key, session_token, ...) and the password of `scheme://user:password@host` in any
    string. Everything printed or written (validate, manifests, MLflow params, the registry index) goes through
    it: a key or credential never lands on a terminal, in a log or in an artifact."""
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) and value[k] not in (None, "")
                    else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v) for v in value)
    if isinstance(value, str) and "://" in value:
        return _USERINFO.sub(rf"\1:{REDACTED}@", value)
    return value


class Section(BaseModel):
    """A config section: typed, described, and strict about unknown keys."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class UserError(Exception):
    """Something a user gave us is wrong: a config key, an input file, its rows, an artifact that fails its
    check. The CLI prints the message (which names the file, row or key and what to do) and exits 2, without a
    traceback; anything else is a bug and keeps its traceback."""


class MissingInput(UserError, FileNotFoundError):
    """An input file, folder or glob that does not exist."""


class DataError(UserError, ValueError):
    """Input that exists but cannot be used: no rows, too many rejected rows, rows of mixed kinds."""


class ConfigError(UserError, ValueError):
    """A config that does not validate, or a key a stage needs that is unset; the message names the file or key,
    and what to set."""


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster has now (0 without Ray: a local CPU run)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def actor_gpus(requested: float | None, available: float) -> float:
    """An actor's GPUs: as configured; unset, one when the cluster has GPUs (the stage then runs where they are),
    none on a CPU cluster."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"num_gpus must be >= 0, got {requested}")
        return float(requested)
    return 1.0 if available > 0 else 0.0


def torch_device(num_gpus: float) -> str:
    """Where an actor that holds `num_gpus` puts its model: Ray sets CUDA_VISIBLE_DEVICES to its GPUs."""
    return "cuda" if num_gpus > 0 else "cpu"


def vllm_in_one_process(device: str) -> None:
    """Before an offline `vllm.LLM` is built in this process: on a CPU, its engine core and model worker run in
    this process (VLLM_ENABLE_V1_MULTIPROCESSING=0; the CPU platform then keeps vLLM's one-process executor).
    Otherwise vLLM's CPU platform spawns an engine-core process and a worker process, each importing vLLM and
    torch again: ~25 s of a ~40 s start on 2 cores for a tiny model (the same greedy tokens either way). An
    offline engine gains nothing from them; its caller waits on every batch. GPUs keep vLLM's defaults. Serving
    replicas (AsyncLLM) always run the engine core as a process of its own."""
    if device == "cpu":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def accelerator_kind(requested: Literal["auto", "cpu", "gpu"], available: float) -> Literal["cpu", "gpu"]:
    """A serve replica's kind: as configured; `auto`, GPU when the cluster has GPUs. `gpu` on a cluster with none
    now is kept: an autoscaling cluster starts a GPU node for the replica."""
    if requested == "auto":
        return "gpu" if available > 0 else "cpu"
    return requested
