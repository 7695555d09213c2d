"""The tune: section: bad values fail at validate naming the key; a trial's point maps onto lora/train as documented."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.config import ConfigError, load_config
from pipelines.train.config import LoraSection, TrainSection
from tune.space import TuneSection, apply_trial, grid_points, grid_size, trial_label

BASE = {"space": {"r": [4, 8], "lr": {"low": 1e-4, "high": 1e-2}}}


def cfg(**over) -> TuneSection:
    return TuneSection.model_validate({**BASE, **over})


@pytest.mark.parametrize("bad, needle", [
    ({"space": {}}, "nothing to search"),
    ({"space": {"r": []}}, "empty list"),
    ({"space": {"r": [0, 8]}}, "1..256"),
    ({"space": {"lr": {"low": 1e-2, "high": 1e-4}}}, "must be below high"),
    ({"space": {"lr": [1e-3, -1.0]}}, "> 0"),
    ({"space": {"dropout": [1.5]}}, "[0, 1)"),
    ({"num_samples": 0}, "greater than or equal to 1"),
    ({"asha": {"grace_period": 20, "max_t": 10}}, "grace_period=20 > asha.max_t=10"),
    ({"searcher": "grid"}, "list of values"),
    ({"searcher": "hyperopt"}, "random"),
])
def test_bad_sections_are_refused(bad, needle):
    with pytest.raises(ValidationError) as e:
        cfg(**bad)
    assert needle in str(e.value)


def test_run_config_checks_rank_against_serving_and_validation_split(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tune:\n  space:\n    r: [8, 64]\nserve:\n  max_lora_rank: 32\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "tune.space.r goes up to 64 > serve.max_lora_rank=32" in str(e.value)
    p.write_text("tune:\n  space:\n    r: [8]\ndata:\n  split: {train: 1.0, validation: 0.0, test: 0.0}\n")
    with pytest.raises(ConfigError, match="validation split"):
        load_config(p)


def test_apply_trial_ties_alpha_to_rank_and_sets_the_cadence():
    tune = cfg(space={"r": [4, 16], "lr": [1e-3], "alpha": "ratio", "alpha_ratio": 2},
               asha={"grace_period": 4, "reduction_factor": 2, "max_t": 12}, eval_every=4)
    lora, train = apply_trial({"r": 16, "lr": 3e-3}, tune, LoraSection(r=8, alpha=7),
                              TrainSection(max_steps=100, checkpoint_every=5, eval_every=10, early_stopping_patience=3,
                                           warmup_steps=50))
    assert (lora.r, lora.alpha, lora.rslora) == (16, 32, False)
    assert train.lr == 3e-3 and train.max_steps == 12 and train.eval_every == 4
    assert train.checkpoint_every == 0 and train.early_stopping_patience == 0  # ASHA decides, reports checkpoint
    assert train.warmup_steps == 11  # never longer than the trial


def test_rslora_keeps_alpha_and_fixed_keeps_it_too():
    rs = cfg(space={"r": [4, 16], "alpha": "rslora"})
    lora, _ = apply_trial({"r": 4}, rs, LoraSection(r=8, alpha=16), TrainSection())
    assert (lora.r, lora.alpha, lora.rslora) == (4, 16, True)
    fixed = cfg(space={"r": [4, 16], "alpha": "fixed"})
    lora, _ = apply_trial({"r": 16}, fixed, LoraSection(r=8, alpha=16), TrainSection())
    assert (lora.r, lora.alpha, lora.rslora) == (16, 16, False)


def test_without_asha_the_trial_runs_train_max_steps_or_max_t():
    tune = cfg(asha=None)
    assert tune.steps(TrainSection(max_steps=30)) == 30
    assert cfg(asha=None, max_t=9).steps(TrainSection(max_steps=30)) == 9
    _, train = apply_trial({}, tune, LoraSection(), TrainSection(max_steps=30, eval_every=0))
    assert train.max_steps == 30 and train.eval_every == 30  # one report at the end


def test_grid_points_and_size():
    tune = cfg(space={"r": [4, 8, 16], "lr": [1e-3, 1e-4], "target_modules": ["attention"]}, searcher="grid")
    points = grid_points(tune.space)
    assert grid_size(tune.space) == len(points) == 6
    assert {(p["r"], p["lr"]) for p in points} == {(r, lr) for r in (4, 8, 16) for lr in (1e-3, 1e-4)}
    assert grid_size(cfg().space) is None  # a log-uniform range has no grid
    assert trial_label({"r": 8, "lr": 3.2e-4, "target_modules": "attention"}) == "r=8 lr=3.2e-04 tm=attention"


def test_grid_trials_start_in_a_seeded_shuffled_order_unless_as_written():
    """A grid under async ASHA: the trials start in a seeded shuffled order (every point once), so the first to
    reach a rung are not all the weakest of a list written from the lowest lr up; 'as_written' keeps the lists'
    order; a trial's point reads back flat."""
    from tune.space import TuneSection, grid_points
    from tune.sweep import POINT, flat, param_space

    def cfg(**kw):
        return TuneSection.model_validate({"space": {"r": [4, 8, 16, 32], "alpha": "ratio",
                                                     "lr": [1e-4, 5e-4, 2e-3, 8e-3]}, "searcher": "grid", **kw})

    written = grid_points(cfg().space)
    order = param_space(cfg(seed=0))[POINT]["grid_search"]
    assert sorted(map(str, order)) == sorted(map(str, written)) and order != written
    assert order == param_space(cfg(seed=0))[POINT]["grid_search"] != param_space(cfg(seed=1))[POINT]["grid_search"]
    plain = param_space(cfg(grid_order="as_written"))
    assert plain["r"] == {"grid_search": [4, 8, 16, 32]} and plain["lr"] == {"grid_search": [1e-4, 5e-4, 2e-3, 8e-3]}
    assert flat({POINT: {"r": 8, "lr": 2e-3}}) == {"r": 8, "lr": 2e-3} and flat({"r": 4}) == {"r": 4}
