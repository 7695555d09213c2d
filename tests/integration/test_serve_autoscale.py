"""Autoscaling 1 -> 2 -> 1 replicas under load, an adapter published to the registry while 2 replicas run is
served by both, and one of the two replicas SIGKILLed while 32 clients send requests for 20 s: at most 1% fail,
none hangs past its timeout, and Serve brings the replica back.

    .venv/bin/pytest tests/integration/test_serve_autoscale.py -x -q -s   # from the repository root

The second replica is a second vLLM engine (~3 GiB, 45-140 s to start on 2 shared cores): this one app covers
scaling and the replica kill, so the suite starts no other two-replica app. The ingress sends a request once more
when its replica died before answering (serve.ingress.replica_gone).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.conftest import free_port
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


@pytest.fixture(scope="module")
def scaled(ray_session, tiny_model_dir, tmp_path_factory):
    from serve import ServeConfig, shutdown, start
    from serve.config import AutoscalingConfig

    registry = tmp_path_factory.mktemp("registry")
    # 4 requests per replica at once: requests for an adapter spill to the second replica once the first is
    # full (Serve's multiplexed routing otherwise keeps an adapter where it is loaded).
    cfg = ServeConfig(port=free_port(), max_model_len=256, startup_timeout_s=300, registry=str(registry),
                      replica_cpus=1.0, max_ongoing_requests=4, autoscaling=AutoscalingConfig(
                          min_replicas=1, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=2,
                          downscale_delay_s=10, metrics_interval_s=1, look_back_period_s=4))
    url = start(cfg, tiny_model_dir, {}, name=APP)
    yield url, registry
    shutdown(APP)


def replicas() -> dict[str, int]:
    """actor id -> pid of this app's live engine replicas."""
    import ray
    from ray.util.state import list_actors

    # this session's State API by its address: with none, Ray asks the newest Ray instance on the machine, which
    # is another session's when two run side by side (seen: {} while both replicas were up)
    address = f"http://{ray._private.worker._global_node.webui_url}"
    return {a.actor_id: a.pid for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10000)
            if a.class_name.startswith(f"ServeReplica:{APP}:LoRAServer")}


def test_scales_up_serves_new_adapter_on_both_survives_a_replica_kill_then_scales_down(scaled, tiny_model_dir,
                                                                                       tmp_path):
    import signal

    import httpx

    from pipelines.artifacts.registry import Registry
    from serve.app import replica_count

    url, registry = scaled
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
        lineage = {"base_model": tiny_model_dir, "base_model_hash": "sha256:t", "dataset_hash": "sha256:d",
                   "config": {"r": 8}}
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
        time.sleep(15)
        in_window = [r for r in results if r[0] >= window]
        back = wait_for(lambda: replica_count(APP) == 2 and victim not in replicas(), 300,
                        "Serve to replace the killed replica (2 running replicas again, under load)")
    finally:
        stop.set()
        for t in threads + extra:
            t.join(timeout=300)
    assert not any(t.is_alive() for t in threads + extra), "a client hung past its timeout"
    failed = [r for r in in_window if r[2] != 200]
    print(f"replica kill: {len(in_window)} requests in 20 s by 32 clients, {len(failed)} failed "
          f"({100 * len(failed) / max(1, len(in_window)):.2f} %: {sorted({str(r[2]) for r in failed})}), slowest "
          f"{max(r[1] for r in in_window):.1f} s; 2 replicas again {time.monotonic() - killed:.0f} s after the kill "
          f"(waited {back:.0f} s after the window)")
    down = wait_for(lambda: replica_count(APP) == 1, 240, "scale-down to 1 replica once idle")
    print(f"2 -> 1 replicas {down:.0f} s after the load stopped")
    assert not [r for r in before_kill if r[2] != 200], [r for r in before_kill if r[2] != 200][:3]
    assert len(in_window) >= 100, len(in_window)
    assert len(failed) <= 0.01 * len(in_window), failed[:10]
