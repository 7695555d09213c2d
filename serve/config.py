"""The `serve` config section: where the OpenAI-compatible endpoint listens and how its vLLM engine is sized.

Pure pydantic: importing this module pulls in neither Ray nor vLLM, so the CLI and config tests stay fast.
"""

from __future__ import annotations

import re
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


# Names: the whole string, `\Z` (never `$`, which also matches before a trailing newline).
MODEL_ALIAS = re.compile(r"\A[^:\s]+\Z")
ORIGIN = re.compile(r"\Ahttps?://[A-Za-z0-9.-]+(:[0-9]{1,5})?\Z")


def loopback(host: str) -> bool:
    """Whether `host` binds only this machine's loopback (127.0.0.0/8, ::1, localhost): nobody else can connect."""
    return host == "localhost" or host == "::1" or host.startswith("127.")


def open_endpoint(host: str) -> str:
    """The refusal of a keyless endpoint that other machines can reach (here at config time)."""
    return (f"serve.host={host} is reachable from other machines and serve.api_key is unset: anyone who can connect "
            "could use the models; set serve.api_key (clients send 'Authorization: Bearer <key>'), or set "
            "serve.allow_unauthenticated=true if that is the point")


class LimitsConfig(Section):
    """Caps on one request, checked by the ingress before an engine sees it: over a cap is a 400 naming the cap and
    its key (a body over max_body_bytes is a 413), so one caller cannot hold an engine for minutes."""

    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="Largest request body in bytes (413 above it).")
    max_n: int = Field(8, ge=1, description="Most choices per request (`n`).")
    max_prompts: int = Field(32, ge=1, description="Most prompts in one /v1/completions request (a prompt list).")
    max_messages: int = Field(256, ge=1, description="Most messages in one /v1/chat/completions request.")
    max_tokens: int | None = Field(None, ge=1, description=(
        "Largest max_tokens / max_completion_tokens a request may ask for; default (and at most) "
        "serve.max_model_len."))
    max_logprobs: int = Field(20, ge=0, description=(
        "Largest logprobs (completions), top_logprobs (chat) and prompt_logprobs; -1 (the whole vocabulary) is "
        "refused."))
    max_concurrent_per_key: int | None = Field(None, ge=1, description=(
        "Requests one API key (without a key: one client address) may have in flight per ingress replica; more "
        "are answered 429 with Retry-After. Off by default."))


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


class SignalsConfig(Section):
    """Quality signals of every answer per adapter and version (serve.signals): top-k token entropy, length, finish
    reason, empty and refusal, as Prometheus metrics (serve.metrics.SignalMetrics)."""

    enabled: bool = Field(True, description="Measure the signals (false: the engine is asked for nothing extra).")
    top_k: int = Field(20, ge=0, le=20, description=(
        "Log-probs per generated token the entropy is computed over (at most vLLM's max_logprobs, 20); 0: no "
        "entropy, the other signals stay. Clients receive the log-probs they asked for, unchanged."))
    sample_rate: float = Field(0.25, ge=0, le=1, description=(
        "Share of requests whose entropy is measured (a hash of the engine's request id: every replica decides the "
        "same); the others ask the engine for no log-probs. Length, finish reason, empty and refusal are recorded "
        "for every answer. Measure the cost on your hardware with bench/serve_signals.py --sample-rate."))


