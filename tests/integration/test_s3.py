"""Runs and the registry in an object store: a real S3 API on localhost (`moto` in server mode, started and stopped
here), reached the way an S3-compatible store is (AWS_ENDPOINT_URL + credentials): pushes and pulls, the
registry's writers on two machines, mirrors and what a store that stops answering does. The whole tiny graph with
`output_dir` and `registry.root` as s3:// URIs (Ray Train's checkpoints and a sweep's Tune state in the store, a
second driver with an empty mirror finding every stage cached) runs in test_submit.py, submitted as a Ray job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BUCKET, free_port, keys

REPO = Path(__file__).resolve().parents[2]


def test_push_pull_round_trip_and_an_unreachable_store(s3, tmp_path, monkeypatch):
    from pipelines.artifacts import storage

    src = tmp_path / "src"
    (src / "a" / "ray_train").mkdir(parents=True)
    (src / "a" / "f.txt").write_text("one")
    (src / "a" / "ray_train" / "optimizer.pt").write_bytes(b"state")
    (src / "top.json").write_text("{}")
    uri = f"s3://{BUCKET}/roundtrip"
    assert storage.push(src, uri, skip=("ray_train",)) == 2
    assert keys("roundtrip/") == ["roundtrip/a/f.txt", "roundtrip/top.json"]
    dst = tmp_path / "dst"
    assert storage.pull(uri, dst) == 2 and (dst / "a" / "f.txt").read_text() == "one"
    assert storage.pull(uri, dst) == 0  # unchanged: nothing copied again
    (src / "a" / "f.txt").write_text("two!")
    storage.push(src / "a" / "f.txt", f"{uri}/a/f.txt")
    assert storage.pull(uri, dst) == 1 and (dst / "a" / "f.txt").read_text() == "two!"
    assert storage.pull(f"s3://{BUCKET}/nothing-here", tmp_path / "none") == 0

    # a key with '..' (a store accepts it) would be followed out of the local mirror: refused, nothing written
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1").put_object(
        Bucket=BUCKET, Key="hostile/run/../../escaped.txt", Body=b"x")
    mirror = tmp_path / "mirror" / "deep"
    with pytest.raises(storage.StorageError, match="its key leaves the local mirror"):
        storage.pull(f"s3://{BUCKET}/hostile/run", mirror)
    assert not list(tmp_path.rglob("escaped.txt"))

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(storage.StorageError, match="the store does not answer"):
        storage.pull(uri, dst)


def test_registry_in_the_store_resolves_from_another_mirror(s3, tiny_model_dir, tmp_path, monkeypatch):
    """Published through one machine's mirror, resolved (files pulled) and promoted through another's."""
    from pipelines.artifacts.registry import Registry
    from tests.unit.artifacts.test_registry import LINEAGE, make_adapter

    root = f"s3://{BUCKET}/registry-unit"
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "machine-a"))
    version = Registry(root).publish("city", make_adapter(tmp_path / "a"), "lora_adapter", LINEAGE)
    assert f"registry-unit/models/city/{version}/adapter_model.safetensors" in keys("registry-unit/")

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "machine-b"))
    other = Registry(root)
    art = other.resolve("city")
    assert art.version == version and str(art.path).startswith(str(tmp_path / "machine-b"))
    assert (art.path / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    other.promote("city", version, "production", reason="test")

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "machine-a"))
    assert Registry(root).resolve("city@production").version == version  # the alias reached machine a
    assert [r["action"] for r in Registry(root).audit()] == ["publish", "promote"]
    # the CLI reads the store too (its --root once collapsed s3:// into a local folder s3:/ and printed nothing)
    from typer.testing import CliRunner

    from cluster.cli import app

    out = CliRunner().invoke(app, ["registry", "list", "--json", "--root", root])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.strip().splitlines()[-1])[0]["aliases"] == {"production": version}
    assert not (Path.cwd() / "s3:").exists()


# One machine of the race below: its own mirror (LORAFORGE_CACHE), publishing three adapters from the same start
# time as the other; machine a promotes its first version between its publishes. Prints its versions as JSON.
WRITER = """
import json, sys, time
from pathlib import Path
from pipelines.artifacts.registry import Registry
from tests.unit.artifacts.test_registry import LINEAGE, make_adapter

