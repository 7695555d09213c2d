"""Autoscaling 1 -> 2 -> 1 replicas under load, and an adapter registered while 2 replicas run is served by both.

    cd /work/main && LORAFORGE_SLOW=1 .venv/bin/pytest tests/integration/test_serve_autoscale.py -x -q -s

Opt-in (LORAFORGE_SLOW=1): the second replica is a second vLLM engine (~3 GiB, 45-140 s to start on 2 shared
cores), so this module takes 3-6 minutes, beyond the serve suite's 4-minute budget.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.conftest import free_port
from tests.integration.test_serve import PROMPT, make_adapter

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not os.environ.get("LORAFORGE_SLOW"), reason="slow: set LORAFORGE_SLOW=1")]
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

    hot = tmp_path_factory.mktemp("hot")
    # 4 requests per replica at once: requests for an adapter spill to the second replica once the first is
    # full (Serve's multiplexed routing otherwise keeps an adapter where it is loaded).
    cfg = ServeConfig(port=free_port(), max_model_len=256, startup_timeout_s=300, adapter_dir=str(hot),
                      replica_cpus=1.0, max_ongoing_requests=4, autoscaling=AutoscalingConfig(
                          min_replicas=1, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=2,
                          downscale_delay_s=10, metrics_interval_s=1, look_back_period_s=4))
    url = start(cfg, tiny_model_dir, {}, name=APP)
    yield url, hot
    shutdown(APP)


def test_scales_up_under_load_serves_new_adapter_on_both_then_scales_down(scaled, tiny_model_dir, tmp_path):
    import httpx

    from serve.app import replica_count

    url, hot = scaled
    assert replica_count(APP) == 1
    stop, model, served_late, failures = threading.Event(), ["base"], set(), []

    def load() -> None:
        with httpx.Client(timeout=300) as http:
            while not stop.is_set():
                asked = model[0]
                r = http.post(f"{url}/completions", json={"model": asked, "prompt": PROMPT, "max_tokens": 48})
                if r.status_code != 200:
                    failures.append((asked, r.status_code, r.text[:200]))
                elif asked != "base":
                    served_late.add(r.headers["x-loraforge-replica"])

    threads = [threading.Thread(target=load, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    try:
        up = wait_for(lambda: replica_count(APP) == 2, 420, "a second replica under load")
        print(f"\n1 -> 2 replicas after {up:.0f} s of load")
        staged = make_adapter(tiny_model_dir, tmp_path / "late", seed=5)
        os.rename(staged, hot / "late")  # registered while 2 replicas run
        model[0] = "base:late"  # the whole load now asks for it: it fills one replica and spills to the other
        both = wait_for(lambda: len(served_late) == 2, 180, "both replicas to answer for the new adapter")
        print(f"both replicas served the adapter registered while serving within {both:.0f} s")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    down = wait_for(lambda: replica_count(APP) == 1, 240, "scale-down to 1 replica once idle")
    print(f"2 -> 1 replicas {down:.0f} s after the load stopped")
    assert not failures, failures[:3]
