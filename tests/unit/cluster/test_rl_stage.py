"""The rl stage in the job graph (issue 39 part A): its place (data → sft → rl → evaluate → gate → serve), its
adapter the candidate, cached on a second run, rerun alone when its section changes, started again (not resumed)
after an interruption, SFT off when it starts from the base, after dpo with rl.start=dpo; `loraforge rl` and
`loraforge validate` refuse a bad rl section in one line (exit 2). Stand-in runners: the real rl stage runs in
tests/integration/test_rl_graph.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster import graph, stages
from cluster.cli import app
from cluster.config import ConfigError
from tests.unit.cluster.test_graph import Stand, config, statuses

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "pipelines" / "demo" / "city_date.jsonl"
RL = ["rl.prompts_path=" + str(DEMO), "rl.columns={prompt: instruction}", "rl.rewards=[{fn: length_penalty}]"]


def test_an_rl_config_plans_data_sft_rl_evaluate_gate_and_serves_the_rl_adapter(tmp_path):
    cfg = config(tmp_path, *RL, "rl.start=sft", "eval.test_path=" + str(DEMO))
    plan = graph.Graph(cfg).plan()
    rows = {r["stage"]: r for r in plan.rows}
    on = [r["stage"] for r in plan.rows if r["status"] == "run"]
    assert on == ["data", "sft", "rl", "evaluate", "gate", "serve", "demo"]
    assert rows["rl"]["upstream"] == ["sft"] and rows["rl"]["why"] == "upstream sft will run"
    assert "rl" in rows["evaluate"]["upstream"] and "rl" in rows["serve"]["upstream"]
    assert "\nrl " in plan.table()
    served = stages.served_in_plan(cfg, {r["stage"]: r["status"] for r in plan.rows})
    assert served.endswith(f"adapter {cfg.stage_dir('rl')}, as its registry version under g")


def test_the_rl_adapter_is_the_candidate_and_a_second_run_is_cached(tmp_path):
    stand = Stand()
    g = graph.Graph(config(tmp_path, *RL, "rl.start=sft"), runners=stand.runners())
    g.run(log=lambda _: None)
    assert stand.ran() == ["data", "sft", "rl", "serve", "demo"]
    assert list(g.ctx.adapters) == ["g-rl", "g"]  # evaluated first, gated, merged, served
    assert g.ctx.adapters["g-rl"] == str(tmp_path / "g" / "rl")
    again = Stand()
    graph.Graph(config(tmp_path, *RL, "rl.start=sft"), runners=again.runners()).run(log=lambda _: None)
    assert again.ran() == ["serve", "demo"]  # data, sft and rl cached: nothing retrained
    changed = statuses(graph.Graph(config(tmp_path, *RL, "rl.start=sft", "rl.steps=3")))
    assert changed["rl"] == ("run", "rl section changed") and changed["sft"][0] == "cached"
    assert changed["data"][0] == "cached"
    # the code changed under a finished rl stage: it reruns (its key hashes the sources, as every stage's)
    record = json.loads((tmp_path / "g" / "rl" / "stage.json").read_text())
    assert record["status"] == "done" and record["parts"]["upstream"].keys() == {"sft"}


def test_an_interrupted_rl_stage_starts_again(tmp_path):
    stand = Stand()
    cfg = config(tmp_path, *RL, "rl.start=sft")
    g = graph.Graph(cfg, runners=stand.runners())
    g.run(log=lambda _: None)
    rec = tmp_path / "g" / "rl" / "stage.json"
    doc = json.loads(rec.read_text())
    rec.write_text(json.dumps({**doc, "status": "running"}))
    assert statuses(graph.Graph(cfg))["rl"] == ("run", "interrupted earlier: rl does not resume, it starts again")
    again = Stand()
    graph.Graph(cfg, runners=again.runners()).run(log=lambda _: None)
    assert ("rl", False) in again.calls  # resume=False: from the start


def test_from_the_base_sft_is_off_and_after_dpo_rl_starts_from_dpo(tmp_path):
    plan = statuses(graph.Graph(config(tmp_path, *RL)))  # rl.start defaults to base
    assert plan["sft"] == ("off", "rl.start=base: online RL starts from the base")
    assert plan["rl"] == ("run", "no record: never ran here")
    rows = {r["stage"]: r for r in graph.Graph(config(tmp_path, *RL)).plan().rows}
    assert rows["rl"]["upstream"] == []
    cfg = config(tmp_path, *RL, "rl.start=dpo", "dpo.train_path=pairs.jsonl")
    rows = {r["stage"]: r for r in graph.Graph(cfg).plan().rows}
    assert [rows[s]["status"] for s in ("sft", "dpo", "rl")] == ["run", "run", "run"]
    assert rows["rl"]["upstream"] == ["dpo"] and rows["rl"]["why"] == "upstream dpo will run"
    stand = Stand()
    g = graph.Graph(cfg, runners=stand.runners())
    g.run(log=lambda _: None)
    assert stand.ran()[:4] == ["data", "sft", "dpo", "rl"]
    assert list(g.ctx.adapters)[:2] == ["g-rl", "g-dpo"]
    # rl from the base beside dpo from sft: SFT stays on (dpo reads it), rl reads nothing upstream
    rows = {r["stage"]: r for r in graph.Graph(config(tmp_path, *RL, "dpo.train_path=p.jsonl")).plan().rows}
    assert rows["sft"]["status"] != "off" and rows["rl"]["upstream"] == []


def test_the_rl_stage_alone_needs_the_adapter_it_starts_from(tmp_path):
    cfg = config(tmp_path, *RL, "rl.start=sft")
    with pytest.raises(Exception, match=r"holds no sft output: run `loraforge sft c.yaml` first"):
        stages.needs_output(cfg, stages.RL, "c.yaml")
    stages.needs_output(config(tmp_path, *RL), stages.RL, "c.yaml")  # from the base: nothing upstream


@pytest.mark.parametrize("override,needle", [
    ("rl.rewards=[]", "rl.rewards is empty"),
    ("rl.start=dpo", "rl.start=dpo starts from the preference-tuned adapter: set dpo.train_path"),
    ("rl.prompts_path=", "rl.prompts_path is not set"),
    ("rl.parity.stop=0.001", "parity.stop (0.001) is below parity.warn (0.02)"),
    ("rl.rewards=[{fn: 'nope.mod:fn'}]", "nope.mod"),
    ("rl.stepz=3", "rl.stepz: Extra inputs are not permitted"),
])
def test_a_bad_rl_section_is_one_line_exit_2(tmp_path, override, needle):
    with pytest.raises(ConfigError, match=None):
        config(tmp_path, *RL, override)
    path = _config_file(tmp_path)
    result = CliRunner().invoke(app, ["validate", str(path), override])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
    assert "Traceback" not in result.output


def test_preflight_checks_the_prompts_file_and_what_the_stage_refuses(tmp_path):
    path = _config_file(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(path), f"rl.prompts_path={tmp_path / 'none.jsonl'}"])
    assert result.exit_code == 2 and "rl.prompts_path=" in result.output and len(result.output.splitlines()) == 1
    result = runner.invoke(app, ["rl", str(path), "train.deepspeed=zero2"])
    assert result.exit_code == 2 and "rl: DeepSpeed ZeRO and QLoRA are not wired" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    help_ = runner.invoke(app, ["rl", "--help"])
    assert help_.exit_code == 0 and "Online RL (GRPO family)" in help_.output


def test_the_dry_run_of_the_tiny_rl_config_shows_the_stage():
    result = CliRunner().invoke(app, ["run", str(ROOT / "configs" / "rl-grpo-tiny-cpu.yaml"), "--dry-run",
                                      "output_dir=/nonexistent-rl-dry-run"])
    assert result.exit_code == 0, result.output
    rl_row = next(line for line in result.output.splitlines() if line.startswith("rl "))
    assert rl_row.split()[1:3] == ["sft", "run"], rl_row
    assert "adapter /nonexistent-rl-dry-run/rl-grpo-tiny/rl, as its registry version" in result.output


def _config_file(tmp_path) -> Path:
    """A run config with a valid rl: section on a local model folder (a config.json is all preflight reads)."""
    import yaml

    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    doc = {"name": "ux", "output_dir": str(tmp_path / "runs"), "model": {"name": str(model)},
           "data": {"train_path": str(DEMO)},
           "rl": {"prompts_path": str(DEMO), "columns": {"prompt": "instruction"},
                  "rewards": [{"fn": "length_penalty"}]}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_gate_refuses_an_adapter_the_serving_engine_does_not_compute_as_trained(tmp_path):
    """The served-engine parity figures beside an rl adapter (pipelines.eval.served_parity) go into the gate's
    decision; a mean above rl.parity.stop is a refusal with its figures, whatever the scores."""
    from pipelines.eval import gate, served_parity

    adapter = tmp_path / "rl"
    adapter.mkdir()
    results = {"variants": {"base": {"rougeL": 0.1, "exact_match": 0.0}, "g-rl": {"rougeL": 0.9, "exact_match": 1.0}}}
    section = gate.GateSection(min_exact_match=None)
    figures = {"mean": 0.35, "max": 2.1, "tokens": 48, "prompts": 4, "temperature": 1.0, "max_tokens": 16}
    (adapter / served_parity.RECORD).write_text(json.dumps(figures))
    d = gate.apply(results, "g-rl", adapter, section, tmp_path / "registry", "g", parity_stop=0.2)
    assert not d.passed and d.version is None and d.served_parity == figures
    assert d.reasons == ["served-engine parity: mean |log π_trainer − log π_engine| = 0.35 (max 2.1 over 48 sampled "
                         "tokens) > rl.parity.stop=0.2: the served adapter does not compute what was trained"]
    assert served_parity.refusal({**figures, "mean": 1e-6}, 0.2) is None
    assert served_parity.refusal(None, 0.2) is None  # no figures (not an rl adapter): nothing to refuse on
