"""Where adapters come from and whether they can be served: sources, resolution, validation, the slot gate.

Pure (the standard library and pipelines.artifacts): no Ray, no vLLM, so all of it is unit-tested in
milliseconds. The ingress resolves names with these sources; each engine replica resolves and validates again
before vLLM loads a folder (serve.server).

A source answers two questions: "which folder is `ref`?" (`resolve`) and "what can you serve?" (`list`).
Requests name an adapter as `name`, `name@3` or `name@production`, in the registry's grammar
(pipelines.artifacts.registry.parse_ref), checked before a name reaches any filesystem; every resolved folder
must sit inside the source's root (no traversal). The errors raised here, and the status each is answered with,
are serve.errors'.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from pipelines.artifacts.adapter_check import check_adapter_weights
from pipelines.artifacts.registry import NAME, NAME_PATTERN, Registry, RegistryCorrupt, RegistryError
from pipelines.artifacts.registry import parse_ref as parse_registry_ref
from pipelines.artifacts.storage import StorageError
from serve.errors import AdapterInvalid, AdapterNotFound, AdapterSourceUnavailable, BadAdapterName
from serve.lora_support import LoraSupport

__all__ = ["AdapterInvalid", "AdapterNotFound", "AdapterSourceUnavailable", "BadAdapterName", "Resolved",
           "AdapterSource", "parse_ref", "StaticSource", "FolderSource", "RegistrySource", "ChainSource",
           "base_identities", "validate_adapter", "Resolver", "SlotGate", "SUPPORTED_MODULES", "SOURCE_TIMEOUT_S",
           "off_loop"]

# How long a request waits for the adapter source (a registry in a store) before its 503. The call runs in a thread
# (off_loop), so a store that stopped answering holds neither the event loop nor base requests and /health.
SOURCE_TIMEOUT_S = 10
# Threads of their own for source calls: calls stuck on a dead store cannot starve the loop's default executor (which
# Ray and vLLM use); a queued call whose request gave up is dropped before it runs.
_SOURCE_CALLS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="loraforge-adapter-source")

# Last name components of the linear layers vLLM puts a LoRA on in the decoder families we serve, for an adapter
# whose base is not known here (serve.lora_support.LoraSupport, read from vLLM for the base, decides otherwise).
# Compared by the last component, as vLLM compares an adapter's modules: GPT-2's `attn.c_proj` is a c_proj. An
# adapter on anything else (embeddings, norms, a classifier head) would fail inside the engine.
SUPPORTED_MODULES = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
    "c_attn", "c_proj", "c_fc", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h",
    "fc1", "fc2", "w1", "w2", "w3", "out_proj", "Wqkv"})


@dataclass(frozen=True)
class Resolved:
    """A reference pinned to one artifact: `id` is stable per version (`name@3`), `path` its folder."""

    id: str
    path: str
    name: str
    version: str | None = None


class AdapterSource(Protocol):
    def resolve(self, ref: str) -> Resolved: ...
    def list(self) -> list[str]: ...


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split `name@tag` (the registry's grammar); anything else (slashes, '..', spaces) is BadAdapterName."""
    try:
        return parse_registry_ref(ref)
    except RegistryError:
        raise BadAdapterName(f"invalid adapter name {ref!r}: use {NAME_PATTERN} optionally followed by @version "
                             "or @alias") from None


def _inside(root: Path, path: Path) -> bool:
    return path == root or root in path.parents


class StaticSource:
    """A fixed name -> folder map: what `start(cfg, base, adapters)` serves. Versions are not supported."""

    def __init__(self, adapters: dict[str, str]):
        self.adapters = dict(adapters)

    def resolve(self, ref: str) -> Resolved:
        name, tag = parse_ref(ref)
        if tag is not None or name not in self.adapters:
            raise AdapterNotFound(ref)
        return Resolved(name, self.adapters[name], name)

    def list(self) -> list[str]:
        return sorted(self.adapters)


class FolderSource:
    """Every `<root>/<name>/` holding adapter_config.json: adapters dropped in are servable at once."""

    def __init__(self, root: str):
        self.root = Path(root).expanduser().resolve()

    def resolve(self, ref: str) -> Resolved:
        name, tag = parse_ref(ref)
        path = (self.root / name).resolve()  # resolve() follows symlinks: a link out of root is refused
        if tag is not None or not _inside(self.root, path) or not (path / "adapter_config.json").is_file():
            raise AdapterNotFound(ref)
        return Resolved(name, str(path), name)

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if NAME.fullmatch(p.name) and (p / "adapter_config.json").is_file())


