"""The align stage's methods in the job graph: ORPO from the base turns SFT off, the aligned adapter is the one
evaluated and served, a changed dpo.method reruns the stage (and only what follows it), a finished one is cached."""

from __future__ import annotations

import pytest

from cluster import graph, stages
from cluster.config import ConfigError, load_config
from tests.unit.cluster.test_graph import Stand, config, statuses


def test_orpo_from_the_base_skips_sft_and_is_served(tmp_path):
    cfg = config(tmp_path, "dpo.train_path=pairs.jsonl", "dpo.method=orpo", "dpo.start=base", "eval.max_samples=4")
    plan = statuses(graph.Graph(cfg))
    assert plan["sft"] == ("off", "dpo.start=base: preference tuning starts from the base")
    assert plan["dpo"][0] == "run" and plan["evaluate"][0] == plan["gate"][0] == "run"
    on = {name: status for name, (status, _) in plan.items()}
    assert stages.served_in_plan(cfg, on).endswith(str(cfg.stage_dir("dpo")) + ", as its registry version under g")
    stand = Stand()
    cfg = config(tmp_path, "dpo.train_path=pairs.jsonl", "dpo.method=orpo", "dpo.start=base")
    g = graph.Graph(cfg, runners=stand.runners())
    g.run(log=lambda _: None)
    assert "sft" not in stand.ran() and stand.ran()[:2] == ["data", "dpo"]
    assert list(g.ctx.adapters) == ["g-dpo"]  # the aligned adapter is the candidate (evaluated, gated, served)
    assert g.ctx.adapters["g-dpo"] == str(cfg.stage_dir("dpo").resolve())
    stages.needs_output(cfg, stages.DPO, "c.yaml")  # `loraforge dpo` alone needs no SFT output here


@pytest.mark.parametrize("method", ["simpo", "kto"])
def test_a_changed_method_reruns_the_stage_and_a_finished_one_is_cached(tmp_path, method):
    stand = Stand()
    base = ["dpo.train_path=pairs.jsonl"]
    graph.Graph(config(tmp_path, *base), runners=stand.runners()).run(log=lambda _: None)
    assert "sft" in stand.ran() and "dpo" in stand.ran()
    changed = statuses(graph.Graph(config(tmp_path, *base, f"dpo.method={method}")))
    assert changed["dpo"] == ("run", "dpo section changed") and changed["sft"][0] == "cached"
    stand.calls.clear()
    graph.Graph(config(tmp_path, *base, f"dpo.method={method}"), runners=stand.runners()).run(log=lambda _: None)
    assert stand.ran() == ["dpo", "serve", "demo"]
    assert statuses(graph.Graph(config(tmp_path, *base, f"dpo.method={method}")))["dpo"][0] == "cached"


def test_method_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="dpo.method"):
        config(tmp_path, "dpo.method=ppo")
    with pytest.raises(ConfigError, match="loss_type=ipo is a DPO variant"):
        config(tmp_path, "dpo.method=orpo", "dpo.loss_type=ipo")
    with pytest.raises(ConfigError, match="dpo.simpo.beta"):
        config(tmp_path, "dpo.simpo.beta=0")
    cfg = load_config(None, ["dpo.method=simpo"])
    assert (cfg.dpo.simpo.beta, cfg.dpo.simpo.gamma_beta_ratio, cfg.dpo.orpo.lam, cfg.dpo.beta) == (2.0, 0.5, 0.1, 0.1)


@pytest.mark.parametrize("n_d,n_u,want", [(60, 60, 1.0), (40, 30, 1.0), (100, 50, 1.5), (30, 60, 0.5)])
def test_kto_weights_keep_the_weighted_ratio_within_1_to_4_3(n_d, n_u, want):
    from pipelines.train.config import KTOOptions

    w_d, w_u = KTOOptions().weights(n_d, n_u)
    assert w_u == pytest.approx(want) and 1.0 - 1e-9 <= w_d * n_d / (w_u * n_u) <= 4 / 3 + 1e-9
    assert KTOOptions(undesirable_weight=2.0).weights(n_d, n_u) == (1.0, 2.0)


@pytest.mark.parametrize("method,start", [("orpo", "base"), ("simpo", "sft"), ("kto", "sft")])
def test_each_method_s_adapter_is_what_evaluate_and_the_gate_judge(tmp_path, method, start):
    """dpo → evaluate → gate for every new method: the adapter evaluate is given first (the one _gate judges and
    publishes, next(iter(ctx.adapters))) is the align stage's `<run>-dpo` folder, the SFT adapter after it when
    there is one; a refusing gate then stops the run before serving."""
    rows = tmp_path / "test.jsonl"
    rows.write_text('{"instruction": "a", "output": "b"}\n')
    stand, seen = Stand(gate_passes=False), {}
    runners = stand.runners()

    def watching(name):
        inner = runners[name]

        def run(ctx, resume):
            seen[name] = dict(ctx.adapters)
            return inner(ctx, resume)
        return run

    runners.update(evaluate=watching("evaluate"), gate=watching("gate"))
    cfg = config(tmp_path, "dpo.train_path=pairs.jsonl", f"dpo.method={method}", f"dpo.start={start}",
                 f"eval.test_path={rows}")
    with pytest.raises(graph.GateRefused):
        graph.Graph(cfg, runners=runners).run(log=lambda _: None)
    assert stand.ran() == ["data"] + (["sft"] if start == "sft" else []) + ["dpo", "evaluate", "gate"]
    dpo_dir = str(cfg.stage_dir("dpo").resolve())
    want = {"g-dpo": dpo_dir, **({"g": str(cfg.stage_dir("sft").resolve())} if start == "sft" else {})}
    for stage in ("evaluate", "gate"):
        assert seen[stage] == want and next(iter(seen[stage])) == "g-dpo", (stage, seen[stage])
