"""Autoscaling 1 -> 2 -> 1 replicas under load, an adapter published to the registry while 2 replicas run is
served by both, and one of the two replicas SIGKILLed while 32 clients send requests for 20 s: at most 1% fail,
none hangs past its timeout, and Serve creates a replacement (that a replacement comes up and serves is
test_serve.py's engine-death test).

    .venv/bin/pytest tests/integration/test_serve_autoscale.py -x -q -s   # from the repository root

The second replica is a second vLLM engine (~3 GiB, 45-140 s to start on 2 shared cores): this one app covers
scaling and the replica kill, so the suite starts no other two-replica app. The ingress sends a request once more
when its replica died before answering (serve.ingress.replica_gone).

The app's registry is in an object store (a real S3 API: moto on localhost, the conftest `s3` fixture), so the same
app also shows, through HTTP and the `openai` client, what a store that stops answering does to serving (issue 37):
registry adapters get 503 with Retry-After, base requests and /health keep answering, and the adapter is served
again once the store is back.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.conftest import BUCKET, free_port
from tests.integration.test_serve import PROMPT, make_adapter

pytestmark = pytest.mark.integration
APP = "test-autoscale"


def wait_for(predicate, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


LINEAGE = {"base_model": "tiny", "base_model_hash": "sha256:t", "dataset_hash": "sha256:d", "config": {"r": 8}}


@pytest.fixture(scope="module")
def scaled(ray_session, tiny_model_dir, s3):
    from serve import ServeConfig, shutdown, start
    from serve import app as serve_app
    from serve.config import AutoscalingConfig

    registry = f"s3://{BUCKET}/registry-autoscale"
    # The replicas reach the store as this process does (on a real cluster the machines' environment or instance
    # role gives them the endpoint and credentials; here the moto endpoint and its test credentials).
    saved = dict(serve_app.SERVE_REPLICA_ENV)
    serve_app.SERVE_REPLICA_ENV.update(s3["env"])
    # 4 requests per replica at once: requests for an adapter spill to the second replica once the first is
    # full (Serve's multiplexed routing otherwise keeps an adapter where it is loaded).
    cfg = ServeConfig(port=free_port(), max_model_len=256, startup_timeout_s=300, registry=str(registry),
                      replica_cpus=1.0, max_ongoing_requests=4, autoscaling=AutoscalingConfig(
                          min_replicas=1, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=2,
                          downscale_delay_s=10, metrics_interval_s=1, look_back_period_s=4))
    try:
        url = start(cfg, tiny_model_dir, {}, name=APP)
    finally:
        serve_app.SERVE_REPLICA_ENV.clear()
        serve_app.SERVE_REPLICA_ENV.update(saved)
    yield url, registry
    shutdown(APP)


LIVE = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "ALIVE", "RESTARTING")  # every actor state but DEAD
# the replicas Serve keeps (every replica state but stopping): the autoscaler's decision, engines up or not yet
KEPT = ("STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION")


def replicas(states: tuple[str, ...] = ("ALIVE",)) -> dict[str, int]:
    """actor id -> pid of this app's engine replicas in `states` (alive: started, their engines up or starting)."""
    import ray
    from ray.util.state import list_actors

    # this session's State API by its address: with none, Ray asks the newest Ray instance on the machine, which
    # is another session's when two run side by side (seen: {} while both replicas were up)
    address = f"http://{ray._private.worker._global_node.webui_url}"
    return {a.actor_id: a.pid for a in list_actors(address=address, limit=10000)
            if a.state in states and a.class_name.startswith(f"ServeReplica:{APP}:LoRAServer")}


