"""The job graph's bookkeeping (cluster.graph): which stages run, which are cached and why, resume, the gate's stop.

The stages here are stand-ins that write a file into their folder: what is under test is the graph's decisions
over real records on disk; the real stages run in tests/integration/test_pipeline.py.
"""

from __future__ import annotations

import json

import pytest

from cluster import graph
from cluster.config import load_config
from cluster.stages import eval_section
from pipelines.schema import UserError


def config(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path}", "name=g", *overrides])


class Stand:
    """Runner stand-ins: each writes <stage>/out.txt (its content is what downstream keys hash) and logs calls."""

    def __init__(self, content: str = "v1", gate_passes: bool = True):
        self.calls: list[tuple[str, bool]] = []
        self.content, self.gate_passes = content, gate_passes

    def runners(self):
        def make(name):
            def run(ctx, resume):
                self.calls.append((name, resume))
                out = ctx.cfg.stage_dir(name)
                out.mkdir(parents=True, exist_ok=True)
                (out / "out.txt").write_text(f"{name} {self.content}")
                if name == "gate":
                    (out / "gate.json").write_text(json.dumps({"passed": self.gate_passes, "reasons": (
                        [] if self.gate_passes else ["rougeL gain 0.01 < 0.05"]), "name": "g", "version": None}))
                return out
            return run

        return {name: make(name) for name in graph.NAMES}

    def ran(self):
        return [n for n, _ in self.calls]


def statuses(g: graph.Graph) -> dict[str, tuple[str, str]]:
    return {r["stage"]: (r["status"], r["why"]) for r in g.plan().rows}


def test_first_plan_runs_what_is_enabled_and_says_why_the_rest_is_off(tmp_path):
    plan = statuses(graph.Graph(config(tmp_path)))
    assert plan["data"] == ("run", "no record: never ran here")
    assert plan["sft"] == ("run", "upstream data will run")
    assert plan["dpo"] == ("off", "dpo.train_path is not set")
    assert plan["tune"] == ("off", "no tune: section")
    assert plan["evaluate"][0] == plan["gate"][0] == "off"
    assert plan["merge"] == ("off", "no merge: section") and plan["quantize"][0] == "off"
    assert plan["serve"] == ("run", "always runs") and plan["demo"][0] == "run"


def test_second_run_is_cached_and_a_changed_section_reruns_only_its_stage(tmp_path):
    stand = Stand()
    graph.Graph(config(tmp_path), runners=stand.runners()).run(log=lambda _: None)
    assert stand.ran() == ["data", "sft", "serve", "demo"]
    record = json.loads((tmp_path / "g" / "sft" / "stage.json").read_text())
    assert record["status"] == "done" and record["output"].startswith("sha256:")

    again = Stand()
    graph.Graph(config(tmp_path), runners=again.runners()).run(log=lambda _: None)
    assert again.ran() == ["serve", "demo"]  # data and sft cached

    plan = statuses(graph.Graph(config(tmp_path, "train.lr=3e-4")))
    assert plan["data"][0] == "cached" and plan["sft"] == ("run", "train section changed")
    plan = statuses(graph.Graph(config(tmp_path, "data.max_length=64")))
    assert plan["data"] == ("run", "data section changed") and plan["sft"] == ("run", "upstream data will run")


def test_force_from_until_and_a_changed_output(tmp_path):
    graph.Graph(config(tmp_path), runners=Stand().runners()).run(log=lambda _: None)
    plan = statuses(graph.Graph(config(tmp_path), force=("data",)))
    assert plan["data"] == ("run", "forced (--force / --from)") and plan["sft"][1] == "upstream data will run"
    plan = statuses(graph.Graph(config(tmp_path), start="sft", until="sft"))
    assert plan["data"][0] == "cached" and plan["sft"][0] == "run"
    assert plan["serve"] == ("stop", "after --until sft") and plan["demo"][0] == "stop"
    (tmp_path / "g" / "sft" / "out.txt").write_text("edited by hand")
    assert statuses(graph.Graph(config(tmp_path)))["sft"] == ("run", "its output changed since it was recorded")
    with pytest.raises(UserError, match="unknown stage 'sfft'"):
        graph.Graph(config(tmp_path), force=("sfft",))


