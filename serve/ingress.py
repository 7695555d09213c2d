"""The HTTP front: Ray's `ray.serve.llm` OpenAiIngress, extended with what it lacks for many adapters.

Ray's ingress parses OpenAI requests, picks the LLMServer deployment by base model and passes `base:adapter`
as Serve's multiplexed model id, so an adapter's requests go to replicas that already hold it. Added here:
- API keys (`Authorization: Bearer`, the scheme in any case), /health open for probes; request caps, CORS and
  the docs as serve.guard rules (closed by default).
- Adapter names: `base:x`, `x`, `x@3`, `x@alias`, validated (no traversal) and resolved to one version in the
  source (an alias moves within `resolve_ttl_s`); unknown -> 404 here, without a hop to an engine replica.
- A/B splits, sticky per caller; `x-loraforge-adapter` names the version that answered, `x-loraforge-replica`
  the engine replica (non-streaming responses).
- Per-adapter, per-version metrics (requests, tokens, latency, status) through Ray's Prometheus export.
- /v1/models lists the base, every adapter the source can serve and every split.
- Failures answered by serve.errors' rule: OpenAI error bodies with the right status (400 for any malformed
  request, where FastAPI says 422; 503 with Retry-After while an engine replica is unavailable).
- Streams metered by their server-sent events (serve.stream).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray.serve.llm.ingress import OpenAiIngress
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

from serve.adapters import SOURCE_TIMEOUT_S, AdapterSource, Resolver, off_loop
from serve.canary import CanaryView
from serve.config import ServeConfig
from serve.errors import (
    CLIENT_CLOSED,
    STREAM_FAILED,
    AdapterNotFound,
    AdapterSourceUnavailable,
    APIError,
    BadAdapterName,
    adapter_error,
    client_error,
    engine_error_status,
    engine_outage,
    error_response,
    invalid_request_message,
    replica_gone,
    status_and_message,
)
from serve.guard import InFlight, bearer_token, check_request, key_matches, secure, unauthorized
from serve.judging import Sampler, answer_text
from serve.metrics import RequestMetrics, tags_for
from serve.openai_protocol import model_card
from serve.ray_llm import (
    NON_STREAMING_RESPONSE_TYPES,
    ErrorResponse,
    _openai_json_wrapper,
    _peek_at_generator,
    init,
    router_request_timeout,
)
from serve.routing import adapter_part, caller_key, route
from serve.server import REPLICA_FIELD
from serve.stream import StreamMeter

ADAPTER_HEADER = "x-loraforge-adapter"  # the artifact that answered: "base" or e.g. "city@4"
REPLICA_HEADER = "x-loraforge-replica"  # which engine replica answered (non-streaming responses)
ROUTER_TIMEOUT_S = 600
# How long a request waits for the adapter source (a registry in a store) before its 503 is serve.adapters'
# SOURCE_TIMEOUT_S (10 s, the engine replicas' too): the call runs in a thread of the source's own pool (off_loop), so
# a store that stopped answering holds neither the event loop, its default executor, base requests nor /health.
logger = logging.getLogger("loraforge.serve")

# The routes served: OpenAI text generation, the model list and a health probe. Ray's ingress also routes
# embeddings, audio, score and tokenize; a LoRA text-generation app leaves those out.
ENDPOINTS = {
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "health": lambda app: app.get("/health"),
}


def fastapi_app(cfg: ServeConfig) -> FastAPI:
    """Ray's ingress app (request ids, HTTP metrics) with OpenAI-shaped 4xx bodies for bad requests: those
    FastAPI's validation refuses and those vLLM's own request validators refuse while the body is parsed (e.g.
    `top_logprobs` without `logprobs`), each message naming the parameter. CORS, /docs and body size follow
    serve.guard.secure: Ray's allow-every-origin CORS is replaced by serve.cors_origins (none: off)."""
    from vllm.exceptions import VLLMClientError

    app = secure(init(), cfg)

    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(400, invalid_request_message(e.errors()))

    async def refused(_: Request, e: VLLMClientError) -> JSONResponse:
        return error_response(*client_error(e))

    app.add_exception_handler(RequestValidationError, invalid)  # replaces Ray's, whose body has no numeric code
    app.add_exception_handler(VLLMClientError, refused)  # else Ray's middleware wraps the message three times
    return app


@dataclass
class Target:
    """What one request runs on: the model id sent to the engine deployment, its header and metric tags."""

    model_id: str
    served: str = "base"
    tags: dict[str, str] = field(default_factory=lambda: tags_for("", None, None))