class RegistrySource:
    """Adapters from pipelines.artifacts.registry (versions and aliases)."""

    def __init__(self, root: str):
        self.root = str(root) if "://" in str(root) else str(Path(root).expanduser().resolve())  # s3://: a store
        self._registry: Any = None

    def _reg(self) -> Any:
        if self._registry is None:
            self._registry = Registry(self.root)
        return self._registry

    def resolve(self, ref: str) -> Resolved:
        parse_ref(ref)
        try:
            art = self._reg().resolve(ref)
        except RegistryCorrupt as e:  # a broken registry must not look like an unknown name (404)
            raise AdapterSourceUnavailable(f"adapter registry unavailable for {ref!r}: {e}") from e
        except RegistryError as e:  # the registry's "no such name/version/alias"
            raise AdapterNotFound(ref) from e
        except (OSError, StorageError) as e:  # a store that stopped answering: the source, not the name
            raise AdapterSourceUnavailable(
                f"adapter registry unavailable for {ref!r}: {str(e).splitlines()[0][:300]}") from e
        if "adapter" not in str(getattr(art, "kind", "adapter")):
            raise AdapterNotFound(f"{ref} is a {art.kind} artifact, not an adapter")
        path = Path(art.path).expanduser().resolve()
        if not _inside(Path(self._reg().root).resolve(), path):  # the registry's folder (a store's: its mirror)
            raise AdapterInvalid(f"{ref}: registry entry points outside the registry ({path})")
        return Resolved(f"{art.name}@{art.version}", str(path), str(art.name), str(art.version))

    def list(self) -> list[str]:
        """Every adapter name, and `name@alias` for each of its aliases (versions are addressable, not listed)."""
        names: list[str] = []
        for row in self._reg().list():  # rows: {"name", "kind", "versions", "latest", "aliases"}
            if "adapter" in str(row.get("kind", "")):
                names += [row["name"], *(f"{row['name']}@{a}" for a in row.get("aliases") or {})]
        return sorted(names)


class ChainSource:
    """First source that knows the name wins: static adapters from the config, then the registry."""

    def __init__(self, sources: Iterable[AdapterSource]):
        self.sources = list(sources)

    def resolve(self, ref: str) -> Resolved:
        for source in self.sources:
            try:
                return source.resolve(ref)
            except AdapterNotFound:
                continue
        raise AdapterNotFound(ref)

    def list(self) -> list[str]:
        return sorted({n for s in self.sources for n in s.list()})


# ---------------------------------------------------------------- validation before exposing


def base_identities(base_dir: str, extra: Iterable[str] = ()) -> set[str]:
    """Names an adapter's base_model_name_or_path may carry for this base: its folder, the folder's recorded
    origin (config.json `_name_or_path`, the manifest's inputs, e.g. the base a merged/int8 model came from)."""
    ids = {str(Path(base_dir).expanduser().resolve()), *extra}
    base = Path(base_dir)
    for doc_name, keys in (("config.json", ("_name_or_path",)), ("manifest.json", ())):
        try:
            doc = json.loads((base / doc_name).read_text())
        except (OSError, ValueError):
            continue
        ids.update(str(doc[k]) for k in keys if doc.get(k))
        ids.update(str(v.get("path")) for v in (doc.get("inputs") or {}).values() if isinstance(v, dict))
    return {_norm(i) for i in ids if i}


def _norm(ident: str) -> str:
    p = Path(ident).expanduser()
    return str(p.resolve()) if p.exists() else ident.rstrip("/")