def test_a_stage_interrupted_under_the_same_key_resumes(tmp_path):
    graph.Graph(config(tmp_path), runners=Stand().runners()).run(log=lambda _: None)
    rec_path = tmp_path / "g" / "sft" / "stage.json"
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(json.dumps({**rec, "status": "running"}))  # what a killed driver leaves behind
    stand = Stand()
    graph.Graph(config(tmp_path), runners=stand.runners(), until="sft").run(log=lambda _: None)
    assert stand.calls == [("sft", True)]
    rec_path.write_text(json.dumps({**rec, "status": "running", "key": "something-else"}))
    assert statuses(graph.Graph(config(tmp_path)))["sft"] == ("run", "interrupted earlier, and its inputs changed "
                                                                     "since")


def test_a_refusing_gate_stops_the_run_before_serving_and_stays_refused(tmp_path):
    rows = tmp_path / "test.jsonl"
    rows.write_text('{"instruction": "a", "output": "b"}\n')
    stand = Stand(gate_passes=False)
    with pytest.raises(graph.GateRefused) as e:
        graph.Graph(config(tmp_path, f"eval.test_path={rows}"), runners=stand.runners()).run(log=lambda _: None)
    assert e.value.reasons == ["rougeL gain 0.01 < 0.05"]
    assert stand.ran() == ["data", "sft", "evaluate", "gate"]  # nothing served
    again = Stand(gate_passes=False)
    with pytest.raises(graph.GateRefused):
        graph.Graph(config(tmp_path, f"eval.test_path={rows}"), runners=again.runners()).run(log=lambda _: None)
    assert again.ran() == []  # the refusal is a cached result, not re-evaluated


def test_code_version_is_a_hash_of_the_sources():
    assert len(graph.source_hash()) == 16 and graph.source_hash() == graph.source_hash()


def test_an_eval_or_gate_section_alone_evaluates_the_curated_test_split(tmp_path):
    """issue 18 item 5: a config that asks for an evaluation (eval: or gate: section) without eval.test_path is
    evaluated on the run's curated test split; without such a section, or without a test split, evaluate is off
    and the plan says why."""
    from cluster.config import CURATED_TEST

    for asked in (["gate.min_exact_match=0.5"], ["eval.max_samples=8"]):
        cfg = config(tmp_path, *asked)
        assert cfg.eval_test_path() == CURATED_TEST
        assert eval_section(cfg).test_path == str(cfg.stage_dir("data") / "curated" / "test")
        plan = statuses(graph.Graph(cfg))
        assert plan["evaluate"][0] == plan["gate"][0] == "run", plan
    assert statuses(graph.Graph(config(tmp_path)))["evaluate"] == ("off", "no eval: or gate: section (or "
                                                                           "eval.test_path)")
    no_split = config(tmp_path, "gate.min_exact_match=0.5", "data.split.train=0.9", "data.split.test=0")
    assert no_split.eval_test_path() is None
    assert statuses(graph.Graph(no_split))["evaluate"][1].startswith("eval.test_path is not set and data.split.test")
    explicit = config(tmp_path, "eval.test_path=rows.jsonl")
    assert explicit.eval_test_path() == "rows.jsonl" and eval_section(explicit) is explicit.eval


# The quickstart's first plan as the code before the stage table (commit 8a155db) printed it: the table moved,
# the graph's decisions must not have.
QUICKSTART_PLAN_8A155DB = """\
stage     upstream                status   why
data      -                       run      no record: never ran here
sft       data                    run      upstream data will run
dpo       sft                     off      dpo.train_path is not set
tune      data                    off      no tune: section
evaluate  sft                     run      upstream sft will run
gate      evaluate                run      upstream evaluate will run
merge     sft,gate                off      no merge: section
quantize  -                       off      no quantize: section
serve     sft,gate                run      always runs
demo      serve                   run      always runs"""


def test_the_quickstart_plan_is_what_it_was_before_the_stage_table(tmp_path):
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[3] / "configs" / "quickstart-cpu.yaml",
                      [f"output_dir={tmp_path}"])
    table = graph.Graph(cfg).plan().table().splitlines()
    # the rl stage (issue 39) came later: off without an rl: section, every other row as it was
    assert [line.split(None, 3)[2:] for line in table if line.startswith("rl ")] == [["off", "no rl: section"]]
    assert "\n".join(line for line in table if not line.startswith("rl ")) == QUICKSTART_PLAN_8A155DB
