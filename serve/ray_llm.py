"""The names serve/ takes from Ray's internal `ray.llm._internal` package: imported here, and nowhere else in serve/.

Written against Ray 2.60.0 (RAY_VERSION). `ray.serve.llm` publishes LLMConfig, LLMServer, OpenAiIngress and
build_llm_deployment, which serve/ imports from there; what it does not publish, but the app needs, is below:
the ingress's FastAPI app and stream helpers, the engine replica's LoRA loader and its return type, the id
counter vLLM's LoRA requests need, the callback base and the model-card builder. Ray may move or rename any of
them in a release; tests/unit/serve/test_serve_ray_llm.py then names the ones that no longer import.

Besides these names, serve/ overrides methods of Ray's classes that Ray does not document (OVERRIDDEN): a release
that renames one leaves the override silently unused, so the same test checks that each still exists.
"""

from __future__ import annotations

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.configs.openai_api_models import ErrorResponse, to_model_metadata
from ray.llm._internal.serve.core.ingress.ingress import init, router_request_timeout
from ray.llm._internal.serve.core.ingress.utils import (
    NON_STREAMING_RESPONSE_TYPES,
    _openai_json_wrapper,
    _peek_at_generator,
)
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

RAY_VERSION = "2.60.0"

# Methods of Ray's public classes that serve.ingress.LoRAIngress and serve.server.LoRAServer override or call,
# by the public import path of the class.
OVERRIDDEN = {
    "ray.serve.llm.ingress:OpenAiIngress": ("_process_llm_request", "_get_response", "models", "model_data"),
    "ray.serve.llm:LLMServer": ("_run_request", "_maybe_resolve_lora_from_multiplex", "check_health"),
}

__all__ = ["RAY_VERSION", "OVERRIDDEN", "CallbackBase", "global_id_manager", "DiskMultiplexConfig", "ErrorResponse",
           "to_model_metadata", "init", "router_request_timeout", "NON_STREAMING_RESPONSE_TYPES",
           "_openai_json_wrapper", "_peek_at_generator", "LoraModelLoader"]
