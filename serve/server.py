"""The replica: a FastAPI app over one vLLM AsyncLLM engine, with adapters resolved, validated and loaded on
first use from an AdapterSource (serve.adapters), A/B splits (serve.routing) and metrics (serve.metrics).

vLLM is imported only inside the replica. Driver-side helpers (build_app, start, shutdown) are in serve.app.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.adapters import (AdapterCache, AdapterNotFound, AdapterSource, AdapterUnavailable, BadAdapterName,
                            SlotGate, StaticSource, base_identities, validate_adapter)
from serve.config import ServeConfig
from serve.metrics import RequestMetrics, tags_for
from serve.openai_protocol import (APIError, ChatCompletionRequest, CompletionRequest, chunk, completion_response,
                                   error_body, model_card, new_id, sse, usage)
from serve.routing import adapter_part, caller_key, route

ADAPTER_HEADER = "x-loraforge-adapter"  # the artifact that answered: "base" or e.g. "city@4"
REPLICA_HEADER = "x-loraforge-replica"  # which replica answered: for debugging and the autoscaling test


def engine_env(cfg: ServeConfig) -> dict[str, str]:
    """Env vars vLLM reads at import time, so they must reach the replica before `import vllm`."""
    return {
        "VLLM_HOST_IP": "127.0.0.1",  # else vLLM binds its internal queues to the external address
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(cfg.kv_cache_gb))),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }


app = FastAPI(title="loraforge", docs_url=None, redoc_url=None)


# Everything the deployment class uses must be defined above it: @serve.ingress pickles the class and its
# routes by value at decoration time, so a helper defined further down is missing in the replica.
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class Target:
    """What one request runs on: no LoRA (base) or a loaded adapter, plus its metric tags and header."""

    lora: Any = None
    served: str = "base"
    tags: dict[str, str] = field(default_factory=lambda: tags_for("", None, None))


# Handlers are registered before @serve.ingress below, which freezes a copy of the app.
@app.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message), status_code=e.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    # Unknown paths and wrong methods keep their status but get the OpenAI error shape clients parse.
    return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code, headers=e.headers)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    # FastAPI answers 422; OpenAI clients expect 400 for any malformed request (bad JSON included).
    parts = []
    for err in e.errors():
        if err.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
        else:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {err.get('msg')}")
    return JSONResponse(error_body(400, "; ".join(parts) or "invalid request"), status_code=400)


@serve.deployment(name="LoRAServer", max_ongoing_requests=64, health_check_period_s=10,
                  health_check_timeout_s=30)
@serve.ingress(app)
class LoRAServer:
    """One vLLM engine; adapters come from `source` on first use and live in a per-replica LRU."""

    async def __init__(self, cfg: ServeConfig, base_model: str, source: AdapterSource):
        os.environ.update(engine_env(cfg))  # also set by runtime_env; here in case the replica was reused
        from vllm import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        self.cfg, self.source, self.created, self._metrics = cfg, source, int(time.time()), None
        self.replica = serve.get_replica_context().replica_id.unique_id
        args = AsyncEngineArgs(
            model=base_model, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
            enable_lora=True, max_lora_rank=cfg.max_lora_rank,
            # One slot more than the gate admits (see SlotGate: vLLM's full-slot bug); the CPU cache one more
            # than ours, so our load-before-evict never makes vLLM evict on its own.
            max_loras=cfg.max_loras + 1, max_cpu_loras=cfg.adapter_cache_size + 1,
            enforce_eager=not _has_cuda(), gpu_memory_utilization=cfg.gpu_memory_utilization,
            disable_log_stats=True)
        self.engine = AsyncLLM.from_engine_args(args)
        self.tokenizer = self.engine.get_tokenizer()
        bases = base_identities(base_model, cfg.base_model_names)
        self.gate = SlotGate(cfg.max_loras)
        self.cache = AdapterCache(
            source, cfg.adapter_cache_size,
            validate=lambda path: validate_adapter(path, max_rank=cfg.max_lora_rank, bases=bases),
            load=self.engine.add_lora, unload=self.engine.remove_lora,
            make_request=lambda name, int_id, path: LoRARequest(name, int_id, path),
            resolve_ttl_s=cfg.resolve_ttl_s, retry_after_s=cfg.retry_failed_s)
        # Adapters named in the config load now: a broken one fails the deploy, not a request later.
        statics = [s for s in getattr(source, "sources", [source]) if isinstance(s, StaticSource)]
        for name in [n for s in statics for n in s.list()][:cfg.adapter_cache_size]:
            await self.cache.get(name)

    def __del__(self):
        if (engine := getattr(self, "engine", None)) is not None:
            engine.shutdown()

    async def check_health(self) -> None:
        """Serve's periodic probe: a dead engine marks the replica unhealthy so Serve replaces it."""
        await self.engine.check_health()

    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            await self.engine.check_health()
        except Exception as e:  # noqa: BLE001 - any engine failure means "not healthy"
            return JSONResponse(error_body(503, f"engine unhealthy: {e}"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self, authorization: str | None = Header(None)) -> dict[str, Any]:
        self._authorize(authorization)
        alias = self.cfg.model_alias
        try:
            names = set(self.source.list()) | set(self.cfg.splits)
        except Exception as e:  # noqa: BLE001 - a broken registry must not hide the base model
            raise APIError(503, f"adapter source unavailable: {e}") from e
        cards = [model_card(alias, self.created)]
        cards += [model_card(f"{alias}:{n}", self.created, parent=alias) for n in sorted(names)]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest, request: Request,
                          authorization: str | None = Header(None)) -> Any:
        return await self._handle(req, request, authorization, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(self, req: ChatCompletionRequest, request: Request,
                   authorization: str | None = Header(None)) -> Any:
        return await self._handle(req, request, authorization, chat=True)

    # -------------------------------------------------------------- helpers

    def _authorize(self, authorization: str | None) -> None:
        key = self.cfg.api_key
        if key is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>')")

    def _record(self, tags: dict[str, str], status: int, t0: float, prompt: int = 0, completion: int = 0) -> None:
        if self._metrics is None:
            self._metrics = RequestMetrics.create()
        self._metrics.record(tags, status, time.monotonic() - t0, prompt, completion)

    async def _handle(self, req: Any, request: Request, authorization: str | None, chat: bool) -> Any:
        t0, target = time.monotonic(), Target()
        try:
            self._authorize(authorization)
            api_key = (authorization or "").removeprefix("Bearer ").strip() or None
            caller = caller_key(req.user, api_key, request.client.host if request.client else None)
            target = await self._target(req.model, caller)
            ids = self._chat_ids(req) if chat else \
                req.prompt if isinstance(req.prompt, list) else self.tokenizer.encode(req.prompt)
            return await self._respond(req, ids, target, t0, default_max_tokens=None if chat else 16, chat=chat)
        except APIError as e:
            self._record(target.tags, e.status, t0)
            raise

    async def _target(self, model: str, caller: str) -> Target:
        """404 unknown, 400 malformed name, 503 an adapter that cannot be loaded (others keep serving)."""
        name = adapter_part(model, self.cfg.model_alias)
        if name is None:
            return Target(tags=tags_for(self.cfg.model_alias, None, None))
        ref = route(name, self.cfg.splits, caller)
        try:
            loaded = await self.cache.get(ref)
        except BadAdapterName as e:
            raise APIError(400, str(e)) from e
        except AdapterNotFound as e:
            raise APIError(404, f"The model {model!r} does not exist (no adapter {ref!r}); GET /v1/models "
                                f"lists what is served") from e
        except AdapterUnavailable as e:
            raise APIError(503, str(e)) from e
        res = loaded.resolved
        return Target(loaded.request, res.id, tags_for(name, res.name, res.version))

    def _chat_ids(self, req: ChatCompletionRequest) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(req.template_messages(), add_generation_prompt=True,
                                                      tokenize=False)
        except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are the request's fault
            raise APIError(400, f"messages could not be rendered with the chat template: {e}") from e
        # The template already wrote the special tokens; adding more would shift the prompt.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _sampling(self, req: Any, prompt_len: int, default_max_tokens: int | None, stream: bool) -> Any:
        """SamplingParams for a request; length problems are the client's (400), checked before generating."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        room = self.cfg.max_model_len - prompt_len
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {self.cfg.max_model_len} tokens; "
                                f"the prompt has {prompt_len}.")
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if max_tokens is None:
            max_tokens = min(default_max_tokens or room, room)
        if max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.cfg.max_model_len} tokens; the "
                                f"prompt has {prompt_len} and max_tokens is {max_tokens}.")
        try:
            # eos is a stop token explicitly: ChatML's <|im_end|> must end a chat turn whatever the
            # model's generation_config says.
            return SamplingParams(
                max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=req.stop,
                seed=req.seed, stop_token_ids=[self.tokenizer.eos_token_id],
                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
        except ValueError as e:
            raise APIError(400, str(e)) from e

    async def _respond(self, req: Any, ids: list[int], target: Target, t0: float,
                       default_max_tokens: int | None, chat: bool) -> Any:
        if any(not isinstance(i, int) or not 0 <= i < len(self.tokenizer) for i in ids):
            raise APIError(400, "prompt token ids must be integers within the vocabulary")
        params = self._sampling(req, len(ids), default_max_tokens, req.stream)
        rid, headers = new_id("chatcmpl" if chat else "cmpl"), {ADAPTER_HEADER: target.served, REPLICA_HEADER: self.replica}
        lora_id = target.lora.lora_int_id if target.lora is not None else None
        if lora_id is not None:
            await self.gate.acquire(lora_id)
        streaming = False
        try:
            outputs = self.engine.generate({"prompt_token_ids": ids}, params, rid, lora_request=target.lora)
            try:
                # The first output is awaited here, before any header is sent, so vLLM's own request checks
                # (ValueError) still become a 400 for streaming requests too.
                first = await anext(outputs)
            except ValueError as e:
                raise APIError(400, str(e)) from e
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                events = self._stream(first, outputs, rid, req.model, len(ids), chat, include_usage, target, t0)
                streaming = True  # from here the stream owns the gate slot and the metrics
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            final = first
            async for final in outputs:  # FINAL_ONLY: the first output is normally the last
                pass
        finally:
            if lora_id is not None and not streaming:
                await self.gate.release(lora_id)
        out = final.outputs[0]
        self._record(target.tags, 200, t0, len(ids), len(out.token_ids))
        body = completion_response(rid, req.model, out.text, out.finish_reason, ids, out.token_ids, chat=chat,
                                   return_token_ids=req.return_token_ids)
        return JSONResponse(body, headers=headers)

    async def _stream(self, first: Any, outputs: AsyncIterator[Any], rid: str, model: str, prompt_tokens: int,
                      chat: bool, include_usage: bool, target: Target, t0: float) -> AsyncIterator[str]:
        """SSE events from DELTA outputs: each RequestOutput carries only the new text and tokens."""
        created, generated, status = int(time.time()), 0, 200
        if chat:
            yield chunk(rid, model, created, chat=True, role=True)
        try:
            out = first
            while True:
                delta = out.outputs[0]
                generated += len(delta.token_ids)
                if delta.text or delta.finish_reason:
                    yield chunk(rid, model, created, chat=chat, text=delta.text, finish=delta.finish_reason)
                if out.finished:
                    break
                out = await anext(outputs)
        except Exception as e:  # noqa: BLE001 - headers are sent; the error can only travel in the stream
            status = 500
            yield sse(error_body(500, f"generation failed: {e}"))
        finally:
            await outputs.aclose()  # a client that hung up must not keep its request running in the engine
            if target.lora is not None:
                await self.gate.release(target.lora.lora_int_id)
            self._record(target.tags, status, t0, prompt_tokens, generated)
        if include_usage:
            yield chunk(rid, model, created, chat=chat, usage_=usage(prompt_tokens, generated))
        yield sse("[DONE]")
