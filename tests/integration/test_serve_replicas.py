"""Two engine replicas, one SIGKILLed while 32 clients send requests for 30 s: at most 1% of requests fail, none
hangs past its timeout, and Serve brings the replica back.

    .venv/bin/pytest tests/integration/test_serve_replicas.py -x -q -s   # from the repository root

The ingress sends a request once more when its replica died before answering (serve.ingress.replica_gone), so the
requests in flight on the killed replica are answered by the other one. (The autoscaling module repeats this kill
on an autoscaled pair; it is opt-in: both together do not fit the suite's 35 minutes.)
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.conftest import free_port
from tests.integration.test_serve import PROMPT

pytestmark = pytest.mark.integration
APP = "test-replicas"


def replicas() -> dict[str, int]:
    """actor id -> pid of this app's live engine replicas."""
    from ray.util.state import list_actors

    return {a.actor_id: a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10000)
            if a.class_name.startswith(f"ServeReplica:{APP}:LoRAServer")}


@pytest.fixture(scope="module")
def two(ray_session, tiny_model_dir):
    from serve import ServeConfig, shutdown, start

    cfg = ServeConfig(port=free_port(), max_model_len=256, startup_timeout_s=300, replica_cpus=1.0, num_replicas=2,
                      max_ongoing_requests=32)
    url = start(cfg, tiny_model_dir, {}, name=APP)
    yield url
    shutdown(APP)


def test_sigkill_of_one_of_two_replicas_under_load(two):
    import httpx

    from serve.app import replica_count

    before = replicas()
    assert len(before) == 2, before
    victim_id, victim_pid = next(iter(before.items()))
    results: list[tuple[float, object]] = []
    stop = threading.Event()
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}

    def client_loop():
        with httpx.Client(base_url=two, timeout=60) as http:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    status = http.post("/completions", json=body).status_code
                except httpx.HTTPError as e:  # a timeout or a dropped connection counts as a failure
                    status = type(e).__name__
                results.append((time.monotonic() - t0, status))

    threads = [threading.Thread(target=client_loop) for _ in range(32)]
    for t in threads:
        t.start()
    time.sleep(10)
    killed = time.monotonic()
    os.kill(victim_pid, signal.SIGKILL)
    time.sleep(20)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung past its timeout"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (replica_count(APP) == 2 and victim_id not in replicas()):
        time.sleep(1)
    back = time.monotonic() - killed
    failed = [s for _, s in results if s != 200]
    print(f"\nreplica kill: {len(results)} requests in 30 s by 32 clients, {len(failed)} failed "
          f"({100 * len(failed) / max(1, len(results)):.2f} %: {sorted(set(map(str, failed)))}), slowest "
          f"{max(d for d, _ in results):.1f} s; 2 replicas running again {back:.0f} s after the kill")
    assert len(results) >= 100, len(results)
    assert len(failed) <= 0.01 * len(results), failed[:10]
    assert replica_count(APP) == 2 and victim_id not in replicas(), (victim_id, replicas())
