"""The rl stage run by the job graph on the tiny model (issue 39 part A): data → rl (from the base) → evaluate →
gate, real except the data stage (a stand-in: rl reads its prompts file, not the tokenized rows). GRPO for 2 steps
(G=2, 8 new tokens) on a vLLM engine actor; the served-engine parity check on the saved adapter with the same
engine; the rl adapter is the candidate the gate checks, publishes and `served` serves; a second run retrains
nothing. The graph's decisions with stand-ins for every stage are in tests/unit/cluster/test_rl_stage.py.

    .venv/bin/pytest tests/integration/test_rl_graph.py -q
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_graph_config
from tests.unit.cluster.test_graph import Stand

pytestmark = pytest.mark.integration


def test_rl_adapter_is_gated_published_served_and_cached(ray_session, tiny_model_dir, tmp_path):
    from cluster import graph, stages
    from cluster.config import RunConfig
    from pipelines.artifacts.manifest import read_manifest
    from pipelines.artifacts.registry import Registry

    doc = tiny_graph_config("g", tmp_path, tiny_model_dir, str(tmp_path / "runs"), str(tmp_path / "registry"))
    doc["rl"] = {"prompts_path": str(tmp_path / "train.jsonl"), "max_prompts": 4,
                 "columns": {"instruction": "instruction", "input": "input", "reference": "output"},
                 "prompt_template": "{instruction}\n\n{input}",
                 "rewards": [{"fn": "json_match", "args": {"column": "reference"}},
                             {"fn": "length_penalty", "weight": 0.5, "args": {"max_chars": 0, "scale": 64}}],
                 "num_generations": 2, "prompts_per_step": 2, "micro_batch_size": 4,
                 "sampling": {"max_new_tokens": 8}, "steps": 2, "lr": 3e-3, "parity": {"warn": 0.002, "stop": 0.01}}
    doc["serve"] = {"max_lora_rank": 8, "max_model_len": 256}
    cfg = RunConfig.model_validate(doc)
    stand = Stand()
    g = graph.Graph(cfg, until="gate", runners={"data": stand.runners()["data"]})
    g.run(log=lambda _: None)
    assert stand.ran() == ["data"] and set(g.folders) == {"data", "rl", "evaluate", "gate"}  # sft off: rl.start=base

    rl_dir = cfg.stage_dir("rl")
    steps = [json.loads(line) for line in (rl_dir / "rl_steps.jsonl").read_text().splitlines()]
    assert [s["published"] for s in steps] == ["policy@1", "policy@2"]
    m = read_manifest(rl_dir, kind="lora_adapter")["metrics"]
    assert m["steps"] == 2 and (rl_dir / "reward.png").stat().st_size > 0
    served = json.loads((rl_dir / "served_parity.json").read_text())
    assert served["tokens"] > 0 and 0 <= served["mean"] < 0.01, served  # float32 both sides
    # the candidate: evaluated first, gated with the served-engine figures, published as g@1
    variants = json.loads((cfg.stage_dir("evaluate") / "eval.json").read_text())["variants"]
    assert "g-rl" in variants and "base" in variants
    gate = json.loads((cfg.stage_dir("gate") / "gate.json").read_text())
    assert gate["passed"] and gate["adapter"] == "g-rl" and gate["version"] == 1
    assert gate["served_parity"] == served
    art = Registry(tmp_path / "registry").resolve("g@1")
    assert (art.path / "adapter_model.safetensors").read_bytes() == (rl_dir / "adapter_model.safetensors").read_bytes()
    assert json.loads((art.path / "registry.json").read_text())["lineage"]["gate"]["served_parity"] == served
    assert list(g.ctx.adapters) == ["g-rl"] and g.ctx.adapters["g-rl"] == str(art.path.resolve())
    assert stages.served(g.ctx).what.startswith(f"base {tiny_model_dir} + adapter g-rl = g@1")

    # a second run: every stage cached, nothing retrained, the same candidate from the registry. Its code hash is
    # the first run's: an edit of the package sources meanwhile (another change in this checkout) would rerun all
    again = Stand()
    planned = graph.Graph(cfg, until="gate")
    planned.code = g.code
    plan = {r["stage"]: r["status"] for r in planned.plan().rows}
    assert [plan[s] for s in ("data", "rl", "evaluate", "gate")] == ["cached"] * 4
    g2 = graph.Graph(cfg, until="gate", runners=again.runners())
    g2.code = g.code
    g2.run(log=lambda _: None)
    assert again.ran() == [] and g2.ctx.adapters == g.ctx.adapters