class JudgeConfig(Section):
    """Sampled judging of live traffic (serve.judging): a deterministic hash sample of requests (a hash of the
    request's prompt or messages, so every ingress replica decides the same and every version is sampled on the
    same prompts), each sampled prompt and answer stored with its adapter and version (jsonl in `store`, kept to
    `max_rows` rows and `max_age_h` hours) and judged in batches, off the request path, by any OpenAI-compatible
    endpoint with the evaluation stage's judge prompt and parsing (pipelines.eval.judge). Scores are Prometheus
    metrics per adapter and version, read by `loraforge monitor` and the canary. A request with the header
    `x-loraforge-judge: off` is never sampled (sensitive traffic); `enabled: false` turns it all off."""

    enabled: bool = Field(True, description="Sample, store and judge live traffic (false: nothing is sampled).")
    sample_rate: float = Field(0.05, ge=0, le=1, description="Share of each version's requests sampled and judged.")
    rates: dict[str, float] = Field(default_factory=dict, description=(
        "Per adapter name (serve.model_alias for the base model), a sample rate replacing sample_rate, e.g. a "
        "canaried adapter judged more often than the rest."))
    store: str | None = Field(None, description=(
        "Folder the sampled rows go to (judged.jsonl). `loraforge serve` / `run` / `deploy` use the run folder's "
        "judged/ when unset; an app started from code without it judges nothing (logged)."))
    max_rows: int = Field(10000, ge=1, description="Rows kept in the store; the oldest are dropped beyond it.")
    max_age_h: float | None = Field(168.0, gt=0, description="Rows older than this (hours) are dropped; None: kept.")
    url: str | None = Field(None, description=(
        "The judge's OpenAI base URL; None: this app's own base model over loopback (a weak judge: say so when you "
        "read its scores), with serve.api_key."))
    model: str | None = Field(None, description="Model name sent to the judge; None: serve.model_alias.")
    constrain: bool | None = Field(None, description=(
        "Constrain the judge's reply to 1..10 (vLLM structured outputs: structured_outputs.choice), so a small "
        "judge still gives a score; None: on when the judge is this app's own base (url unset), off for another "
        "endpoint (OpenAI's API refuses the field)."))
    api_key_env: str = Field("LORAFORGE_JUDGE_API_KEY", description=(
        "Env var holding the judge's API key when url is set, read where the judge replica runs (the Ray node's "
        "environment); never logged."))
    rubric: str = Field("Score the answer from 1 (wrong or useless) to 10 (correct, complete, concise). Reply with "
                        "the number only.", description="Instruction given to the judge (live traffic has no "
                                                        "reference answer).")
    batch_size: int = Field(16, ge=1, description="Samples judged per batch.")
    interval_s: float = Field(5.0, gt=0, description="Seconds between batches.")
    max_queue: int = Field(1000, ge=1, description="Samples waiting for the judge; beyond it new ones are dropped "
                                                   "(counted as outcome=dropped).")
    timeout_s: float = Field(60.0, gt=0, description="Seconds one judge call may take.")

    @field_validator("rates")
    @classmethod
    def _rates(cls, v: dict[str, float]) -> dict[str, float]:
        for name, rate in v.items():
            if not 0 <= rate <= 1:
                raise ValueError(f"rates[{name!r}] = {rate}: a share between 0 and 1")
        return v

    def rate(self, adapter: str | None, alias: str) -> float:
        """The sample rate of an adapter's requests (None: the base model)."""
        return self.rates.get(adapter or alias, self.sample_rate)

    def active(self) -> bool:
        return self.enabled and self.store is not None and (self.sample_rate > 0 or any(self.rates.values()))


class CanaryConfig(Section):
    """A canary of one registry adapter (serve.canary.<name>): the split between `incumbent` and `candidate` ramps
    through `steps` while the candidate's signals hold against the incumbent's, and falls back to 0% (the alias
    back on the incumbent) on a breach. Every step and the rollback are entries of the registry's audit log."""

    incumbent: int = Field(..., ge=1, description="Registry version serving now.")
    candidate: int = Field(..., ge=1, description="Registry version on trial.")
    alias: str | None = Field("production", description=(
        "Alias moved to the candidate once it held at 100%, and back to the incumbent on a rollback; requests for "
        "<name>@<alias> are split too. None: no alias is touched."))
    steps: list[float] = Field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0], description=(
        "Candidate traffic share (%) of each step, increasing, ending at 100."))
    step_window_s: float = Field(600, gt=0, description="How long each step must hold before the next.")
    min_answers: int = Field(20, ge=2, description=(
        "Candidate answers (and incumbent answers) a step needs before it can pass or breach; a step waits for them."))
    max_entropy_increase: float = Field(0.3, ge=0, description=(
        "Breach: the candidate's mean token entropy exceeds the incumbent's by more than this (nats) and by more "
        "than z standard errors."))
    z: float = Field(3.0, gt=0, description="Standard errors the entropy difference must also exceed.")
    max_empty_rate_increase: float | None = Field(0.1, ge=0, description="Breach: empty-answer share rise (0-1).")
    max_refusal_rate_increase: float | None = Field(0.1, ge=0, description="Breach: refusal share rise (0-1).")
    max_length_rate_increase: float | None = Field(0.25, ge=0, description=(
        "Breach: rise of the share of answers cut at max_tokens (finish_reason=length)."))
    max_error_rate: float = Field(0.05, ge=0, le=1, description="Breach: share of the candidate's answers that failed.")
    max_judge_drop: float | None = Field(1.0, ge=0, description=(
        "Breach: the candidate's mean judge score (serve.judge, 1-10) is below the incumbent's by more than this "
        "and by more than z standard errors, once each side has min_judged judged answers; with fewer the judge does "
        "not block the ramp. None: judge scores never breach."))
    min_judged: int = Field(10, ge=2, description="Judged answers each side needs before judge scores count.")
    tick_s: float = Field(1.0, gt=0, description="How often the controller decides.")

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[float]) -> list[float]:
        if not v or v[-1] != 100 or any(not 0 < s <= 100 for s in v) or any(a >= b for a, b in zip(v, v[1:])):
            raise ValueError(f"steps {v}: increasing percentages in (0, 100], the last one 100")
        return v

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str | None) -> str | None:
        if v is not None and (not re.fullmatch(r"\A[a-z][a-z0-9_-]{0,31}\Z", v) or v.isdigit()):
            raise ValueError(f"alias {v!r}: a registry alias ([a-z][a-z0-9_-]{{0,31}})")
        return v

    @model_validator(mode="after")
    def _two_versions(self) -> "CanaryConfig":
        if self.incumbent == self.candidate:
            raise ValueError(f"incumbent and candidate are both version {self.candidate}")
        return self


