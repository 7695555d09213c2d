"""The shipped alert rules and Grafana dashboard name only metrics the app exports, and `loraforge monitor`'s
judgement (serve/monitor.py) on a Prometheus text export.

    .venv/bin/python -m pytest tests/unit/serve/test_serve_monitoring.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from pipelines.artifacts.registry import Registry
from serve import monitor
from serve.metrics import EXPORTED

SERVE = Path(__file__).resolve().parents[3] / "serve"
METRIC = re.compile(r"\bray_loraforge_[a-z_]+")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}


def exported_series() -> set[str]:
    return {name + s for name, kind in EXPORTED.items() for s in SUFFIXES[kind]}


def test_exported_is_every_metric_the_code_creates():
    """EXPORTED (what rules and panels may name) is exactly the ray.util.metrics objects serve/ creates."""
    created = set()
    for path in SERVE.glob("*.py"):
        created |= {"ray_" + m for m in re.findall(r'(?:Counter|Histogram|Gauge)\(\s*"(loraforge_[a-z_]+)"',
                                                     path.read_text())}
    assert created == set(EXPORTED)


def test_alert_rules_and_dashboard_name_exported_metrics():
    rules = yaml.safe_load((SERVE / "monitoring" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    assert any("alert" in r for g in rules["groups"] for r in g["rules"])
    dash = json.loads((SERVE / "monitoring" / "grafana-dashboard.json").read_text())
    panels = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    queries = [v["query"] for v in dash["templating"]["list"]]
    assert len(panels) >= 10
    series = exported_series()
    for where, expr in [("rule", e) for e in exprs] + panels + [("variable", q) for q in queries]:
        names = METRIC.findall(expr)
        assert names, (where, expr)  # every query reads at least one metric of ours
        assert set(names) <= series, (where, sorted(set(names) - series))
        assert set(re.findall(r"\bloraforge:[a-z_0-9:]+", expr)) <= recorded, (where, expr)
    titles = " ".join(t for t, _ in panels).lower()
    for needed in ("traffic share", "latency", "first token", "entropy", "canary", "judge score", "judged"):
        assert needed in titles


def export(answers: dict[tuple[str, str], tuple[int, float, int]]) -> str:
    """A Prometheus text export as Ray writes it: (adapter, version) -> (answers, entropy sum, empty)."""
    lines = ["# TYPE ray_loraforge_answers_total counter", "# TYPE ray_loraforge_answers_flagged_total counter",
             "# TYPE ray_loraforge_answer_entropy histogram", "# TYPE ray_loraforge_answer_entropy_nats_total counter"]
    for (a, v), (n, s, empty) in answers.items():
        lab = f'adapter="{a}",version="{v}"'
        lines += [f'ray_loraforge_answers_total{{{lab},finish_reason="stop",Component="x"}} {n}',
                  f'ray_loraforge_answers_flagged_total{{{lab},flag="empty"}} {empty}',
                  f'ray_loraforge_answer_entropy_bucket{{{lab},le="+Inf"}} {n}',
                  f'ray_loraforge_answer_entropy_sum{{{lab}}} {round(s / n * 4) / 4 * n}',  # Ray's midpoint sum
                  f'ray_loraforge_answer_entropy_nats_total{{{lab}}} {s}',
                  f'ray_loraforge_answer_entropy_count{{{lab}}} {n}']
    lines += ["# TYPE ray_loraforge_canary_state gauge",
              'ray_loraforge_canary_state{adapter="city",incumbent="1",candidate="2"} -1',
              "# TYPE ray_loraforge_canary_percent gauge",
              'ray_loraforge_canary_percent{adapter="city",incumbent="1",candidate="2"} 0']
    return "\n".join(lines) + "\n"


def test_monitor_judges_each_version_against_its_stored_baseline(tmp_path, capsys):
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    reg = Registry(tmp_path / "registry")
    lineage = {"base_model": "b", "base_model_hash": "h", "dataset_hash": "d", "config": {"r": 8},
               "serve_baseline": {"entropy_mean": 1.0, "entropy_sd": 0.4, "empty_rate": 0.0, "answers": 30}}
    reg.publish("city", adapter, "lora_adapter", lineage)
    reg.publish("city", adapter, "lora_adapter", lineage)
    before = export({("city", "1"): (100, 100.0, 0), ("city", "2"): (10, 10.0, 0), ("", ""): (5, 5.0, 0)})
    after = export({("city", "1"): (140, 141.0, 0), ("city", "2"): (50, 90.0, 12), ("", ""): (50, 50.0, 0)})
    pages = iter([before, after])
    rep = monitor.report("http://x/metrics", str(tmp_path / "registry"), 30, 3.0, fetch=lambda _: next(pages),
                         sleep=lambda _: None)
    by = {(v["adapter"], v["version"]): v for v in rep["versions"]}
    assert by[("city", "1")]["answers"] == 40 and by[("city", "1")]["judgement"] == "ok"
    bad = by[("city", "2")]
    assert bad["entropy_mean"] == 2.0 and bad["judgement"] == "breach"
    assert "entropy 2.000 outside" in bad["reasons"][0] and "empty rate 0.300" in bad["reasons"][1]
    assert by[("(base)", "")]["judgement"] == "no baseline"
    assert rep["canaries"] == [{"adapter": "city", "incumbent": "1", "candidate": "2", "state": "rolled_back",
                                "percent": 0.0}]
    text = "\n".join(monitor.lines(rep))
    assert "city@2" in text and "breach" in text and "rolled_back at 0%" in text


def test_monitor_cli_unreachable_export_is_one_line_exit_2():
    from typer.testing import CliRunner

    from cluster.cli import app
    from tests.conftest import free_port

    result = CliRunner().invoke(app, ["monitor", "--metrics", f"http://127.0.0.1:{free_port()}/metrics", "--window",
                                      "0"])
    assert result.exit_code == 2 and "cannot read the Prometheus export" in result.output, result.output
    assert "Traceback" not in result.output
