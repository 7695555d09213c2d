"""Former silent fallbacks that need Ray (or the Serve/ingress modules, which load Ray Serve and vLLM): shutdown of
the Serve app, the status a corrupt registry is answered with, and data.parse_actors on real Ray Data.

    .venv/bin/pytest tests/integration/test_fallbacks.py -q
"""

from __future__ import annotations

import asyncio
import json
import types

import pytest

pytestmark = pytest.mark.integration


# ----------------------------------------------------------------------------- 6. serve.app.shutdown


def test_shutdown_is_safe_when_serve_never_started(ray_session):
    from serve.app import shutdown

    if _serve_running():
        pytest.skip("a Serve instance is running in this test session")
    shutdown()  # Serve never started on this cluster: nothing to delete, nothing to stop
    shutdown("never-deployed")
    assert not _serve_running()


def _serve_running() -> bool:
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


# ----------------------------------------------------------------------------- 4. corrupt registry -> 503, not 404


def test_ingress_answers_a_corrupt_registry_with_503_and_an_unknown_name_with_404(tmp_path):
    from serve.adapters import RegistrySource, Resolver
    from serve.config import ServeConfig
    from serve.errors import APIError
    from serve.ingress import LoRAIngress, status_and_message

    (tmp_path / "index.json").write_text(json.dumps({"format": 1, "models": {}}))
    ingress = types.SimpleNamespace(cfg=ServeConfig(), resolver=Resolver(RegistrySource(str(tmp_path))), canary=None)
    with pytest.raises(APIError) as unknown:
        asyncio.run(LoRAIngress._target(ingress, "base:city", "caller"))
    assert unknown.value.status == 404
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(Exception) as corrupt:
        asyncio.run(LoRAIngress._target(ingress, "base:city", "caller"))
    status, message = status_and_message(corrupt.value)
    assert status == 503 and "index.json: not valid JSON" in message


# ----------------------------------------------------------------------------- 7. data.parse_actors on Ray Data


def test_data_stage_runs_with_parse_actors_capped(ray_session, tiny_model_dir, tmp_path):
    from pipelines.artifacts.manifest import read_manifest
    from pipelines.data import tokenize
    from pipelines.data.config import DataConfig

    rows = [{"instruction": f"Where is meeting {i}?", "input": f"We meet in city number {i} on day {i}.",
             "output": f"City {i}, day {i}."} for i in range(12)]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    cfg = DataConfig(train_path=str(src), parse_actors=1, max_length=128, max_rejected_fraction=0.5)
    out = tokenize.run(cfg, tiny_model_dir, tmp_path / "data")
    m = read_manifest(out)["metrics"]
    assert m["rows_in"] == 13 and m["rows_in"] == m["rows_kept"] + m["rows_rejected"]
    assert m["rejected_by_reason"].get("broken_json") == 1
