"""Adapter sources, resolution, validation and the slot gate: no Ray, no vLLM."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from serve.adapters import (
    AdapterInvalid,
    AdapterNotFound,
    BadAdapterName,
    ChainSource,
    FolderSource,
    Resolver,
    SlotGate,
    StaticSource,
    base_identities,
    parse_ref,
    validate_adapter,
)

BASE = "/models/tiny"


def adapter(folder: Path, **conf) -> str:
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    doc = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": BASE}
    (folder / "adapter_config.json").write_text(json.dumps({**doc, **conf}))
    # weights that match the config (r=8 on q_proj and v_proj): validate_adapter reads their header (issue 37)
    save_file({f"base_model.model.model.layers.0.self_attn.{m}.lora_{p}.weight":
               np.zeros((8, 16) if p == "A" else (16, 8), np.float32) for m in ("q_proj", "v_proj") for p in "AB"},
              str(folder / "adapter_model.safetensors"))
    return str(folder)


@pytest.mark.parametrize("ref", ["../etc", "a/b", "/abs", "a..b", "", "x@../y", "a@b@c", "é", "x@", "a\n",
                                 "a@b\n", "x@a..b"])
def test_bad_names_are_refused_before_touching_disk(ref):
    from pipelines.artifacts.registry import RegistryError
    from pipelines.artifacts.registry import parse_ref as registry_parse_ref

    with pytest.raises(BadAdapterName, match="invalid adapter name"):
        parse_ref(ref)
    with pytest.raises(RegistryError):  # one grammar: the registry refuses the same references
        registry_parse_ref(ref)


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


class CountingSource(StaticSource):
    def __init__(self, adapters):
        super().__init__(adapters)
        self.calls = 0

    def resolve(self, ref):
        self.calls += 1
        return super().resolve(ref)


def test_resolver_keeps_hits_for_its_ttl_then_asks_again():
    now = [0.0]
    source = CountingSource({"a": "/a"})
    resolver = Resolver(source, ttl_s=2.0, clock=lambda: now[0])
    assert resolver.resolve("a").path == "/a"
    source.adapters["a"] = "/a2"  # e.g. an alias promoted to another version
    now[0] = 1.9
    assert resolver.resolve("a").path == "/a" and source.calls == 1
    now[0] = 2.1
    assert resolver.resolve("a").path == "/a2" and source.calls == 2


def test_resolver_never_keeps_misses_so_new_adapters_appear(tmp_path):
    resolver = Resolver(FolderSource(str(tmp_path)), ttl_s=60)
    with pytest.raises(AdapterNotFound):
        resolver.resolve("late")
    adapter(tmp_path / "late")
    assert resolver.resolve("late").id == "late"
    with pytest.raises(BadAdapterName):
        resolver.resolve("../late")


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
    from pipelines.artifacts.registry import Registry
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
