"""Adapter sources, validation and the per-replica LRU, with a fake engine: no Ray, no vLLM."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from serve.adapters import (AdapterCache, AdapterInvalid, AdapterNotFound, AdapterUnavailable, BadAdapterName,
                            ChainSource, FolderSource, SlotGate, StaticSource, base_identities, parse_ref,
                            validate_adapter)

BASE = "/models/tiny"


def adapter(folder: Path, **conf) -> str:
    folder.mkdir(parents=True)
    doc = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": BASE}
    (folder / "adapter_config.json").write_text(json.dumps({**doc, **conf}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return str(folder)


@pytest.mark.parametrize("ref", ["../etc", "a/b", "/abs", "a..b", "", "x@../y", "a@b@c", "é"])
def test_bad_names_are_refused_before_touching_disk(ref):
    with pytest.raises(BadAdapterName):
        parse_ref(ref)


def test_parse_ref():
    assert parse_ref("city") == ("city", None)
    assert parse_ref("city@3") == ("city", "3")
    assert parse_ref("city@production") == ("city", "production")


def test_folder_source_sees_new_adapters_and_stays_inside_root(tmp_path):
    root = tmp_path / "adapters"
    src = FolderSource(str(root))
    assert src.list() == []
    adapter(root / "a")
    assert src.list() == ["a"] and src.resolve("a").path == str((root / "a").resolve())
    adapter(tmp_path / "outside")
    (root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(AdapterNotFound):
        src.resolve("link")  # a symlink out of the root is not served
    with pytest.raises(AdapterNotFound):
        src.resolve("a@2")  # a plain folder has no versions


def test_chain_source_first_match_wins(tmp_path):
    root = tmp_path / "r"
    adapter(root / "a")
    chain = ChainSource([StaticSource({"a": "/static/a"}), FolderSource(str(root))])
    assert chain.resolve("a").path == "/static/a" and chain.list() == ["a"]
    with pytest.raises(AdapterNotFound):
        chain.resolve("zzz")


def test_validation(tmp_path):
    bases = {BASE}
    assert validate_adapter(adapter(tmp_path / "ok"), max_rank=8, bases=bases)["r"] == 8
    cases = {"dora": ({"use_dora": True}, "DoRA"), "rank": ({"r": 16}, "rank 16 exceeds"),
             "pattern": ({"rank_pattern": {"q_proj": 64}}, "rank 64"),
             "mods": ({"target_modules": ["q_proj", "layernorm"]}, r"\['layernorm'\]"),
             "save": ({"modules_to_save": ["score"]}, "modules_to_save"),
             "base": ({"base_model_name_or_path": "/other"}, "trained on base '/other'"),
             "ia3": ({"peft_type": "IA3"}, "not LoRA")}
    for name, (conf, message) in cases.items():
        with pytest.raises(AdapterInvalid, match=message):
            validate_adapter(adapter(tmp_path / name, **conf), max_rank=8, bases=bases)
    pickled = Path(adapter(tmp_path / "pickled"))
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterInvalid, match="safe_serialization"):
        validate_adapter(str(pickled), max_rank=8, bases=bases)


def test_base_identities_include_the_manifest_origin(tmp_path):
    base = tmp_path / "merged"
    base.mkdir()
    (base / "manifest.json").write_text(json.dumps({"inputs": {"base_model": {"path": BASE, "hash": "x"}}}))
    assert {str(base.resolve()), BASE} <= base_identities(str(base))


class FakeEngine:
    def __init__(self, fail: set[str] = frozenset()):
        self.loaded: dict[int, str] = {}
        self.events: list[str] = []
        self.fail = fail

    async def load(self, req):
        if req.lora_name in self.fail:
            raise RuntimeError("corrupt safetensors")
        self.loaded[req.lora_int_id] = req.lora_name
        self.events.append(f"+{req.lora_name}")
        return True

    async def unload(self, int_id):
        self.events.append(f"-{self.loaded.pop(int_id)}")


def make_cache(source, engine, capacity=2, clock=None, validate=lambda p: None):
    return AdapterCache(source, capacity, validate=validate, load=engine.load, unload=engine.unload,
                        make_request=lambda n, i, p: SimpleNamespace(lora_name=n, lora_int_id=i, lora_path=p),
                        clock=clock or (lambda: 0.0))


def test_lru_loads_the_new_adapter_before_evicting_the_oldest():
    engine = FakeEngine()
    cache = make_cache(StaticSource({n: f"/a/{n}" for n in "abc"}), engine)

    async def go():
        await cache.get("a")
        await cache.get("b")
        await cache.get("a")  # a is now the most recent
        await cache.get("c")
    asyncio.run(go())
    assert engine.events == ["+a", "+b", "+c", "-b"]
    assert sorted(engine.loaded.values()) == ["a", "c"]


def test_concurrent_first_requests_load_once():
    engine = FakeEngine()
    cache = make_cache(StaticSource({"a": "/a"}), engine)

    async def go():
        return await asyncio.gather(*(cache.get("a") for _ in range(5)))
    results = asyncio.run(go())
    assert engine.events == ["+a"] and len({id(r) for r in results}) == 1


def test_failures_are_per_adapter_and_retried_after_a_while():
    now = [0.0]
    engine = FakeEngine(fail={"bad"})
    cache = make_cache(StaticSource({"bad": "/bad", "good": "/good"}), engine, clock=lambda: now[0])
    with pytest.raises(AdapterUnavailable, match="corrupt safetensors"):
        asyncio.run(cache.get("bad"))
    assert asyncio.run(cache.get("good")).resolved.id == "good"
    engine.fail = set()
    with pytest.raises(AdapterUnavailable):  # remembered: not reloaded on every request
        asyncio.run(cache.get("bad"))
    now[0] = 31.0
    assert asyncio.run(cache.get("bad")).resolved.id == "bad"


def test_invalid_adapters_are_never_loaded():
    engine = FakeEngine()

    def validate(path):
        raise AdapterInvalid("rank 128 exceeds serve.max_lora_rank=64")
    cache = make_cache(StaticSource({"big": "/big"}), engine, validate=validate)
    with pytest.raises(AdapterUnavailable, match="rank 128"):
        asyncio.run(cache.get("big"))
    assert engine.events == []


def test_misses_are_not_cached_so_new_adapters_appear(tmp_path):
    engine = FakeEngine()
    cache = make_cache(FolderSource(str(tmp_path)), engine)
    with pytest.raises(AdapterNotFound):
        asyncio.run(cache.get("late"))
    adapter(tmp_path / "late")
    assert asyncio.run(cache.get("late")).resolved.id == "late"


def test_slot_gate_admits_at_most_n_distinct_adapters():
    async def go():
        gate = SlotGate(2)
        await gate.acquire(1)
        await gate.acquire(2)
        await gate.acquire(1)  # an adapter already in flight needs no new slot
        third = asyncio.create_task(gate.acquire(3))
        await asyncio.sleep(0.01)
        assert not third.done()
        await gate.release(2)
        await asyncio.wait_for(third, 1)
        return sorted(gate.active)
    assert asyncio.run(go()) == [1, 3]


def test_registry_source_resolves_versions_and_aliases(tmp_path):
    from pipelines.registry import Registry

    from serve.adapters import RegistrySource

    reg = Registry(tmp_path / "registry")
    lineage = {"base_model": BASE, "base_model_hash": "sha256:x", "dataset_hash": "sha256:y", "config": {"r": 8}}
    src = RegistrySource(str(tmp_path / "registry"))
    assert src.list() == []
    with pytest.raises(AdapterNotFound):
        src.resolve("city")
    for seed in (1, 2):
        adapter(tmp_path / f"city-{seed}")
        reg.publish("city", tmp_path / f"city-{seed}", "lora_adapter", lineage)
    reg.promote("city", 1, "production")
    assert src.resolve("city").id == "city@2"  # a bare name is the latest version
    res = src.resolve("city@production")
    assert (res.id, res.name, res.version) == ("city@1", "city", "1")
    assert Path(res.path, "adapter_config.json").is_file()
    assert src.list() == ["city", "city@production"]
    reg.promote("city", 2, "production")
    assert src.resolve("city@production").id == "city@2"
    for missing in ("city@9", "city@staging", "nope"):
        with pytest.raises(AdapterNotFound):
            src.resolve(missing)
    with pytest.raises(BadAdapterName):
        src.resolve("../registry")
