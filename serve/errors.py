"""What a failure becomes: an OpenAI error answer with its status for an HTTP client, a user error for the CLI.

The statuses, one rule for the ingress and the engine replicas alike:
- 400 a malformed request or adapter name (where FastAPI would say 422) or a request over a serve.limits cap,
  401 a missing or wrong API key, 404 an unknown model or adapter, 413 a body over serve.limits.max_body_bytes,
  429 with `Retry-After` a key over serve.limits.max_concurrent_per_key;
- 503 with `Retry-After`: an adapter that cannot be served (for that adapter alone, remembered by the replica for
  serve.retry_failed_s), an adapter source that cannot be read, an engine replica that died, is being replaced
  or is full;
- 500 only for a bug, never for anything a client sent; in metrics, 499 for a stream the client left.
An answer's body is `{"error": {"message", "type", "code"}}`, the shape OpenAI clients parse.

Driver side, a base model or adapter that cannot be served raises ServeInputError, a UserError: the CLI prints
the message and exits 2. Pure: Ray, FastAPI and Starlette load inside the functions that need them.
"""

from __future__ import annotations

from typing import Any

from pipelines.schema import UserError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error",
               503: "service_unavailable"}
RETRY_AFTER_S = 5  # what a 503 tells the client to wait; a new CPU replica takes about a minute to load
RETRY_429_S = 1  # what a 429 (serve.limits.max_concurrent_per_key) tells the client: one of its own requests ends
ENGINE_DEAD = "the engine of this replica died; Serve is replacing the replica: retry"
REPLICA_UNAVAILABLE = "engine replica unavailable"
STREAM_FAILED = 500  # the engine failed after a stream's headers were sent
CLIENT_CLOSED = 499  # the client went away before the stream ended (or the stream broke)


class ServeInputError(UserError, ValueError):
    """A base model or adapter given to the app that it cannot serve; the message names it and says why."""


class APIError(Exception):
    """An error the client caused or should see, rendered as an OpenAI error body with its status code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class AdapterNotFound(LookupError):
    """The source has no adapter under this name (HTTP 404)."""


class BadAdapterName(ValueError):
    """The name is not a valid adapter reference, e.g. contains '/' or '..' (HTTP 400)."""


class AdapterInvalid(ValueError):
    """The folder exists but cannot be served: wrong base, rank too large, DoRA, pickle weights (HTTP 503)."""


class AdapterSourceUnavailable(RuntimeError):
    """The source itself cannot be read (e.g. a corrupt registry index): a server problem, never "no such adapter".
    `status` and `message` are what the ingress answers with (status_and_message): HTTP 503."""

    status = 503

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "code": status}}


def error_response(status: int, message: str, *, retry_after: bool = False) -> Any:
    """The JSON answer; with retry_after, a 503 carries `Retry-After: RETRY_AFTER_S` and a 429 `RETRY_429_S`."""
    from starlette.responses import JSONResponse

    wait = {503: RETRY_AFTER_S, 429: RETRY_429_S}.get(status) if retry_after else None
    headers = {"Retry-After": str(wait)} if wait is not None else {}
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def invalid_request_message(errors: list[dict[str, Any]]) -> str:
    """The 400 message for FastAPI's request validation errors: each field and what is wrong with it, once.
    Field paths name the request's fields only: pydantic's validator steps in them (`function-wrap[...]`) go."""
    parts: list[str] = []
    for err in errors:
        if err.get("type") == "json_invalid":
            part = f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})"
        else:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body" and not _validator_step(x)) or "body"
            part = f"{where}: {err.get('msg')}"
        if part not in parts:
            parts.append(part)
    return "; ".join(parts) or "invalid request"


def _validator_step(loc: Any) -> bool:
    """A part of a pydantic error location naming a validator, not a field (e.g. `function-wrap[f()]`)."""
    return isinstance(loc, str) and loc.startswith(("function-", "function_")) and "[" in loc


def client_error(e: BaseException) -> tuple[int, str]:
    """Status and message of a request vLLM's own request validators refused (a `vllm.exceptions.VLLMClientError`
    raised while the body was parsed): 404 for a not-found error, else 400, the message naming the parameter
    first. Read by attribute and class name, so this module needs no vLLM."""
    status = 404 if any(c.__name__.endswith("NotFoundError") for c in type(e).__mro__) else 400
    message = str(e.args[0]) if e.args else str(e)
    parameter = getattr(e, "parameter", None)
    return status, f"{parameter}: {message}" if parameter and not message.startswith(f"{parameter}:") else message


def unservable(ref: str, reason: Any) -> str:
    """The 503 message of an adapter that failed validation or that vLLM refused."""
    return f"adapter {ref!r} cannot be served: {reason}"


def adapter_error(e: BadAdapterName | AdapterNotFound | AdapterInvalid, ref: str,
                  model: str | None = None) -> tuple[int, str]:
    """Status and message for an adapter failure: 400 bad name, 404 unknown (naming the requested `model` when
    given), 503 unservable."""
    if isinstance(e, BadAdapterName):
        return 400, str(e)
    if isinstance(e, AdapterNotFound):
        if model is None:
            return 404, f"no adapter {ref!r}"
        return 404, f"The model {model!r} does not exist (no adapter {ref!r}); GET /v1/models lists what is served"
    return 503, unservable(ref, e)


def engine_error_status(code: Any) -> int:
    """The status of an error the engine answered with in its body (vLLM's ErrorResponse.code): 400 unless it
    is a number."""
    return int(code) if str(code).isdigit() else 400


def engine_restarting() -> Exception:
    """What an engine replica raises while its engine core is gone: 503 with Retry-After."""
    from fastapi import HTTPException

    return HTTPException(503, ENGINE_DEAD, headers={"Retry-After": str(RETRY_AFTER_S)})


def engine_outage(message: str) -> bool:
    """Whether a 503's message says the engine replica is gone (not one adapter or the source)."""
    return ENGINE_DEAD in message or REPLICA_UNAVAILABLE in message


def status_and_message(e: BaseException) -> tuple[int, str]:
    """The status and message of an error raised here, by Ray's ingress or by an engine replica. A replica that
    died or is being replaced is a 503 (the client retries), not a 500."""
    from ray.exceptions import RayActorError  # ActorDiedError and ActorUnavailableError are RayActorErrors
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(e, APIError):
        return e.status, e.message
    if isinstance(e, (RayActorError, BackPressureError, DeploymentUnavailableError)):
        return 503, f"{REPLICA_UNAVAILABLE} ({type(e).__name__}): retry"
    status = getattr(e, "status_code", None) or getattr(e, "status", None)
    message = getattr(e, "detail", None) or getattr(e, "message", None)
    cause = getattr(e, "cause", None)  # a replica's HTTPException arrives wrapped in a RayTaskError
    if status is None and cause is not None:
        return status_and_message(cause)
    if isinstance(status, int) and message:
        return status, str(message)
    return 500, f"internal error: {type(e).__name__}: {e}"


def replica_gone(e: BaseException) -> bool:
    """The engine replica died (its actor, or its engine core) before answering: the request can go elsewhere."""
    from ray.exceptions import RayActorError

    return isinstance(e, RayActorError) or status_and_message(e) == (503, ENGINE_DEAD)
