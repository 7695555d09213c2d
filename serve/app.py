"""Ray Serve over vLLM's AsyncLLM: one base model plus LoRA adapters behind an OpenAI-compatible HTTP API.

    cd /work/main && .venv/bin/pytest tests/integration/test_serve.py -x -q -s   # tiny CPU variant, end to end

    import ray; from serve import ServeConfig, start
    ray.init(); url = start(ServeConfig(port=8000), "/path/to/base-hf-folder", {"city": "/path/to/adapter"})
    # then: openai.OpenAI(base_url=url, api_key="x").completions.create(model="base:city", prompt="...")

`build_app` validates every adapter in the driver (before anything starts) and returns the Serve application;
`start` runs it and waits for GET /health; `shutdown` removes it. vLLM is imported only inside the replica.
(ray.serve.llm is not used: its dynamic LoRA loading rejects local folders, and ray[llm] pins another vLLM.)
"""

from __future__ import annotations

import hmac
import json
import os
import re
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.config import ServeConfig
from serve.openai_protocol import (APIError, ChatCompletionRequest, CompletionRequest, chunk, completion_response,
                                   error_body, model_card, new_id, resolve_model, sse, usage)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# ---------------------------------------------------------------- driver side: validate, build, start, stop

def validate_adapters(adapters: dict[str, str], cfg: ServeConfig) -> dict[str, str]:
    """Check names and folders before a replica spends a minute starting; return name -> absolute folder."""
    checked = {}
    for name, folder in adapters.items():
        if not ADAPTER_NAME.match(name) or ".." in name:
            raise ValueError(f"adapter {name!r}: names must match {ADAPTER_NAME.pattern} and not contain '..'")
        if name == cfg.model_alias:
            raise ValueError(f"adapter {name!r}: the name is taken by the base model's alias")
        path = Path(folder).expanduser().resolve()
        if not (path / "adapter_config.json").is_file():
            raise ValueError(f"adapter {name!r}: {path} has no adapter_config.json (not a PEFT adapter folder)")
        if not (path / "adapter_model.safetensors").is_file():
            # A .bin is a pickle: loading one runs arbitrary code, so it is refused rather than converted.
            pickles = " (it has adapter_model.bin: re-save with safe_serialization=True)" \
                if (path / "adapter_model.bin").exists() else ""
            raise ValueError(f"adapter {name!r}: {path} has no adapter_model.safetensors{pickles}")
        conf = json.loads((path / "adapter_config.json").read_text())
        if conf.get("use_dora"):
            raise ValueError(f"adapter {name!r}: DoRA adapters cannot be served by vLLM")
        rank = max([int(conf.get("r", 0)), *map(int, (conf.get("rank_pattern") or {}).values())])
        if rank > cfg.max_lora_rank:
            raise ValueError(f"adapter {name!r}: rank {rank} exceeds serve.max_lora_rank={cfg.max_lora_rank}")
        checked[name] = str(path)
    return checked


def engine_env(cfg: ServeConfig) -> dict[str, str]:
    """Env vars vLLM reads at import time, so they must reach the replica before `import vllm`."""
    return {
        "VLLM_HOST_IP": "127.0.0.1",  # else vLLM binds its internal queues to the external address
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(cfg.kv_cache_gb))),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }


def build_app(cfg: ServeConfig, base_model: str, adapters: dict[str, str]) -> serve.Application:
    """The Serve application for one base model and its adapters; raises ValueError naming a bad adapter."""
    checked = validate_adapters(adapters, cfg)
    if not (Path(base_model).expanduser() / "config.json").is_file():
        raise ValueError(f"base model {base_model!r}: not a Hugging Face folder (no config.json)")
    actor_options: dict[str, Any] = {"num_cpus": cfg.replica_cpus, "runtime_env": {"env_vars": engine_env(cfg)}}
    # ServeConfig has no GPU field: a replica takes one GPU exactly when the cluster has GPUs.
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
        actor_options["num_gpus"] = 1
    deployment = LoRAServer.options(num_replicas=cfg.num_replicas, ray_actor_options=actor_options)
    return deployment.bind(cfg, str(Path(base_model).expanduser().resolve()), checked)


def start(cfg: ServeConfig, base_model: str, adapters: dict[str, str], *, name: str = "loraforge") -> str:
    """Run the app on the running Ray cluster and return its OpenAI base URL once GET /health answers 200."""
    application = build_app(cfg, base_model, adapters)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    # serve.run waits for the replicas without a time limit; a thread lets startup_timeout_s bound it.
    failure: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(application, name=name, route_prefix="/", blocking=False)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            failure.append(e)

    thread = threading.Thread(target=deploy, name=f"serve-run-{name}", daemon=True)
    thread.start()
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    root = f"http://{host}:{cfg.port}"
    deadline = time.monotonic() + cfg.startup_timeout_s
    while time.monotonic() < deadline:
        if failure:
            raise RuntimeError(f"serve app {name!r} failed to deploy: {_deploy_message(name)}") from failure[0]
        if not thread.is_alive() and _healthy(root + "/health"):
            return root + "/v1"
        time.sleep(1.0)
    shutdown(name)
    raise TimeoutError(f"serve app {name!r} did not answer GET {root}/health within {cfg.startup_timeout_s:.0f}s")


