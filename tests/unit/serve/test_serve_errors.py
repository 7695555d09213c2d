"""serve.errors: the status and body each failure is answered with, and serve's user errors. Pure: no vLLM.

    .venv/bin/python -m pytest tests/unit/serve/test_serve_errors.py -q
"""

from __future__ import annotations

import json

import pytest

from pipelines.schema import UserError
from serve.config import VLLM_LORA_RANKS, ServeConfig, lora_ranks
from serve.errors import (
    ENGINE_DEAD,
    RETRY_AFTER_S,
    AdapterInvalid,
    AdapterNotFound,
    APIError,
    BadAdapterName,
    ServeInputError,
    adapter_error,
    client_error,
    engine_error_status,
    engine_outage,
    engine_restarting,
    error_body,
    error_response,
    invalid_request_message,
    replica_gone,
    status_and_message,
)


def test_adapter_failures_map_to_400_404_503():
    assert adapter_error(BadAdapterName("invalid adapter name 'a/b'"), "a/b") == (400, "invalid adapter name 'a/b'")
    assert adapter_error(AdapterNotFound("x"), "x") == (404, "no adapter 'x'")
    assert adapter_error(AdapterNotFound("x"), "x", model="base:x") == (
        404, "The model 'base:x' does not exist (no adapter 'x'); GET /v1/models lists what is served")
    assert adapter_error(AdapterInvalid("rank 64 exceeds serve.max_lora_rank=16"), "x@2") == (
        503, "adapter 'x@2' cannot be served: rank 64 exceeds serve.max_lora_rank=16")


def test_openai_bodies_and_retry_after_on_503():
    assert error_body(404, "gone") == {"error": {"message": "gone", "type": "not_found_error", "code": 404}}
    assert error_body(418, "x")["error"]["type"] == "invalid_request_error"
    r = error_response(503, ENGINE_DEAD, retry_after=True)
    assert r.status_code == 503 and r.headers["retry-after"] == str(RETRY_AFTER_S)
    assert json.loads(r.body) == error_body(503, ENGINE_DEAD)
    assert "retry-after" not in error_response(404, "no", retry_after=True).headers
    assert "retry-after" not in error_response(503, "source down").headers
    e = engine_restarting()
    assert (e.status_code, e.detail, e.headers) == (503, ENGINE_DEAD, {"Retry-After": str(RETRY_AFTER_S)})
    assert status_and_message(e) == (503, ENGINE_DEAD) and replica_gone(e)
    assert not replica_gone(APIError(503, "adapter 'x' cannot be served: broken"))


def test_engine_outages_are_told_from_one_adapters_503():
    from ray.exceptions import ActorDiedError

    assert engine_outage(ENGINE_DEAD) and engine_outage(status_and_message(ActorDiedError())[1])
    assert not engine_outage("adapter 'x' cannot be served: bad weights")


def test_engine_body_codes_and_validation_messages():
    assert engine_error_status(404) == 404 and engine_error_status("503") == 503
    assert engine_error_status("BadRequestError") == 400 and engine_error_status(None) == 400
    assert invalid_request_message([{"type": "json_invalid", "ctx": {"error": "Expecting value"}}]) == (
        "request body is not valid JSON (Expecting value)")
    assert invalid_request_message([{"type": "missing", "loc": ("body", "prompt"), "msg": "Field required"},
                                    {"type": "int_parsing", "loc": ("body",), "msg": "bad"}]) == (
        "prompt: Field required; body: bad")
    assert invalid_request_message([]) == "invalid request"
    wrapped = ("body", "response_format", "function-wrap[__log_extra_fields__()]", "type")
    # pydantic's validator step dropped from the path, a repeated error said once
    twice = [{"type": "literal_error", "loc": wrapped, "msg": "Input should be 'text'"}] * 2
    assert invalid_request_message(twice) == "response_format.type: Input should be 'text'"


def test_vllm_request_validator_refusals_name_the_parameter():
    """vLLM's validators raise VLLMClientError subclasses carrying `parameter` (read by attribute: no vLLM here)."""

    class VLLMValidationError(Exception):
        def __init__(self, message: str, parameter: str | None = None):
            super().__init__(message)
            self.parameter = parameter

        def __str__(self) -> str:  # vLLM's appends "(parameter=..., value=...)"
            return f"{self.args[0]} (parameter={self.parameter})"

    class VLLMNotFoundError(Exception):
        pass

    assert client_error(VLLMValidationError("when using `top_logprobs`, `logprobs` must be set to true.",
                                            "top_logprobs")) == (
        400, "top_logprobs: when using `top_logprobs`, `logprobs` must be set to true.")
    assert client_error(VLLMValidationError("n must be at least 1")) == (400, "n must be at least 1")
    assert client_error(VLLMNotFoundError("no such thing")) == (404, "no such thing")


def test_serve_input_errors_are_user_errors():
    """A base or adapter that cannot be served is a UserError (the CLI exits 2) and stays a ValueError."""
    assert issubclass(ServeInputError, UserError) and issubclass(ServeInputError, ValueError)


def test_validate_adapters_raises_a_user_error_naming_the_adapter(tmp_path):
    from serve.app import validate_adapters

    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 64}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    cfg = ServeConfig()
    for adapters, match in [({"big": str(folder)}, "'big': rank 64 exceeds"), ({"a@1": str(folder)}, "'a@1'"),
                            ({"../x": str(folder)}, r"\.\./x"), ({"base": str(folder)}, "alias")]:
        with pytest.raises(ServeInputError, match=match):
            validate_adapters(adapters, cfg)


def test_the_lora_rank_list_is_vllms_and_messages_name_it():
    assert VLLM_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    assert lora_ranks() == "8, 16, 32, 64, 128, 256, 320, 512"
    assert lora_ranks(64) == "128, 256, 320, 512"
    with pytest.raises(ValueError, match="max_lora_rank must be one of"):
        ServeConfig(max_lora_rank=24)
