"""The `serve` config section: where the OpenAI-compatible endpoint listens and how its vLLM engine is sized.

Pure pydantic: importing this module pulls in neither Ray nor vLLM, so the CLI and config tests stay fast.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.schema import Section

# The ranks vLLM 0.32 accepts for max_lora_rank (vllm/config/lora.py MaxLoRARanks); anything else fails at
# engine start, a minute in, so refuse it when the config is read. The one list: messages name it through
# lora_ranks().
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_ranks(above: int = 1) -> str:
    """vLLM's LoRA ranks larger than `above`, comma-separated: the values a message can ask serve.max_lora_rank
    to be raised to."""
    return ", ".join(str(r) for r in VLLM_LORA_RANKS if r > above)


def tp_on_cpu(size: int) -> str:
    """The refusal of tensor parallelism on CPU replicas (here at config time, and in serve.app once accelerator
    auto resolved to cpu): vLLM's CPU engine runs one process per replica."""
    return (f"serve.tensor_parallel_size={size} needs GPU replicas (serve.accelerator=gpu, or auto on a cluster "
            "with GPUs); a CPU replica runs one engine process: set serve.tensor_parallel_size=1, or add "
            "serve.num_replicas / serve.autoscaling for more CPU throughput")


class AutoscalingConfig(Section):
    """Ray Serve autoscaling on ongoing requests per replica; each replica is one whole vLLM engine."""

    min_replicas: int = Field(1, ge=1, description="Replicas kept when idle (each holds a loaded engine).")
    max_replicas: int = Field(2, ge=1, description="Most replicas under load; each needs replica_cpus and RAM.")
    target_ongoing_requests: float = Field(
        4, gt=0, description="Ongoing requests per replica the autoscaler aims for; more means scale up.")
    upscale_delay_s: float = Field(5, ge=0, description="Load must persist this long before a replica is added.")
    downscale_delay_s: float = Field(30, ge=0, description="Idle this long before a replica is removed.")
    metrics_interval_s: float = Field(2, gt=0, description="How often replicas report their ongoing requests.")
    look_back_period_s: float = Field(10, gt=0, description="Window the autoscaler averages the load over.")

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self


class ServeConfig(Section):
    """One Ray Serve application: one base model plus LoRA adapters behind an OpenAI-compatible API."""

    host: str = Field("127.0.0.1", description="Address the Serve HTTP proxy binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port the Serve HTTP proxy listens on.")
    accelerator: Literal["auto", "cpu", "gpu"] = Field("auto", description=(
        "Engine replicas on GPUs (one each) or CPUs; auto: GPUs when the cluster has any when the app is built."))
    model_alias: str = Field("base", pattern=r"^[^:\s]+$", description=(
        "Name the base model answers to; adapters are addressed as '<model_alias>:<adapter>' or '<adapter>'."))
    max_loras: int = Field(4, ge=1, description=(
        "Distinct adapters in flight at once per replica; the engine gets one slot more, to dodge vLLM's "
        "full-slot bug (base requests batched with a full set of adapters get one of them)."))
    max_lora_rank: int = Field(16, description=(
        "Largest adapter rank the engine accepts (one of vLLM's ranks; 16 is vLLM's default and the trainers'); "
        "larger adapters are refused with a message. Every slot is padded to this rank, and the padding is "
        "computed on: keep it at the largest rank you serve."))
    max_model_len: int = Field(1024, ge=16, description="Context length (prompt + completion) in tokens.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "Engine dtype; 'auto': bfloat16 on a GPU replica, float32 on a CPU one (CPUs without bf16 run it faster, "
        "and it is exact vs transformers)."))
    kv_cache_gb: float = Field(
        1.0, gt=0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE, whole GiB, at least 1).")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="Fraction of GPU memory vLLM may take (GPU only; ignored on CPU).")
    num_replicas: int = Field(1, ge=1, description="Engine replicas; each loads the base model and every adapter.")
    tensor_parallel_size: int = Field(1, ge=1, description=(
        "GPUs one engine replica shards the base over (vLLM tensor parallelism): each replica gets one placement "
        "group of this many GPU bundles, packed on one node. GPU replicas only; `loraforge plan` names the size "
        "a base needs on the node type."))
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each engine replica.")
    max_ongoing_requests: int = Field(64, ge=1, description=(
        "Requests one engine replica takes at once; Serve queues the rest. Requests for an adapter go to the "
        "replicas that hold it until those are this full, then spill to another replica, which loads it."))
    api_key: str | None = Field(None, description=(
        "When set, /v1 requests need 'Authorization: Bearer <api_key>' (401 otherwise); /health stays open."))
    startup_timeout_s: float = Field(600, gt=0, description="How long start() waits for GET /health to answer 200.")
    autoscaling: AutoscalingConfig | None = Field(None, description=(
        "Autoscale between min and max replicas on ongoing requests; when unset, num_replicas fixed replicas."))
    registry: str | None = Field(None, description=(
        "Registry folder (pipelines.artifacts.registry) adapters are resolved from on first use, by name, "
        "name@version or name@alias; an adapter registered while serving is servable without a restart."))
    adapter_dir: str | None = Field(None, description=(
        "A folder whose sub-folders are adapters (<dir>/<name>/adapter_config.json), read on first use; for "
        "setups without a registry."))
    adapter_cache_size: int = Field(8, ge=1, description=(
        "Adapters each replica keeps loaded (LRU); at least max_loras. The least recently used is unloaded "
        "only after a new one loaded."))
    resolve_ttl_s: float = Field(2.0, ge=0, description=(
        "How long a replica reuses an alias resolution (name@production -> version) before asking again."))
    retry_failed_s: float = Field(30.0, ge=0, description=(
        "After an adapter fails to load, requests for it get 503 for this long before a reload is tried."))
    splits: dict[str, dict[str, float]] = Field(default_factory=dict, description=(
        "A/B splits: public adapter name -> {adapter ref: weight}, e.g. {city: {'city@3': 80, 'city@4': 20}}. "
        "Sticky per caller (the request's `user`, else its API key); the served ref is in x-loraforge-adapter."))
    base_model_names: list[str] = Field(default_factory=list, description=(
        "Other names adapters may give as base_model_name_or_path for this base (e.g. a hub id); the base's "
        "folder and the origins in its config.json/manifest.json are always accepted."))

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, v: int) -> int:
        if v not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS} (the values vLLM accepts), got {v}")
        return v

    @field_validator("splits")
    @classmethod
    def _weights(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for name, targets in v.items():
            if not targets or any(w <= 0 for w in targets.values()):
                raise ValueError(f"split {name!r}: needs at least one target, every weight > 0")
            if name in targets:
                raise ValueError(f"split {name!r} names itself as a target")
        return v

    @model_validator(mode="after")
    def _cache_fits_slots(self) -> "ServeConfig":
        if self.adapter_cache_size < self.max_loras:
            raise ValueError(f"adapter_cache_size ({self.adapter_cache_size}) < max_loras ({self.max_loras}): a "
                             "batch could need adapters the cache just unloaded")
        return self

    @model_validator(mode="after")
    def _tp_needs_gpus(self) -> "ServeConfig":
        if self.accelerator == "cpu" and self.tensor_parallel_size > 1:
            raise ValueError(tp_on_cpu(self.tensor_parallel_size))
        return self

    def engine_dtype(self, gpu: bool) -> str:
        """The dtype a replica's engine runs: serve.dtype, with 'auto' resolved for a GPU or a CPU replica."""
        return self.dtype if self.dtype != "auto" else ("bfloat16" if gpu else "float32")