def _deploy_message(name: str) -> str:
    """serve.run's own error says only "Failed to update the deployments"; the replica's traceback is here."""
    try:
        app_status = serve.status().applications[name]
        return "\n".join([app_status.message, *(d.message for d in app_status.deployments.values() if d.message)])
    except Exception as e:  # noqa: BLE001 - best effort: the controller may already be gone
        return f"(status unavailable: {e})"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def shutdown(name: str = "loraforge") -> None:
    """Delete the app (its replicas shut their engines down) and stop Serve's controller and proxies."""
    try:
        serve.delete(name)
    except Exception:  # noqa: BLE001 - Serve not running or app already gone: nothing to delete
        pass
    serve.shutdown()


# ---------------------------------------------------------------- replica side: the HTTP app over AsyncLLM

app = FastAPI(title="loraforge", docs_url=None, redoc_url=None)


# Everything the deployment class uses must be defined above it: @serve.ingress pickles the class and its
# routes by value at decoration time, so a helper defined further down is missing in the replica.
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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
    """One vLLM engine with every adapter registered; routes OpenAI requests to base or adapter."""

    async def __init__(self, cfg: ServeConfig, base_model: str, adapters: dict[str, str]):
        os.environ.update(engine_env(cfg))  # also set by runtime_env; here in case the replica was reused
        from vllm import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        self.cfg, self.created = cfg, int(time.time())
        # Stable ids from 1 in name order: every replica maps a name to the same id.
        self.loras = {n: LoRARequest(n, i, adapters[n]) for i, n in enumerate(sorted(adapters), start=1)}
        args = AsyncEngineArgs(
            model=base_model, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
            # Kept on with no adapters so adapters can be added at runtime without a restart.
            enable_lora=True, max_lora_rank=cfg.max_lora_rank,
            # vLLM bug (STACK_NOTES): with every slot full, base requests batched with adapter requests
            # get the last slot's adapter. One spare slot avoids it.
            max_loras=max(cfg.max_loras, len(adapters) + 1),
            enforce_eager=not _has_cuda(), gpu_memory_utilization=cfg.gpu_memory_utilization,
            disable_log_stats=True)
        self.engine = AsyncLLM.from_engine_args(args)
        self.tokenizer = self.engine.get_tokenizer()
        for lora in self.loras.values():  # load now: a broken adapter fails the deploy, not a request
            await self.engine.add_lora(lora)

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
        cards = [model_card(alias, self.created)]
        cards += [model_card(f"{alias}:{n}", self.created, parent=alias) for n in sorted(self.loras)]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest, authorization: str | None = Header(None)) -> Any:
        self._authorize(authorization)
        lora = self._lora(req.model)
        ids = req.prompt if isinstance(req.prompt, list) else self.tokenizer.encode(req.prompt)
        return await self._respond(req, ids, lora, default_max_tokens=16, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(self, req: ChatCompletionRequest, authorization: str | None = Header(None)) -> Any:
        self._authorize(authorization)
        lora = self._lora(req.model)
        try:
            text = self.tokenizer.apply_chat_template(req.template_messages(), add_generation_prompt=True,
                                                      tokenize=False)
        except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are the request's fault
            raise APIError(400, f"messages could not be rendered with the chat template: {e}") from e
        # The template already wrote the special tokens; adding more would shift the prompt.
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return await self._respond(req, ids, lora, default_max_tokens=None, chat=True)

    # -------------------------------------------------------------- helpers

    def _authorize(self, authorization: str | None) -> None:
        key = self.cfg.api_key
        if key is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>')")

    def _lora(self, model: str) -> Any:
        name = resolve_model(model, self.cfg.model_alias, set(self.loras))
        return None if name is None else self.loras[name]

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

    async def _respond(self, req: Any, ids: list[int], lora: Any, default_max_tokens: int | None,
                       chat: bool) -> Any:
        if any(not isinstance(i, int) or not 0 <= i < len(self.tokenizer) for i in ids):
            raise APIError(400, "prompt token ids must be integers within the vocabulary")
        params = self._sampling(req, len(ids), default_max_tokens, req.stream)
        rid = new_id("chatcmpl" if chat else "cmpl")
        outputs = self.engine.generate({"prompt_token_ids": ids}, params, rid, lora_request=lora)
        try:
            # The first output is awaited here, before any header is sent, so vLLM's own request checks
            # (ValueError) still become a 400 for streaming requests too.
            first = await anext(outputs)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._stream(first, outputs, rid, req.model, len(ids), chat, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        final = first
        async for final in outputs:  # FINAL_ONLY: the first output is normally the last
            pass
        out = final.outputs[0]
        return completion_response(rid, req.model, out.text, out.finish_reason, ids, out.token_ids, chat=chat,
                                   return_token_ids=req.return_token_ids)

    async def _stream(self, first: Any, outputs: AsyncIterator[Any], rid: str, model: str, prompt_tokens: int,
                      chat: bool, include_usage: bool) -> AsyncIterator[str]:
        """SSE events from DELTA outputs: each RequestOutput carries only the new text and tokens."""
        created, generated = int(time.time()), 0
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
            yield sse(error_body(500, f"generation failed: {e}"))
        finally:
            await outputs.aclose()  # a client that hung up must not keep its request running in the engine
        if include_usage:
            yield chunk(rid, model, created, chat=chat, usage_=usage(prompt_tokens, generated))
        yield sse("[DONE]")