class ServeConfig(Section):
    """One Ray Serve application: one base model plus LoRA adapters behind an OpenAI-compatible API."""

    host: str = Field("127.0.0.1", description=(
        "Address the Serve HTTP proxy binds to; any address but loopback needs serve.api_key (or "
        "serve.allow_unauthenticated)."))
    port: int = Field(8000, ge=1, le=65535, description="Port the Serve HTTP proxy listens on.")
    accelerator: Literal["auto", "cpu", "gpu"] = Field("auto", description=(
        "Engine replicas on GPUs (one each) or CPUs; auto: GPUs when the cluster has any when the app is built."))
    model_alias: str = Field("base", description=(
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
        "When set, /v1 requests, /docs and /openapi.json need 'Authorization: Bearer <api_key>' (the scheme in any "
        "case; 401 otherwise); /health stays open. Required when serve.host is not loopback."))
    allow_unauthenticated: bool = Field(False, description=(
        "Serve without serve.api_key on a non-loopback serve.host (anyone who can connect may use the models); "
        "logged as a warning at start."))
    cors_origins: list[str] = Field(default_factory=list, description=(
        "Browser origins (e.g. https://app.example.com) allowed to call the endpoint cross-origin; empty: CORS off, "
        "no web page on another origin can drive it."))
    docs: bool = Field(True, description=(
        "Serve /docs and /openapi.json (behind serve.api_key when set); false: 404."))
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Caps on one request (serve.limits.*).")
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
    signals: SignalsConfig = Field(default_factory=SignalsConfig, description="Quality signals (serve.signals.*).")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description=(
        "Sampled judging of live traffic (serve.judge.*)."))
    canary: dict[str, CanaryConfig] = Field(default_factory=dict, description=(
        "Canaries by registry adapter name, e.g. {city: {incumbent: 3, candidate: 4}}: requests for the name (and "
        "name@alias) are split by one controller that ramps or rolls back (serve.canary); needs serve.registry."))
    base_model_names: list[str] = Field(default_factory=list, description=(
        "Other names adapters may give as base_model_name_or_path for this base (e.g. a hub id); the base's "
        "folder and the origins in its config.json/manifest.json are always accepted."))

    @field_validator("model_alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        if not MODEL_ALIAS.fullmatch(v):
            raise ValueError(f"model_alias {v!r}: must be non-empty, without ':' or whitespace")
        return v

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and (not v or not v.isprintable() or any(c.isspace() for c in v)):
            raise ValueError("api_key must be a non-empty string without whitespace (unset it to serve without "
                             "a key, on loopback only)")
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if not ORIGIN.fullmatch(origin):
                raise ValueError(f"cors_origins: {origin!r} is not an origin: list each one as scheme://host[:port] "
                                 "(no '*', no path)")
        return v

    @model_validator(mode="after")
    def _closed_by_default(self) -> "ServeConfig":
        if self.api_key is None and not self.allow_unauthenticated and not loopback(self.host):
            raise ValueError(open_endpoint(self.host))
        return self

    @model_validator(mode="after")
    def _tokens_fit_context(self) -> "ServeConfig":
        if self.limits.max_tokens is not None and self.limits.max_tokens > self.max_model_len:
            raise ValueError(f"limits.max_tokens ({self.limits.max_tokens}) > max_model_len ({self.max_model_len}): "
                             "no request could use it; lower it or leave it unset")
        return self

    def max_tokens(self) -> int:
        """The largest max_tokens a request may ask for: serve.limits.max_tokens, else serve.max_model_len."""
        return self.limits.max_tokens or self.max_model_len

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
    def _canary_needs_registry(self) -> "ServeConfig":
        for name in self.canary:
            if not re.fullmatch(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z", name) or ".." in name:
                raise ValueError(f"canary {name!r}: not a registry name ([A-Za-z0-9][A-Za-z0-9._-]{{0,63}})")
        if self.canary and not self.registry:
            raise ValueError(f"canary {sorted(self.canary)}: versions come from a registry; set serve.registry")
        if both := sorted(set(self.canary) & set(self.splits)):
            raise ValueError(f"{both}: a name is either a split or a canary, not both")
        return self

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

    def with_judge_store(self, folder: str) -> "ServeConfig":
        """This config with serve.judge.store set to `folder` unless it was set (a run's judged/ folder)."""
        if self.judge.store is not None or not self.judge.enabled:
            return self
        return self.model_copy(update={"judge": self.judge.model_copy(update={"store": str(folder)})})

    def engine_dtype(self, gpu: bool) -> str:
        """The dtype a replica's engine runs: serve.dtype, with 'auto' resolved for a GPU or a CPU replica."""
        return self.dtype if self.dtype != "auto" else ("bfloat16" if gpu else "float32")
