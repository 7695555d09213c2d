"""The engine replica: Ray's `ray.serve.llm` LLMServer over vLLM, with adapters from an AdapterSource.

Ray's LLMServer already does what an engine replica needs: it starts vLLM's engine and its OpenAI serving
layer, takes Serve's multiplexed model id (`base:city@4`) as the LoRA to run, keeps a per-replica LRU of
adapters (`serve.multiplexed`) that Serve's router uses to send an adapter's requests where it is loaded,
and loads the adapter into vLLM. What it lacks, added here through its own injection points:
- Where adapters come from. Its default loader downloads `<dynamic_lora_loading_path>/<id>` from s3/gs/azure
  only; `SourceLoader` (its `model_downloader`) resolves the id through a registry, an adapter folder or the
  adapters named at start, and validates `adapter_config.json` before vLLM sees the folder.
- Failure isolation: an adapter that fails to validate or load is a 503 for that adapter, remembered for
  `retry_failed_s`, instead of a 500 retried on every request.
- vLLM's full-slot bug (vllm-project/vllm#48421: when every LoRA slot of a batch is filled, base requests in that
  batch get the last slot's adapter): `SlotGate` admits at most `max_loras` adapters into the engine at once
  while the engine has one slot more.

vLLM's own CPU-side LRU (`max_cpu_loras`) holds the weights and loads a new adapter before evicting the least
recently used one; Serve's multiplex LRU above it only caches resolutions and steers routing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator
from functools import partial
from typing import Any

import ray
from fastapi import HTTPException
from ray import serve
from ray.serve.llm import LLMConfig, LLMServer

from serve.adapters import AdapterSource, Resolved, SlotGate, StaticSource, base_identities, off_loop, validate_adapter
from serve.config import ServeConfig
from serve.errors import (
    RETRY_AFTER_S,
    AdapterInvalid,
    AdapterNotFound,
    AdapterSourceUnavailable,
    BadAdapterName,
    adapter_error,
    engine_restarting,
    unservable,
)
from serve.lora_support import support_for
from serve.ray_llm import CallbackBase, DiskMultiplexConfig, LoraModelLoader, global_id_manager
from serve.signals import Recorder, instrument

logger = logging.getLogger("loraforge.serve")
REPLICA_FIELD = "loraforge_replica"  # stamped on non-streaming responses; the ingress moves it to a header


class LocalModelCallback(CallbackBase):
    """Skips ray.serve.llm's node initialization (a Ray task per node, in a new worker process, that "downloads"
    the model) when the model is a folder on this replica's node and the engine's placement group lies on this
    node only: there is nothing to download."""

    async def on_before_node_init(self) -> None:
        source = self.llm_config.model_loading_config.model_source
        here = ray.get_runtime_context().get_node_id()
        pg = self.ctx.placement_group
        nodes = set(ray.util.placement_group_table(pg)["bundles_to_node_id"].values()) if pg else {here}
        if isinstance(source, str) and os.path.isdir(source) and nodes == {here}:
            self.ctx.run_init_node = False


class SourceDown(HTTPException):
    """The adapter source (a registry in a store) did not answer or could not be read: 503 with Retry-After, for
    the adapters that need it; the replica asks again after RETRY_AFTER_S, not serve.retry_failed_s."""

    def __init__(self, message: str):
        super().__init__(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})


class SourceLoader(LoraModelLoader):
    """LLMServer's `model_downloader`: `base:ref` -> the adapter's folder, validated, never copied.
    HTTP errors carry the status the client gets: 400 malformed name, 404 unknown, 503 unservable or the source
    down. The source is asked in a thread, at most serve.adapters.SOURCE_TIMEOUT_S: a store that died after the
    ingress resolved the name holds neither this replica's event loop nor its base requests and health checks."""

    def __init__(self, source: AdapterSource, cfg: ServeConfig, bases: set[str], support: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.source, self.cfg, self.bases, self.support = source, cfg, bases, support

    def _checked(self, ref: str) -> Resolved:
        """The adapter's folder (a registry in a store pulls it into this node's mirror), validated."""
        resolved = self.source.resolve(ref)
        validate_adapter(resolved.path, max_rank=self.cfg.max_lora_rank, bases=self.bases, support=self.support)
        return resolved

    async def load_model_from_config(self, lora_model_id: str, llm_config: LLMConfig) -> DiskMultiplexConfig:
        ref = lora_model_id.split(":", 1)[1] if ":" in lora_model_id else lora_model_id
        try:
            resolved = await off_loop(self._checked, ref)
        except (BadAdapterName, AdapterNotFound, AdapterInvalid) as e:
            raise HTTPException(*adapter_error(e, ref)) from e
        except AdapterSourceUnavailable as e:
            raise SourceDown(f"adapter {ref!r}: {e.message}") from e
        return DiskMultiplexConfig(model_id=lora_model_id, max_total_tokens=None, local_path=resolved.path,
                                   lora_assigned_int_id=global_id_manager.next())


class LoRAServer(LLMServer):
    """LLMServer with adapters from `source`; the adapters named at start load before the replica is ready."""

    async def __init__(self, llm_config: LLMConfig, *, cfg: ServeConfig, source: AdapterSource,
                       base_model: str, canary: Any = None):
        self.cfg, self.gate, self._failed, self._locks = cfg, SlotGate(cfg.max_loras), {}, {}
        self._dead_since: float | None = None
        self.replica = serve.get_replica_context().replica_id.unique_id
        bases = base_identities(base_model, cfg.base_model_names)
        await super().__init__(llm_config, model_downloader=partial(SourceLoader, source, cfg, bases,
                                                                    support_for(base_model)))
        if cfg.signals.enabled:  # quality signals of every answer (serve.signals), canaried ones to the controller
            instrument(self.engine._engine_client, cfg.signals.top_k, Recorder(canary, cfg.canary, cfg.registry),
                       cfg.signals.sample_rate)
        # A broken adapter named in the config fails the deploy, not a request later.
        statics = [s for s in getattr(source, "sources", [source]) if isinstance(s, StaticSource)]
        for name in [n for s in statics for n in s.list()][:cfg.adapter_cache_size]:
            await self._resolve(f"{cfg.model_alias}:{name}")

    async def _resolve(self, model_id: str) -> None:
        """Validate and load one adapter into the engine; a failure is remembered and answered with 503.
        One load per adapter at a time: LLMServer checks "already loaded?" before an await, so concurrent first
        requests would each ask vLLM to load it, and vLLM refuses the second as a duplicate."""
        async with self._locks.setdefault(model_id, asyncio.Lock()):
            failed = self._failed.get(model_id)  # (until when, message)
            if failed and time.monotonic() < failed[0]:
                raise HTTPException(503, failed[1], headers={"Retry-After": str(RETRY_AFTER_S)})
            try:
                await self.engine.resolve_lora(await self._load_model(model_id))
            except HTTPException as e:
                if e.status_code == 503:  # a store that is down is asked again sooner than a broken adapter
                    hold = RETRY_AFTER_S if isinstance(e, SourceDown) else self.cfg.retry_failed_s
                    self._failed[model_id] = (time.monotonic() + hold, str(e.detail))
                raise
            except Exception as e:  # noqa: BLE001 - vLLM refused the weights: this adapter only is unavailable
                message = unservable(model_id.split(":", 1)[-1], e)
                self._failed[model_id] = (time.monotonic() + self.cfg.retry_failed_s, message)
                raise HTTPException(503, message, headers={"Retry-After": str(RETRY_AFTER_S)}) from e
            self._failed.pop(model_id, None)

    # -- an engine death is a 503, not a 500, and fails the health check at once ----------------------------------
    def _engine_dead(self) -> bool:
        """vLLM's engine core (a subprocess of this replica) is gone: AsyncLLM marks itself errored."""
        if self._dead_since is None and getattr(getattr(self.engine, "_engine_client", None), "errored", False):
            self._dead_since = time.monotonic()
            logger.error("loraforge: engine core of replica %s died; answering 503 (Retry-After %d s) until Serve "
                         "replaces the replica", self.replica, RETRY_AFTER_S)
        return self._dead_since is not None

    async def check_health(self) -> None:
        if self._engine_dead():
            raise RuntimeError(f"engine core died {time.monotonic() - self._dead_since:.0f} s ago")
        await super().check_health()

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        if model_id := serve.get_multiplexed_model_id():
            await self._resolve(model_id)

    async def _run_request(self, request: Any, *, engine_method: str, batch_output_stream: bool = False,
                           raw_request_info: Any = None) -> AsyncGenerator[Any, None]:
        if self._engine_dead():
            raise engine_restarting()
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.gate.acquire(model_id)
        try:
            stream = await super()._run_request(request, engine_method=engine_method,
                                                batch_output_stream=batch_output_stream,
                                                raw_request_info=raw_request_info)
        except BaseException as e:
            if model_id:
                await self.gate.release(model_id)
            if self._engine_dead():
                raise engine_restarting() from e
            raise
        return self._stamped(stream, model_id)

    async def _stamped(self, stream: AsyncGenerator[Any, None], model_id: str) -> AsyncGenerator[Any, None]:
        """Pass the engine's output through; name this replica on a whole response; free the slot at the end."""
        try:
            async for item in stream:
                if getattr(item, "usage", None) is not None:  # a whole response (stream chunks come as lists)
                    setattr(item, REPLICA_FIELD, self.replica)  # vLLM's response models allow extra fields
                elif getattr(item, "error", None) is not None and self._engine_dead():
                    raise engine_restarting()  # vLLM's 500 "EngineCore encountered an issue"
                yield item
        except HTTPException:
            raise
        except Exception as e:
            if self._engine_dead():
                raise engine_restarting() from e
            raise
        finally:
            if model_id:
                await self.gate.release(model_id)