root, machine, start, work = sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
reg = Registry(root)
time.sleep(max(0.0, start - time.time()))
versions = []
for i in range(3):
    src = make_adapter(work / f"{machine}{i}", f"{machine}-weights-{i}".encode())
    versions.append(reg.publish("city", src, "lora_adapter", LINEAGE, note=f"{machine}{i}"))
    if machine == "a" and i == 0:
        reg.promote("city", versions[0], "production", reason="race")
print(json.dumps(versions))
"""


def test_a_version_is_pulled_into_the_mirror_whole(s3, tmp_path, monkeypatch):
    """Processes of one node share a mirror (an ingress and its engine replicas resolve a new version at once).
    A version folder is renamed in whole: a folder left half-pulled (no registry.json) is replaced, and no
    staging folder stays behind."""
    from pipelines.artifacts.registry import Registry
    from tests.unit.artifacts.test_registry import LINEAGE, make_adapter

    root = f"s3://{BUCKET}/registry-whole"
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "publisher"))
    version = Registry(root).publish("city", make_adapter(tmp_path / "a"), "lora_adapter", LINEAGE)
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "server"))
    reader = Registry(root)
    half = reader.root / "models" / "city" / str(version)
    half.mkdir(parents=True)
    (half / "adapter_config.json").write_text("{")  # what a pull stopped half-way leaves
    (half / "adapter_model.safetensors.123.pulling").write_text("x")
    art = reader.resolve("city")
    assert (art.path / "registry.json").is_file()
    assert (art.path / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert (art.path / "adapter_config.json").read_text() == (tmp_path / "a" / "adapter_config.json").read_text()
    assert sorted(p.name for p in art.path.iterdir()) == sorted(p.name for p in (tmp_path / "a").iterdir()) + \
        ["registry.json"], sorted(p.name for p in art.path.iterdir())  # the half folder replaced, not topped up
    assert not [p for p in half.parent.iterdir() if p.name.endswith(".pulling")]


def test_a_mirror_never_serves_another_registry_s_version_of_the_same_number(s3, tmp_path, monkeypatch):
    """A machine's mirror keeps what it pulled. When the store under the same URI is another registry (emptied and
    published into again, or another store at the same bucket and prefix: a test store, a restored backup),
    `city@1` there is another artifact: the mirror's copy is replaced because its recorded hash is not the
    index's, for a reader and for a publisher's own mirror alike. (Trusting any complete folder, an app served
    an adapter from an earlier store, trained on another base: 503s for an adapter just published.)"""
    import boto3

    from pipelines.artifacts.registry import Registry
    from tests.unit.artifacts.test_registry import LINEAGE, make_adapter

    root = f"s3://{BUCKET}/registry-reused"
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "publisher"))
    assert Registry(root).publish("city", make_adapter(tmp_path / "old", b"old-weights"), "lora_adapter",
                                  LINEAGE) == 1
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "server"))
    old = Registry(root).resolve("city@1")
    assert (old.path / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "old" / "adapter_model.safetensors").read_bytes()
    bucket = boto3.resource("s3", endpoint_url=s3["endpoint"], region_name="us-east-1").Bucket(BUCKET)
    bucket.objects.filter(Prefix="registry-reused/").delete()  # the store's registry is gone; a new one begins
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "publisher"))  # the same publisher mirror, stale too
    assert Registry(root).publish("city", make_adapter(tmp_path / "new", b"new-weights"), "lora_adapter",
                                  LINEAGE) == 1
    new_bytes = (tmp_path / "new" / "adapter_model.safetensors").read_bytes()
    assert (Registry(root).resolve("city@1").path / "adapter_model.safetensors").read_bytes() == new_bytes
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "server"))
    reader = Registry(root)
    # as on a fast machine (CI, once): the new index.json written within the second of the old one, at its size.
    # Size and modification time then say "unchanged"; the index must be read again all the same
    stored = bucket.Object("registry-reused/index.json")
    mirrored = reader.root / "index.json"
    assert mirrored.stat().st_size == stored.content_length
    os.utime(mirrored, (stored.last_modified.timestamp(), stored.last_modified.timestamp()))
    art = reader.resolve("city@1")
    assert (art.path / "adapter_model.safetensors").read_bytes() == new_bytes
    assert reader.verify("city@1")
    assert not [p for p in art.path.parent.iterdir() if p.name != "1"]  # nothing left aside


def test_threads_of_one_process_resolve_from_one_mirror_at_once(s3, tmp_path, monkeypatch):
    """A server resolves adapters on a pool of threads (serve.adapters.off_loop): requests for a new version pull
    the index and the version into one mirror from several threads of one process at once. Each pull is staged
    under a name of its own (a name per process let one thread rename another's half-written file: a 503 right
    after a publish). Six rounds, each after a publish, into a fresh mirror and the same one again."""
    import threading

    from pipelines.artifacts.registry import Registry
    from tests.unit.artifacts.test_registry import LINEAGE, make_adapter

    root = f"s3://{BUCKET}/registry-threads"
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "publisher"))
    publisher = Registry(root)
    errors: list[str] = []
    for round_ in range(6):
        version = publisher.publish("city", make_adapter(tmp_path / f"a{round_}", f"w{round_}".encode() * 999),
                                    "lora_adapter", LINEAGE)
        monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / ("server" if round_ % 2 else f"fresh{round_}")))
        reader = Registry(root)
        start = threading.Barrier(8)

        def resolve(reader=reader, version=version, start=start) -> None:
            start.wait()
            try:
                art = reader.resolve("city")
                assert art.version == version and (art.path / "adapter_model.safetensors").is_file()
            except Exception as e:  # noqa: BLE001 - what a request would have turned into a 503
                errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=resolve) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == []
    assert not list((tmp_path / "server").rglob("*.pulling"))


def test_two_machines_publishing_at_once_get_distinct_versions(s3, tmp_path, monkeypatch):
    """Two processes with their own mirrors (two machines) publish to one S3 registry at the same moment, one of
    them promoting in between: every publish gets its own version, the index lists all six, each version holds
    the files its writer uploaded, the alias and the audit log are whole. Before, both read index.json, both took
    the same next version and the last index written won (lost versions, overwritten files)."""
    import time

    from pipelines.artifacts.registry import Registry

    root = f"s3://{BUCKET}/registry-race"
    start = time.time() + 6  # both processes imported and waiting before it
    procs = {m: subprocess.Popen([sys.executable, "-c", WRITER, root, m, str(start), str(tmp_path / "src")],
                                 cwd=REPO, env={**os.environ, **s3["env"], "LORAFORGE_CACHE": str(tmp_path / m)},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in ("a", "b")}
    got = {}
    for m, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        got[m] = json.loads(out.strip().splitlines()[-1])
    assert sorted(got["a"] + got["b"]) == [1, 2, 3, 4, 5, 6], got

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "reader"))
    reader = Registry(root)  # a third machine's (empty) mirror
    assert reader.list()[0]["versions"] == [1, 2, 3, 4, 5, 6]
    for m, versions in got.items():
        for i, v in enumerate(versions):
            art = reader.resolve(f"city@{v}")
            assert (art.path / "adapter_model.safetensors").read_bytes() == f"{m}-weights-{i}".encode(), (m, i, v)
            assert reader.verify(f"city@{v}")
    assert reader.resolve("city@production").version == got["a"][0]
    audit = reader.audit()
    assert sorted(r["version"] for r in audit if r["action"] == "publish") == [1, 2, 3, 4, 5, 6]
    assert [(r["action"], r["version"]) for r in audit if r["action"] == "promote"] == [("promote", got["a"][0])]


def test_a_store_write_that_lost_the_race_is_applied_again(s3, tmp_path, monkeypatch):
    """The compare-and-swap itself: another machine publishes between this writer's read of index.json and its
    write (If-Match on the ETag read fails), so the change is applied again to the index that machine wrote."""
    from pipelines.artifacts.registry import Registry
    from tests.unit.artifacts.test_registry import LINEAGE, make_adapter

    root = f"s3://{BUCKET}/registry-cas"
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "machine-a"))
    mine = Registry(root)
    mine.publish("city", make_adapter(tmp_path / "a"), "lora_adapter", LINEAGE)
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "machine-b"))
    other = Registry(root)
    seen = []

    def point(index, log):
        seen.append(sorted(index["models"]["city"]["versions"], key=int))
        if len(seen) == 1:  # the other machine writes now, after this read
            assert other.publish("city", make_adapter(tmp_path / "b", b"w2"), "lora_adapter", LINEAGE) == 2
        index["models"]["city"]["aliases"]["canary"] = 1
        log.append(dict(action="promote", name="city", version=1, alias="canary"))

    mine._commit(point)
    assert seen == [["1"], ["1", "2"]]  # read, lost the race, read again
    entry = Registry(root).show("city")
    assert sorted(entry["versions"], key=int) == ["1", "2"] and entry["aliases"] == {"canary": 1}
    assert [r["action"] for r in Registry(root).audit()] == ["publish", "publish", "promote"]


class Ticker:
    """Counts 0.05 s sleeps on the event loop it runs on: a loop held by a blocking call stops counting."""

    def __init__(self) -> None:
        self.ticks = 0

    async def run(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(0.05)
            self.ticks += 1


def test_a_store_that_stops_answering_is_a_503_for_registry_adapters_while_base_answers(s3, tmp_path, monkeypatch):
    """Serving from a registry in the store, the store stops answering (moto's process stopped with SIGSTOP, so
    connections hang as with a dead endpoint) and then comes back (SIGCONT). Meanwhile a registry adapter is a 503
    (the ingress adds Retry-After to every 503) within serve.ingress.SOURCE_TIMEOUT_S, and /v1/models too, while
    the event loop keeps running (a ticker task ticks throughout: the store call is in a thread) and the base
    model, which needs no store, resolves at once; after the store is back the adapter resolves again."""
    import asyncio
    import signal
    import time
    import types

    from pipelines.artifacts.registry import Registry
    from serve import ingress as ingress_module
    from serve.adapters import RegistrySource, Resolver
    from serve.config import ServeConfig
    from serve.errors import APIError, error_response, status_and_message
    from serve.ingress import LoRAIngress
    from tests.unit.artifacts.test_registry import LINEAGE, make_adapter

    root = f"s3://{BUCKET}/registry-serving"
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "publisher"))
    Registry(root).publish("city", make_adapter(tmp_path / "a"), "lora_adapter", LINEAGE)
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "server"))
    source = RegistrySource(root)
    ingress = types.SimpleNamespace(cfg=ServeConfig(), resolver=Resolver(source, ttl_s=0), source=source,
                                    canary=None, created=0, _authorize=lambda request: None)
    monkeypatch.setattr(ingress_module, "SOURCE_TIMEOUT_S", 3)

    async def outage() -> dict:
        ticker = Ticker()
        assert (await LoRAIngress._target(ingress, "base:city", "c")).model_id == "base:city@1"
        os.kill(s3["proc"].pid, signal.SIGSTOP)
        try:
            task, t0 = asyncio.create_task(ticker.run()), time.monotonic()
            errors = []
            for call in (LoRAIngress._target(ingress, "base:city", "c"), LoRAIngress._cards(ingress, None)):
                try:
                    await call
                except Exception as e:  # noqa: BLE001 - what the ingress answers with, below
                    errors.append(status_and_message(e))
            waited = time.monotonic() - t0
            base = await LoRAIngress._target(ingress, "base", "c")
            task.cancel()
        finally:
            os.kill(s3["proc"].pid, signal.SIGCONT)
        return {"errors": errors, "waited": waited, "ticks": ticker.ticks, "base": base.model_id}

    got = asyncio.run(outage())
    print(f"\nstore stopped: {got}")
    assert [status for status, _ in got["errors"]] == [503, 503], got
    assert all("unavailable" in message for _, message in got["errors"]), got
    assert got["waited"] < 2 * (3 + 2), got  # each call answered within the source timeout (plus slack)
    assert got["ticks"] >= 2 * got["waited"], got  # the loop kept running (held by the store, it would not tick)
    assert got["base"] == "base"
    assert error_response(503, "x", retry_after=True).headers["retry-after"] == "5"
    back = time.monotonic() + 60
    while True:  # the store answers again: the adapter resolves
        try:
            assert asyncio.run(LoRAIngress._target(ingress, "base:city", "c")).model_id == "base:city@1"
            break
        except APIError:
            assert time.monotonic() < back, "the adapter did not resolve after the store came back"
            time.sleep(1)


def test_the_engine_replica_asks_a_stopped_store_off_its_event_loop(s3, tmp_path, monkeypatch):
    """Issue 37: the store dies after the ingress pinned `city@1` and before an engine replica loads it. The
    replica's SourceLoader (its `model_downloader`) asks the registry in a thread: within the limit it answers
    SourceDown (503, Retry-After) naming the adapter while its event loop keeps running (a ticker ticks: base
    requests and health checks would be served), and the replica holds that answer RETRY_AFTER_S only (a broken
    adapter is held serve.retry_failed_s); once the store is back the adapter loads from it."""
    import asyncio
    import signal
    import time
    import types

    from pipelines.artifacts.registry import Registry
    from serve import adapters as adapters_module
    from serve.adapters import RegistrySource
    from serve.config import ServeConfig
    from serve.errors import RETRY_AFTER_S
    from serve.server import LoRAServer, SourceDown, SourceLoader
    from tests.unit.artifacts.test_adapter_check import good, write
    from tests.unit.artifacts.test_registry import LINEAGE

    root = f"s3://{BUCKET}/registry-engine"
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "publisher"))
    Registry(root).publish("city", write(tmp_path / "a", good()), "lora_adapter", LINEAGE)
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "engine"))
    monkeypatch.setattr(adapters_module, "SOURCE_TIMEOUT_S", 3)
    cfg = ServeConfig()
    loader = SourceLoader(RegistrySource(root), cfg, None)
    loaded: list[str] = []

    async def resolve_lora(config) -> None:  # where vLLM would load the folder: the test records it
        loaded.append(config.local_path)

    replica = types.SimpleNamespace(cfg=cfg, _locks={}, _failed={}, engine=types.SimpleNamespace(
        resolve_lora=resolve_lora), _load_model=lambda model_id: loader.load_model_from_config(model_id, None))

    async def outage() -> dict:
        ticker = Ticker()
        first = await loader.load_model_from_config("base:city@1", None)
        os.kill(s3["proc"].pid, signal.SIGSTOP)
        try:
            task, t0 = asyncio.create_task(ticker.run()), time.monotonic()
            try:
                await LoRAServer._resolve(replica, "base:city@1")
                down = None
            except SourceDown as e:
                down = e
            waited = time.monotonic() - t0
            t1 = time.monotonic()
            try:  # held: answered at once, without asking the store again
                await LoRAServer._resolve(replica, "base:city@1")
                held = None
            except Exception as e:  # noqa: BLE001 - checked below
                held = e
            held_s = time.monotonic() - t1
            task.cancel()
        finally:
            os.kill(s3["proc"].pid, signal.SIGCONT)
        return {"first": first.local_path, "down": down, "waited": waited, "ticks": ticker.ticks, "held": held,
                "held_s": held_s, "until": replica._failed["base:city@1"][0] - time.monotonic()}

    got = asyncio.run(outage())
    print(f"\nstore stopped under the engine: {got}")
    assert Path(got["first"], "adapter_model.safetensors").is_file()
    down = got["down"]
    assert down is not None and down.status_code == 503, got
    assert down.headers == {"Retry-After": str(RETRY_AFTER_S)} and "'city@1'" in down.detail, got
    assert "unavailable" in down.detail, got
    assert got["waited"] < 3 + 2, got  # within the limit (plus slack), not the store's own ~10 s
    assert got["ticks"] >= 10 * got["waited"], got  # the loop kept running: a 0.05 s ticker, at least half its rate
    assert getattr(got["held"], "status_code", None) == 503 and got["held_s"] < 0.5, got
    assert 0 < got["until"] <= RETRY_AFTER_S, got  # held RETRY_AFTER_S, not cfg.retry_failed_s (30 s)
    back = time.monotonic() + 60
    while True:  # the store answers again: the adapter loads from it (the replica asks once its hold has ended)
        try:
            assert asyncio.run(loader.load_model_from_config("base:city@1", None)).local_path == got["first"]
            break
        except SourceDown:
            assert time.monotonic() < back, "the adapter did not load after the store came back"
            time.sleep(0.5)
    assert loaded == []  # nothing reached the engine while the store was down
