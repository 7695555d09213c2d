"""The `serve` config section: where the OpenAI-compatible endpoint listens and how its vLLM engine is sized.

Pure pydantic: importing this module pulls in neither Ray nor vLLM, so the CLI and config tests stay fast.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipelines.schema import Section

# The ranks vLLM 0.32 accepts for max_lora_rank (vllm/config/lora.py MaxLoRARanks); anything else fails at
# engine start, a minute in, so refuse it when the config is read.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class ServeConfig(Section):
    """One Ray Serve application: one base model plus LoRA adapters behind an OpenAI-compatible API."""

    host: str = Field("127.0.0.1", description="Address the Serve HTTP proxy binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port the Serve HTTP proxy listens on.")
    model_alias: str = Field("base", pattern=r"^[^:\s]+$", description=(
        "Name the base model answers to; adapters are addressed as '<model_alias>:<adapter>' or '<adapter>'."))
    max_loras: int = Field(4, ge=1, description=(
        "LoRA slots in one batch; the engine gets max(max_loras, n_adapters + 1) to dodge vLLM's full-slot bug."))
    max_lora_rank: int = Field(
        64, description="Largest adapter rank the engine accepts (one of vLLM's ranks); larger adapters are refused.")
    max_model_len: int = Field(1024, ge=16, description="Context length (prompt + completion) in tokens.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Engine dtype. float32 on CPUs without bf16: faster there, and exact vs transformers.")
    kv_cache_gb: float = Field(
        1.0, gt=0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE, whole GiB, at least 1).")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="Fraction of GPU memory vLLM may take (GPU only; ignored on CPU).")
    num_replicas: int = Field(1, ge=1, description="Engine replicas; each loads the base model and every adapter.")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each replica actor.")
    api_key: str | None = Field(None, description=(
        "When set, /v1 requests need 'Authorization: Bearer <api_key>' (401 otherwise); /health stays open."))
    startup_timeout_s: float = Field(600, gt=0, description="How long start() waits for GET /health to answer 200.")

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, v: int) -> int:
        if v not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS} (the values vLLM accepts), got {v}")
        return v