def validate_adapter(path: str, *, max_rank: int, bases: set[str] | None,
                     support: LoraSupport | None = None) -> dict[str, Any]:
    """Refuse what vLLM cannot serve, or would serve wrongly, before the adapter is exposed; return its config.
    support: vLLM's LoRA support for the served base (serve.lora_support.LoraSupport): an architecture without
    LoRA refuses every adapter, and target modules are checked against that base's LoRA layers; None: against
    SUPPORTED_MODULES."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise AdapterInvalid(f"{folder} has no adapter_config.json (not a PEFT adapter folder)")
    if not (folder / "adapter_model.safetensors").is_file():
        # A .bin is a pickle: loading one runs arbitrary code, so it is refused rather than converted.
        hint = " (it has adapter_model.bin: re-save with safe_serialization=True)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise AdapterInvalid(f"{folder} has no adapter_model.safetensors{hint}")
    try:
        conf = json.loads((folder / "adapter_config.json").read_text())
    except ValueError as e:
        raise AdapterInvalid(f"{folder}/adapter_config.json is not JSON: {e}") from e
    if conf.get("use_dora"):
        raise AdapterInvalid("DoRA adapters cannot be served by vLLM")
    if str(conf.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterInvalid(f"peft_type {conf.get('peft_type')!r} is not LoRA")
    rank = max([int(conf.get("r", 0)), *map(int, (conf.get("rank_pattern") or {}).values())])
    if rank > max_rank:
        raise AdapterInvalid(f"rank {rank} exceeds serve.max_lora_rank={max_rank}")
    targets = conf.get("target_modules") or []
    if support is not None and not support.supported:
        raise AdapterInvalid(support.refusal())
    # A string is a regex or "all-linear": only the engine can expand it, so it is checked at load instead.
    if isinstance(targets, list):
        if support is not None and (bad := support.unserved(targets)):
            raise AdapterInvalid(f"target modules {bad} are not LoRA layers vLLM {support.vllm_version} serves on "
                                 f"{support.architecture} (those are {', '.join(sorted(support.modules))}): "
                                 "retrain with lora.target_modules=all-linear, attention or mlp")
        if support is None and (bad := sorted({t for t in targets if str(t).rsplit(".", 1)[-1]
                                               not in SUPPORTED_MODULES})):
            raise AdapterInvalid(f"target modules {bad} are not supported by vLLM's LoRA layers")
    if conf.get("modules_to_save"):
        raise AdapterInvalid(f"modules_to_save {conf['modules_to_save']} (fully trained layers) cannot be served")
    declared = conf.get("base_model_name_or_path")
    if bases is not None and declared and _norm(str(declared)) not in bases:
        raise AdapterInvalid(f"trained on base {declared!r}, but this app serves {sorted(bases)[0]!r}")
    check_adapter_weights(folder, conf, bases=bases, error=AdapterInvalid)  # tensor headers vs config and base
    return conf


# ---------------------------------------------------------------- resolution with a short memory


async def off_loop(fn: Callable[..., Any], *args: Any, timeout_s: float | None = None,
                   asked: str | None = None) -> Any:
    """`fn(*args)` (a source's resolve, validation, list) in a thread, awaited at most `timeout_s` (default
    SOURCE_TIMEOUT_S); no answer by then is AdapterSourceUnavailable (503), naming `asked` (the adapter reference)
    when given. What fn raises propagates."""
    limit = SOURCE_TIMEOUT_S if timeout_s is None else timeout_s
    future = asyncio.get_running_loop().run_in_executor(_SOURCE_CALLS, partial(fn, *args))
    try:
        return await asyncio.wait_for(future, limit)
    except asyncio.TimeoutError:
        named = f" for {asked!r}" if asked else ""
        raise AdapterSourceUnavailable(f"adapter source unavailable{named}: no answer within {limit:g} s") from None


class Resolver:
    """`source.resolve` with hits kept for `ttl_s`: an alias moved by `promote` is seen within that time, and
    misses are never kept, so an adapter registered while serving is found on the next request."""

    def __init__(self, source: AdapterSource, ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.source, self.ttl_s, self._clock = source, ttl_s, clock
        self._hits: dict[str, tuple[float, Resolved]] = {}

    def resolve(self, ref: str) -> Resolved:
        hit = self._hits.get(ref)
        if hit and self._clock() - hit[0] < self.ttl_s:
            return hit[1]
        res = self.source.resolve(ref)  # AdapterNotFound / BadAdapterName propagate, uncached
        self._hits[ref] = (self._clock(), res)
        return res


class SlotGate:
    """At most `slots` distinct adapters in flight at once. vLLM bug (vllm-project/vllm#48421): when every LoRA
    slot of a batch is filled, base requests in that batch get the last slot's adapter. The engine gets one
    slot more than this gate admits, so the batch can never fill all of them."""

    def __init__(self, slots: int):
        self.slots = slots
        self.active: dict[Any, int] = {}  # adapter (model id) -> requests in flight
        self._cond = asyncio.Condition()

    async def acquire(self, lora_id: Any) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: lora_id in self.active or len(self.active) < self.slots)
            self.active[lora_id] = self.active.get(lora_id, 0) + 1

    async def release(self, lora_id: Any) -> None:
        async with self._cond:
            self.active[lora_id] -= 1
            if not self.active[lora_id]:
                del self.active[lora_id]
                self._cond.notify_all()