class LoRAIngress(OpenAiIngress):
    """OpenAiIngress for one base model and its adapters; `cfg` and `source` are the app's."""

    def __init__(self, llm_deployments: dict[str, Any], model_cards: dict[str, Any], *, cfg: ServeConfig,
                 source: AdapterSource, canary: Any = None, judge: Any = None, **kwargs: Any):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self.canary = CanaryView(canary, cfg) if canary is not None else None  # serve.canary's split, polled
        self.judging = Sampler(cfg, judge) if judge is not None else None  # serve.judging: sampled to be judged
        self.cfg, self.source, self.created, self._metrics = cfg, source, int(time.time()), None
        self.resolver = Resolver(source, cfg.resolve_ttl_s)
        self._outage_since: float | None = None  # first engine-unavailable 503 of an ongoing outage
        self.in_flight = InFlight(cfg.limits.max_concurrent_per_key)
        if cfg.api_key is None and cfg.allow_unauthenticated:
            logger.warning("loraforge: serving WITHOUT an API key on %s (serve.allow_unauthenticated): anyone who "
                           "can connect may use the models", cfg.host)

    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def _cards(self, request: Request) -> list[dict[str, Any]]:
        """The base, every adapter the source can serve and every split; 401 without the key, 503 when the
        source cannot be read (a broken registry must not look like an empty one)."""
        self._authorize(request)
        try:
            names = set(await off_loop(self.source.list, timeout_s=SOURCE_TIMEOUT_S)) | set(self.cfg.splits)
        except Exception as e:  # noqa: BLE001 - whatever the source raised, the client sees a 503
            raise APIError(503, e.message if isinstance(e, AdapterSourceUnavailable)
                           else f"adapter source unavailable: {e}") from e
        alias = self.cfg.model_alias
        return [model_card(alias, self.created),
                *(model_card(f"{alias}:{n}", self.created, parent=alias) for n in sorted(names))]

    async def models(self, request: Request) -> Response:  # type: ignore[override]
        try:
            return JSONResponse({"object": "list", "data": await self._cards(request)})
        except APIError as e:
            return error_response(e.status, e.message)

    async def model_data(self, model: str, request: Request) -> Response:  # type: ignore[override]
        try:
            cards = await self._cards(request)
        except APIError as e:
            return error_response(e.status, e.message)
        card = next((c for c in cards if c["id"] in (model, f"{self.cfg.model_alias}:{model}")), None)
        if card is None:
            return error_response(404, f"The model {model!r} does not exist")
        return JSONResponse(card)

    # -------------------------------------------------------------- requests

    def _authorize(self, request: Request | None) -> str | None:
        """The caller's API key (None without one: `Authorization: Bearer <key>`, the scheme in any case); 401
        unless it matches serve.api_key when that is set."""
        given = bearer_token(request.headers.get("authorization") if request is not None else None)
        if not key_matches(given, self.cfg.api_key):
            raise unauthorized()
        return given

    async def _target(self, model: str, caller: str) -> Target:
        """404 unknown, 400 malformed name; the version is pinned here so every replica runs the same one."""
        alias = self.cfg.model_alias
        name = adapter_part(model, alias)
        if name is None:
            return Target(alias, tags=tags_for(alias, None, None))
        ref = route(name, self.canary.merged(self.cfg.splits) if self.canary else self.cfg.splits, caller)
        try:
            res = await off_loop(self.resolver.resolve, ref, timeout_s=SOURCE_TIMEOUT_S,  # no answer: its 503
                                  asked=ref)
        except (BadAdapterName, AdapterNotFound) as e:
            raise APIError(*adapter_error(e, ref, model)) from e
        return Target(f"{alias}:{res.id}", res.id, tags_for(name, res.name, res.version))

    def _record(self, tags: dict[str, str], status: int, t0: float, prompt: int = 0, completion: int = 0,
                **token_times: float | None) -> None:
        if self._metrics is None:
            self._metrics = RequestMetrics.create()
        self._metrics.record(tags, status, time.monotonic() - t0, prompt, completion, **token_times)

    async def _process_llm_request(self, body: Any, call_method: str, raw_request: Request | None = None) -> Response:
        t0, target, caller = time.monotonic(), Target(self.cfg.model_alias), None
        try:
            key = self._authorize(raw_request)
            if not body.model:
                raise APIError(400, "model: field required (the base model's name or '<base>:<adapter>')")
            check_request(body, self.cfg)
            host = raw_request.client.host if raw_request is not None and raw_request.client else None
            who = caller_key(None, key, host)
            self.in_flight.acquire(who)  # 429 when this key has serve.limits.max_concurrent_per_key in flight
            caller = who  # released once the answer (or the stream) ends
            if self.canary is not None:
                await self.canary.refresh()
            target = await self._target(body.model, caller_key(getattr(body, "user", None), key, host))
            sample = self.judging.sample(body, target.tags["adapter"], target.tags["version"],
                                         raw_request.headers if raw_request is not None else None) \
                if self.judging is not None else None
            body.model = target.model_id
            wants_usage = bool(body.stream_options and body.stream_options.include_usage) if body.stream else True
            if body.stream and not wants_usage:  # usage feeds the token metrics; stripped again below
                from vllm.entrypoints.generate.base.protocol import StreamOptions

                body.stream_options = StreamOptions(include_usage=True)
            for attempt in (1, 2):  # a replica that died under the request, before any byte was sent: once more
                try:
                    async with router_request_timeout(ROUTER_TIMEOUT_S):
                        first, gen = await _peek_at_generator(
                            self._get_response(body=body, call_method=call_method, raw_request=raw_request))
                    break
                except Exception as e:  # noqa: BLE001 - retried only when the replica is gone
                    if attempt == 2 or not replica_gone(e):
                        raise
                    logger.warning("loraforge: engine replica gone under a request (%s); sent again once",
                                   type(e).__name__)
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body with its status
            self._release(caller)
            return self._error(target, t0, *status_and_message(e))
        except BaseException:  # cancelled (the client left): the slot is freed all the same
            self._release(caller)
            raise
        head = first[0] if isinstance(first, list) else first
        if isinstance(head, ErrorResponse):
            self._release(caller)
            return self._error(target, t0, engine_error_status(head.error.code), head.error.message)
        self._recovered()
        headers = {ADAPTER_HEADER: target.served}
        if isinstance(head, NON_STREAMING_RESPONSE_TYPES):
            content = head.model_dump()
            if replica := content.pop(REPLICA_FIELD, None):
                headers[REPLICA_HEADER] = replica
            usage = content.get("usage") or {}
            self._release(caller)
            self._record(target.tags, 200, t0, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
            if sample is not None:
                self.judging.answered(sample, answer_text(content))
            return JSONResponse(content=content, headers=headers)
        release = self._release_once(caller)
        events = self._metered(_openai_json_wrapper(gen), target, t0, keep_usage=wants_usage, release=release,
                               sample=sample)
        # The background task frees the caller's slot too when the stream never started (client gone at once).
        return StreamingResponse(events, media_type="text/event-stream", headers=headers,
                                 background=BackgroundTask(release))

    def _release(self, caller: str | None) -> None:
        if caller is not None:
            self.in_flight.release(caller)

    def _release_once(self, caller: str | None) -> Callable[[], None]:
        """A release of the caller's in-flight slot that frees it once however often it is called."""
        done: list[bool] = []

        def release() -> None:
            if not done:
                done.append(True)
                self._release(caller)
        return release

    def _error(self, target: Target, t0: float, status: int, message: str) -> JSONResponse:
        """An OpenAI error body; a 503 says when to retry, and the first one of an outage is logged."""
        self._record(target.tags, status, t0)
        if status == 503 and self._outage_since is None and engine_outage(message):
            self._outage_since = time.monotonic()
            logger.warning("loraforge: engine replica unavailable (%s); answering 503 until it is back", message)
        return error_response(status, message, retry_after=True)

    def _recovered(self) -> None:
        if self._outage_since is not None:
            logger.warning("loraforge: endpoint recovered %.1f s after its first engine-unavailable 503",
                           time.monotonic() - self._outage_since)
            self._outage_since = None

    async def _metered(self, events: AsyncIterator[str], target: Target, t0: float, keep_usage: bool,
                       release: Callable[[], None] = lambda: None,
                       sample: dict[str, Any] | None = None) -> AsyncIterator[str]:
        """The engine replica's SSE events, minus a usage event the client did not ask for (serve.stream); the
        token counts, token times and the stream's outcome go to the metrics when the stream ends, the caller's
        in-flight slot is released, and a sampled request's whole answer goes to the judge (serve.judging)."""
        meter, broke = StreamMeter(keep_usage), False
        if sample is not None:
            meter.text = []
        try:
            async for text in events:
                if out := meter.feed(text):
                    yield out
            if out := meter.close():
                yield out
        except BaseException:
            broke = True
            raise
        finally:
            release()
            # a client that closes once [DONE] has reached it (the server may be cancelled at that last yield, a
            # race with the disconnect) got the whole answer: 200, and a sampled answer still goes to the judge
            status = STREAM_FAILED if meter.failed else 200 if meter.done or not broke else CLIENT_CLOSED
            (prompt, n), first, last = meter.tokens(), meter.first, meter.last
            self._record(target.tags, status, t0, prompt, n, ttft_s=None if first is None else first - t0,
                         tpot_s=(last - first) / (n - 1) if first is not None and last is not None and n > 1 else None)
            if sample is not None and status == 200:
                self.judging.answered(sample, "".join(meter.text or []))
