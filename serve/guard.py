"""What the endpoint lets in: the API key, CORS, /docs, request caps and in-flight requests per key.

The rules ("closed by default"):
- A key is sent as `Authorization: Bearer <key>`, the scheme in any case (RFC 7235); a header without the scheme
  is no key. With serve.api_key set, /v1 requests (checked by the ingress), /docs and /openapi.json (checked here)
  need it; /health never does. serve.docs=false answers the docs 404.
- CORS is off (Ray's ingress allows every origin; that middleware is removed) unless serve.cors_origins lists
  origins, and then only those are allowed.
- A body over serve.limits.max_body_bytes is a 413 before it is parsed; `n`, prompts per completion, messages per
  chat, max_tokens and log-probs over their cap are 400s naming the cap and its key (check_request).
- serve.limits.max_concurrent_per_key: more requests in flight for one key (one client address without a key)
  are 429s with Retry-After (InFlight).
Pure apart from Starlette, imported where the middleware is built: no Ray, no vLLM.
"""

from __future__ import annotations

import hmac
from typing import Any

from serve.config import ServeConfig
from serve.errors import APIError, error_body

DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def bearer_token(header: str | None) -> str | None:
    """The credentials of an `Authorization: Bearer <token>` header, the scheme matched in any case (RFC 7235);
    None for no header, another scheme, or a bare token without the scheme."""
    scheme, _, token = (header or "").strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def key_matches(given: str | None, expected: str | None) -> bool:
    """True when no key is required or `given` is it (compared in constant time)."""
    return expected is None or hmac.compare_digest((given or "").encode(), expected.encode())


def unauthorized() -> APIError:
    return APIError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>')")


def _over(what: str, value: Any, cap: int, key: str) -> APIError:
    return APIError(400, f"{what}={value} exceeds the cap of {cap} (serve.{key})")


def prompt_count(prompt: Any) -> int:
    """How many prompts a completions `prompt` holds: a string or a list of token ids is one, a list of strings
    or of token-id lists is one each."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def check_request(body: Any, cfg: ServeConfig) -> None:
    """Raise APIError(400) naming the cap and its config key when a parsed OpenAI request (vLLM's CompletionRequest
    or ChatCompletionRequest, read by attribute) asks for more than serve.limits allows. Values the engine refuses
    anyway (negative, zero) are left to its own message."""
    lim = cfg.limits
    n = getattr(body, "n", None) or 1
    if n > lim.max_n:
        raise _over("n", n, lim.max_n, "limits.max_n")
    messages = getattr(body, "messages", None)
    if messages is not None and len(messages) > lim.max_messages:
        raise _over("messages", len(messages), lim.max_messages, "limits.max_messages")
    if hasattr(body, "prompt") and (count := prompt_count(body.prompt)) > lim.max_prompts:
        raise _over("prompts", count, lim.max_prompts, "limits.max_prompts")
    cap = cfg.max_tokens()
    key = "limits.max_tokens" if lim.max_tokens is not None else "max_model_len"
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, field, None)
        if value is not None and value > cap:
            raise _over(field, value, cap, key)
    for field in ("logprobs", "top_logprobs", "prompt_logprobs"):
        value = getattr(body, field, None)
        if isinstance(value, bool) or value is None:  # chat's logprobs is a switch; top_logprobs is the count
            continue
        if value > lim.max_logprobs or value == -1:  # -1: the whole vocabulary
            raise _over(field, value, lim.max_logprobs, "limits.max_logprobs")


class InFlight:
    """Requests in flight per caller, capped at `limit` (None: no cap). One per ingress replica, single event loop:
    no lock needed."""

    def __init__(self, limit: int | None):
        self.limit, self.active = limit, {}

    def acquire(self, caller: str) -> None:
        """Count one more request of `caller`; APIError(429) when it already has `limit` in flight."""
        if self.limit is None:
            return
        if self.active.get(caller, 0) >= self.limit:
            raise APIError(429, f"too many requests in flight for this API key (the cap is {self.limit}, "
                                "serve.limits.max_concurrent_per_key): retry when one has finished")
        self.active[caller] = self.active.get(caller, 0) + 1

    def release(self, caller: str) -> None:
        if self.limit is None or caller not in self.active:
            return
        self.active[caller] -= 1
        if not self.active[caller]:
            del self.active[caller]


class Guard:
    """ASGI middleware in front of the ingress app: /docs and /openapi.json behind the key (404 with serve.docs
    off), and request bodies over serve.limits.max_body_bytes refused with 413 before anything parses them."""

    def __init__(self, app: Any, cfg: ServeConfig):
        self.app, self.cfg = app, cfg

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope.get("path") in DOCS_PATHS:
            if not self.cfg.docs:
                return await _send(send, 404, "Not Found (serve.docs is off)")
            if not key_matches(bearer_token(headers.get("authorization")), self.cfg.api_key):
                return await _send(send, 401, unauthorized().message)
        cap = self.cfg.limits.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > cap:
                return await _send(send, 413, _too_large(length, cap))
            return await self.app(scope, receive, send)
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): read up to the cap, then hand the buffered body on.
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > cap:
                return await _send(send, 413, _too_large(f"more than {cap}", cap))
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _too_large(length: str, cap: int) -> str:
    return f"request body of {length} bytes exceeds the cap of {cap} (serve.limits.max_body_bytes)"


async def _send(send: Any, status: int, message: str) -> None:
    import json

    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def secure(app: Any, cfg: ServeConfig) -> Any:
    """`app` (Ray's ingress FastAPI app, middleware not yet built) with Ray's allow-every-origin CORS removed,
    Guard added, and CORS for serve.cors_origins only (outermost, so a preflight is answered before the key check
    and refusals carry the CORS headers)."""
    from fastapi.middleware.cors import CORSMiddleware
    from starlette.middleware.cors import CORSMiddleware as StarletteCORS

    app.user_middleware = [m for m in app.user_middleware if m.cls not in (CORSMiddleware, StarletteCORS)]
    app.add_middleware(Guard, cfg=cfg)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["authorization", "content-type"])
    return app
