"""The slice of the OpenAI HTTP API that loraforge serves: request models, response/chunk builders, errors.

Pure (pydantic only): no Ray, no vLLM, so the shapes can be unit-tested in milliseconds.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               500: "internal_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error the client caused or should see, rendered as an OpenAI error body with its status code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "code": status}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat. Unknown fields are ignored, as clients send many optional ones."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extension (send via extra_body): token ids in each choice, for exact comparisons in tests.
    return_token_ids: bool = False
    # OpenAI's end-user id: the sticky key for A/B splits (serve.routing); never logged or exported.
    user: str | None = Field(None, max_length=256)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        # One sequence per request keeps the response/streaming code simple; clients can send n requests.
        if v != 1:
            raise ValueError(f"only n=1 is supported, got n={v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        return [v] if isinstance(v, str) else v


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] = Field(..., min_length=1)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def template_messages(self) -> list[dict[str, str]]:
        # "developer" is the newer name of "system"; chat templates only know the latter.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(model_id: str, created: int, parent: str | None = None) -> dict[str, Any]:
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "loraforge"}
    if parent is not None:
        card["parent"] = parent
    return card


def completion_response(rid: str, model: str, text: str, finish: str | None, prompt_ids: list[int],
                        token_ids: list[int], *, chat: bool, return_token_ids: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    if return_token_ids:
        choice.update(prompt_token_ids=list(prompt_ids), token_ids=list(token_ids))
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(len(prompt_ids), len(token_ids))}


def chunk(rid: str, model: str, created: int, *, chat: bool, text: str | None = None, role: bool = False,
          finish: str | None = None, usage_: dict[str, int] | None = None) -> str:
    """One SSE event. A usage-only chunk (stream_options.include_usage) has no choices, as OpenAI sends it."""
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created, "model": model}
    if usage_ is not None:
        body.update(choices=[], usage=usage_)
    elif chat:
        delta = {"role": "assistant", "content": ""} if role else {"content": text or ""}
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    else:
        body["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    return sse(body)


def sse(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"