def test_scales_up_serves_new_adapter_on_both_survives_a_replica_kill_then_scales_down(scaled, tiny_model_dir,
                                                                                       tmp_path, monkeypatch):
    import signal

    import httpx

    from pipelines.artifacts.registry import Registry
    from serve.app import replica_count

    url, registry = scaled
    # the publisher's own mirror of the store, as on another machine (sharing the replicas' mirror folder, one
    # run saw a 503 for the adapter while it was being published)
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "publisher"))
    assert replica_count(APP) == 1
    stop, model, served_late = threading.Event(), ["base"], set()
    results: list[tuple[float, float, object, str]] = []  # (start, seconds, status, model)

    def load(max_tokens: int) -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                asked, t0 = model[0], time.monotonic()
                try:
                    r = http.post(f"{url}/completions", json={"model": asked, "prompt": PROMPT,
                                                                "max_tokens": max_tokens})
                    status = r.status_code
                except httpx.HTTPError as e:  # a timeout or a dropped connection counts as a failure
                    status, r = type(e).__name__, None
                results.append((t0, time.monotonic() - t0, status, asked))
                if status == 200 and asked != "base":
                    assert r.headers["x-loraforge-adapter"] == "late@1", r.headers
                    served_late.add(r.headers["x-loraforge-replica"])

    threads = [threading.Thread(target=load, args=(48,), daemon=True) for _ in range(12)]
    extra: list[threading.Thread] = []
    for t in threads:
        t.start()
    try:
        up = wait_for(lambda: replica_count(APP) == 2, 420, "a second replica under load")
        print(f"\n1 -> 2 replicas after {up:.0f} s of load")
        staged = make_adapter(tiny_model_dir, tmp_path / "late", seed=5)
        lineage = {**LINEAGE, "base_model": tiny_model_dir}
        assert Registry(registry).publish("late", staged, "lora_adapter", lineage) == 1  # while 2 replicas run
        model[0] = "base:late"  # the latest version; the whole load asks for it: it fills one replica, spills over
        both = wait_for(lambda: len(served_late) == 2, 180, "both replicas to answer for the new adapter")
        print(f"both replicas served the adapter registered while serving within {both:.0f} s")
        before_kill = list(results)

        # 32 clients for 20 s; one of the two replicas SIGKILLed 5 s in
        model[0] = "base"
        extra += [threading.Thread(target=load, args=(4,), daemon=True) for _ in range(20)]
        for t in extra:
            t.start()
        window = time.monotonic()
        time.sleep(5)
        alive = replicas()
        assert len(alive) == 2, alive
        victim, pid = next(iter(alive.items()))
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        # Serve notices the death and creates a replacement (a new replica actor, starting its engine). That the
        # replacement comes up and serves is test_serve.py's engine-death test; waiting here for a second engine
        # start under load took 67-102 s more
        noticed = wait_for(lambda: set(replicas(states=LIVE)) - set(alive), 60,
                           "Serve to create a replica in place of the killed one")
        time.sleep(max(0.0, 15 - (time.monotonic() - killed)))
        in_window = [r for r in results if r[0] >= window]
    finally:
        stop.set()
        for t in threads + extra:
            t.join(timeout=300)
    assert not any(t.is_alive() for t in threads + extra), "a client hung past its timeout"
    failed = [r for r in in_window if r[2] != 200]
    print(f"replica kill: {len(in_window)} requests in 20 s by 32 clients, {len(failed)} failed "
          f"({100 * len(failed) / max(1, len(in_window)):.2f} %: {sorted({str(r[2]) for r in failed})}), slowest "
          f"{max(r[1] for r in in_window):.1f} s; Serve created a replacement {noticed:.0f} s after the kill")
    # Serve's replicas of every kind but stopping: the survivor and the replacement (starting, or up by now)
    assert replica_count(APP, KEPT) == 2, replica_count(APP, KEPT)
    down = wait_for(lambda: replica_count(APP, KEPT) == 1 and replica_count(APP) == 1, 240,
                    "scale-down to 1 replica once idle")
    print(f"2 -> 1 replicas {down:.0f} s after the load stopped")
    assert not [r for r in before_kill if r[2] != 200], [r for r in before_kill if r[2] != 200][:3]
    assert len(in_window) >= 80, len(in_window)  # 99 and 120 in two runs here; with fewer, 1 % would allow none
    assert len(failed) <= 0.01 * len(in_window), failed[:10]


def test_a_store_that_stops_answering_is_a_503_with_retry_after_while_base_and_health_answer(scaled, s3,
                                                                                             tiny_model_dir, tmp_path,
                                                                                             monkeypatch):
    """Issue 37, through HTTP: moto's process stopped (SIGSTOP: connections hang as with a dead endpoint) while the
    app serves. A registry adapter published just before (never asked for, so nothing cached) is a 503 with
    Retry-After within serve.adapters.SOURCE_TIMEOUT_S (plus slack) for the `openai` client; the base model and
    /health answer meanwhile; after SIGCONT the adapter is served."""
    import signal

    import httpx
    import openai

    from pipelines.artifacts.registry import Registry
    from serve.adapters import SOURCE_TIMEOUT_S

    url, registry = scaled
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "publisher"))
    staged = make_adapter(tiny_model_dir, tmp_path / "city", seed=7)
    assert Registry(registry).publish("city", staged, "lora_adapter", {**LINEAGE, "base_model": tiny_model_dir}) == 1
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    os.kill(s3["proc"].pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="base:city", prompt=PROMPT, max_tokens=4)
        waited = time.monotonic() - t0
        t1 = time.monotonic()
        base = client.completions.create(model="base", prompt=PROMPT, max_tokens=4)
        base_s = time.monotonic() - t1
        health = httpx.get(url.rsplit("/v1", 1)[0] + "/health", timeout=30)
    finally:
        os.kill(s3["proc"].pid, signal.SIGCONT)
    print(f"\nstore stopped: 503 after {waited:.1f} s ({refused.value.message!r}), base answered in {base_s:.1f} s, "
          f"/health {health.status_code}")
    assert refused.value.status_code == 503, refused.value
    assert int(refused.value.response.headers["retry-after"]) > 0
    assert "city" in refused.value.message
    assert waited < SOURCE_TIMEOUT_S + 10, waited
    assert base.choices
    assert health.status_code == 200
    served = wait_for(lambda: _answers(client, "base:city"), 90, "the adapter to be served once the store is back")
    print(f"adapter served {served:.0f} s after the store came back")


def _answers(client, model: str) -> bool:
    import openai

    try:
        return bool(client.completions.create(model=model, prompt=PROMPT, max_tokens=4).choices)
    except openai.APIStatusError as e:
        assert e.status_code == 503, e  # still held (Retry-After) or the store not yet answering: nothing else
        return False
