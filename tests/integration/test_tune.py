"""Sweeps: real Ray Tune over real Ray Train (V2) trials of the SFT loop, PEFT on the tiny model.

    .venv/bin/pytest tests/integration/test_tune.py -q

The searcher sweep: the `tune:` section configs/tune-smollm2-gpu.yaml (optuna) ships, cut to 2 trials of 2 steps
one at a time, without ASHA: as many trials as num_samples, every point inside the declared space, the points the
seeded searcher gives (the same seed again: the same points; another seed: other points), the winner exported
with a manifest naming the sweep, the saved searcher state an Optuna study holding the trials' points and losses.
The random searcher of configs/tune-tiny-cpu.yaml is Tune's variant generator, the one the grid sweeps below run
trials through: its seeded points are checked without running trials of their own (a real random sweep of 2
trials cost ~56 s of the suite's budget).

The in-process grid sweep: 3 grid trials with ASHA, one at a time (so the order ASHA sees them in is fixed: the
rung is set by lr 1e-3, lr 1e-6 must be stopped there, lr 2e-2 must run on), each trial's worker
failing once at step 3 (the fault drill). The CLI sweep: `loraforge tune` joining the session's cluster,
interrupted with SIGINT once a trial has finished, then run again: it restores and does not rerun the finished
trial.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import DEMO, REPO

pytestmark = pytest.mark.integration


def _trial_starts(folder: Path) -> list[str]:
    return [json.loads(line)["trial_id"] for line in (folder / "trial_starts.log").read_text().splitlines()]


def _validation_loss(model_dir: str, adapter: Path, rows: dict) -> float:
    """Token-mean next-token cross-entropy of the adapter over the validation rows, one row at a time (no padding),
    with transformers + PEFT: what the trainer's eval_loss claims to be."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32),
                                      str(adapter)).eval()
    total = count = 0.0
    with torch.no_grad():
        for ids, labels in zip(rows["input_ids"], rows["labels"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            total += float(F.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / count


@pytest.fixture(scope="module")
def sweep(ray_session, tiny_model_dir, tokenized_dir, tmp_path_factory):
    from pipelines.train.config import LoraSection, TrainSection, TrainSetup
    from tune import sweep as sweep_mod
    from tune.space import TuneSection

    cfg = TuneSection.model_validate({
        "space": {"r": [4], "alpha": "ratio", "lr": [1e-3, 1e-6, 2e-2]}, "searcher": "grid",
        "num_samples": 1, "seed": 0, "asha": {"grace_period": 2, "reduction_factor": 2, "max_t": 4},
        "grid_order": "as_written",
        "eval_every": 2, "max_concurrent_trials": 1})
    train = TrainSection(num_workers=1, cpus_per_worker=0.95, batch_size=8, warmup_steps=1, eval_max_batches=100,
                         log_every=100, fail_once_at_step=3)
    lora = LoraSection(r=8, dropout=0.0, target_modules="all-linear")
    out = tmp_path_factory.mktemp("sweep")
    t0 = time.time()
    before = sweep_mod.live_placement_groups()
    setup = TrainSetup(model_dir=tiny_model_dir, model_name="tiny-llama", train=train)
    folder = sweep_mod.run(cfg, lora, setup, tokenized_dir, out)
    wall = time.time() - t0
    held = sorted(sweep_mod.live_placement_groups() - before)  # right when run() returns
    return folder, wall, held


def test_asha_stops_trials_and_frees_their_resources(ray_session, sweep):
    folder, wall, held = sweep
    manifest = json.loads((folder / "winner" / "manifest.json").read_text())
    trials = manifest["lineage"]["sweep"]["trials"]
    assert len(trials) == 3 and not any(t["status"] == "error" for t in trials), trials
    stopped = [t for t in trials if t["status"] == "stopped early"]
    # the first trial (lr 1e-3) sets the rung; lr 1e-6 barely learns, falls below it at step 2 and stops there;
    # lr 2e-2 beats the rung's median and runs to max_t
    assert [(t["config"]["lr"], t["steps"]) for t in stopped] == [(1e-6, 2)], trials
    assert sorted(t["config"]["lr"] for t in trials if t["status"] == "completed") == [1e-3, 2e-2], trials
    # each trial started once (no worker-failure restart of the trial itself) and all three ran on 2 CPUs: the
    # trials ASHA stopped gave their CPUs back (without the State API the later ones would never start)
    assert sorted(set(_trial_starts(folder))) == sorted(t["trial_id"] for t in trials)
    # with one trial at a time on 2 CPUs, the trial after the stopped one could only start once the stopped one's
    # 1.9 CPUs were back
    starts = _trial_starts(folder)
    assert starts.index(stopped[0]["trial_id"]) < len(starts) - 1, starts
    # and when run() returns, no placement group the sweep made is held (run waits for their removal): the next
    # stage in this driver gets every CPU
    assert held == [], held
    print(f"sweep of 3 trials: {wall:.0f} s")


def test_fault_drill_fired_in_trials_that_passed_step_3_and_they_finished(sweep):
    folder = sweep[0]
    trials = json.loads((folder / "winner" / "manifest.json").read_text())["lineage"]["sweep"]["trials"]
    for t in trials:
        fired = (folder / "trials" / t["trial_id"] / "fault_drill_step3").exists()
        if t["status"] == "completed":  # the drill killed a worker of every trial that ran past step 3 ...
            assert fired and t["steps"] == 4, t  # ... and Ray Train resumed it from its step-2 checkpoint to the end
        else:  # a stopped trial may run a step or two past its last report before ASHA's stop reaches it
            assert t["steps"] < 3, t


def test_winner_is_the_best_report_and_its_loss_is_real(sweep, tiny_model_dir, tokenized_dir):
    import pyarrow.parquet as pq

    folder = sweep[0]
    manifest = json.loads((folder / "winner" / "manifest.json").read_text())
    lineage = manifest["lineage"]["sweep"]
    best = min(t["best_eval_loss"] for t in lineage["trials"])
    assert lineage["winner"]["eval_loss"] == best == lineage["winner"]["best_reported_eval_loss"]
    winner_trial = next(t for t in lineage["trials"] if t["trial_id"] == lineage["winner"]["trial_id"])
    assert winner_trial["best_step"] == lineage["winner"]["step"]
    assert manifest["kind"] == "lora_adapter" and manifest["lineage"]["trial"]["id"] == winner_trial["trial_id"]
    assert manifest["config"]["lora"]["r"] == winner_trial["config"]["r"]
    assert manifest["config"]["lora"]["alpha"] == 2 * winner_trial["config"]["r"]  # alpha tied to rank
    assert manifest["config"]["train"]["lr"] == pytest.approx(winner_trial["config"]["lr"])
    rows = pq.read_table(tokenized_dir / "validation").to_pydict()
    recomputed = _validation_loss(tiny_model_dir, folder / "winner", rows)
    assert recomputed == pytest.approx(best, abs=2e-4), (recomputed, best)


def test_report_csv_and_plots(sweep):
    import csv

    folder = sweep[0]
    rows = list(csv.DictReader(open(folder / "sweep_results.csv")))
    assert len(rows) == 3 and {"trial_id", "status", "best_eval_loss", "r", "lr"} <= set(rows[0])
    report = (folder / "sweep_report.md").read_text()
    assert "Winner: trial" in report and "stopped early" in report
    for png in ("sweep_curves.png", "sweep_rank_lr.png"):
        assert (folder / png).stat().st_size > 5000


def test_each_trial_logs_to_mlflow_under_the_sweep_parent(sweep):
    import mlflow

    folder = sweep[0]
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    parent = json.loads((folder / "winner" / "manifest.json").read_text())["lineage"]["sweep"]["mlflow_parent_run"]
    experiment = client.get_experiment_by_name("loraforge-sweep")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 3
    assert all(math.isfinite(r.data.metrics["eval_loss"]) for r in children)


SHIPPED = {"random": "tune-tiny-cpu.yaml", "optuna": "tune-smollm2-gpu.yaml"}  # the config that ships each searcher


def _shipped_tune(searcher: str, seed: int):
    """The tune: section a shipped config declares for `searcher` (its space as written), with `seed`, cut to 2
    trials of 2 steps, one at a time, no ASHA."""
    from tune.space import TuneSection

    doc = yaml.safe_load((REPO / "configs" / SHIPPED[searcher]).read_text())["tune"]
    assert doc["searcher"] == searcher, doc
    doc.update(num_samples=2, seed=seed, asha=None, max_t=2, eval_every=2, max_concurrent_trials=1)
    return TuneSection.model_validate(doc)


def _searcher_points(cfg, losses: list[float]) -> list[dict]:
    """The points the sweep's own searcher (tune_config's search_alg over param_space) proposes, one trial at a
    time, each trial ending with its loss from `losses`: what Tune asks of it, without running trials."""
    from ray.tune.experiment import Experiment

    from pipelines.train.config import TrainSection
    from tune import sweep as sweep_mod

    search, space, points = sweep_mod.tune_config(cfg, TrainSection()).search_alg, sweep_mod.param_space(cfg), []
    if cfg.searcher == "optuna":
        search.set_search_properties(cfg.metric, "min", space)
        for i, loss in enumerate(losses):
            points.append(search.suggest(f"replay_{i}"))
            search.on_trial_complete(f"replay_{i}", {cfg.metric: loss})
    else:
        search.add_configurations([Experiment("replay", run=lambda config: None, config=space,
                                              num_samples=cfg.num_samples)])
        for _ in losses:
            trial = search.next_trial()
            points.append(sweep_mod.flat(trial.config))
            search.on_trial_complete(trial.trial_id)
    return points


def _assert_distinct_points_inside_the_space(cfg, points: list[dict]) -> None:
    """Every point names every axis of cfg's space, lr inside its log range, listed axes at a listed value, and no
    point repeats (sampled, not one point over and over)."""
    from tune.space import LogRange

    axes = cfg.space.axes()
    assert isinstance(axes["lr"], LogRange)  # both shipped configs search lr on a log range
    for point in points:
        assert set(point) == set(axes), (point, axes)
        assert axes["lr"].low <= point["lr"] <= axes["lr"].high, point
        for name, values in axes.items():
            if isinstance(values, list):
                assert point[name] in values, (name, point)
    assert len({tuple(sorted(p.items())) for p in points}) == len(points), points


@pytest.fixture(scope="module", params=["optuna"])
def searcher_sweep(request, ray_session, tiny_model_dir, tokenized_dir, tmp_path_factory):
    from pipelines.train.config import LoraSection, TrainSection, TrainSetup
    from tune import sweep as sweep_mod

    cfg = _shipped_tune(request.param, seed=0)
    train = TrainSection(num_workers=1, cpus_per_worker=0.95, batch_size=8, warmup_steps=1, eval_max_batches=2,
                         log_every=100, tracking_uri="off")
    lora = LoraSection(r=8, dropout=0.0, target_modules="all-linear")
    t0 = time.time()
    folder = sweep_mod.run(cfg, lora, TrainSetup(model_dir=tiny_model_dir, model_name="tiny-llama", train=train),
                           tokenized_dir, tmp_path_factory.mktemp(f"sweep-{request.param}"))
    print(f"{request.param} sweep of {cfg.num_samples} trials: {time.time() - t0:.0f} s")
    manifest = json.loads((folder / "winner" / "manifest.json").read_text())
    trials = sorted(manifest["lineage"]["sweep"]["trials"], key=lambda t: _trial_starts(folder).index(t["trial_id"]))
    return {"searcher": request.param, "cfg": cfg, "folder": folder, "manifest": manifest, "trials": trials}


def test_searcher_runs_num_samples_trials_inside_the_declared_space(searcher_sweep):
    cfg, trials = searcher_sweep["cfg"], searcher_sweep["trials"]
    assert len(trials) == cfg.num_samples and len({t["trial_id"] for t in trials}) == cfg.num_samples, trials
    assert all(t["status"] == "completed" and t["steps"] == 2 and math.isfinite(t["best_eval_loss"])
               for t in trials), trials
    _assert_distinct_points_inside_the_space(cfg, [t["config"] for t in trials])


def test_searcher_points_are_the_seeded_searchers(searcher_sweep):
    """The sweep's points, in the order its trials started, are what its searcher with tune.seed proposes; the
    same seed again proposes them again, another seed other points."""
    cfg, trials = searcher_sweep["cfg"], searcher_sweep["trials"]
    points, losses = [t["config"] for t in trials], [t["final_eval_loss"] for t in trials]
    assert _searcher_points(cfg, losses) == points
    assert _searcher_points(_shipped_tune(searcher_sweep["searcher"], seed=0), losses) == points
    other = _searcher_points(_shipped_tune(searcher_sweep["searcher"], seed=1), losses)
    assert all(o["lr"] != p["lr"] for o, p in zip(other, points)), (other, points)


def test_searcher_winner_exported_with_lineage_naming_the_sweep(searcher_sweep):
    folder, manifest, trials = searcher_sweep["folder"], searcher_sweep["manifest"], searcher_sweep["trials"]
    lineage = manifest["lineage"]["sweep"]
    assert lineage["name"].startswith("sweep-") and (folder / "experiments" / lineage["name"]).is_dir(), lineage
    assert manifest["kind"] == "lora_adapter" and manifest["config"]["tune"]["searcher"] == searcher_sweep["searcher"]
    best = min(trials, key=lambda t: t["best_eval_loss"])
    assert lineage["winner"]["trial_id"] == best["trial_id"] == manifest["lineage"]["trial"]["id"], lineage
    assert lineage["winner"]["eval_loss"] == best["best_eval_loss"]
    space, point, lora = searcher_sweep["cfg"].space, best["config"], manifest["config"]["lora"]
    adapter = json.loads((folder / "winner" / "adapter_config.json").read_text())
    assert adapter["r"] == lora["r"] == point["r"], (adapter, point)
    if space.alpha == "ratio":
        assert adapter["lora_alpha"] == lora["alpha"] == round(space.alpha_ratio * point["r"]), adapter
    if "target_modules" in point:
        assert lora["target_modules"] == point["target_modules"], (lora, point)
    assert manifest["config"]["train"]["lr"] == pytest.approx(point["lr"])
    assert (folder / "winner" / "adapter_model.safetensors").stat().st_size > 1000


def test_random_searcher_points_are_seeded_and_inside_the_declared_space():
    """The shipped random config's searcher (what its sweep's trials would get, replayed without trials): points
    inside the declared space, distinct, the same for the same seed, others for another seed."""
    cfg, losses = _shipped_tune("random", seed=0), [1.0, 0.5, 0.7]
    cfg = cfg.model_copy(update={"num_samples": len(losses)})
    points = _searcher_points(cfg, losses)
    assert _searcher_points(cfg, losses) == points
    _assert_distinct_points_inside_the_space(cfg, points)
    other = _searcher_points(cfg.model_copy(update={"seed": 1}), losses)
    assert all(o["lr"] != p["lr"] for o, p in zip(other, points)), (other, points)


def test_optuna_searcher_state_is_an_optuna_study_of_the_trials(searcher_sweep):
    """What Tune saved for the optuna sweep is OptunaSearch's state: a seeded TPE study whose trials are the sweep's
    points with their losses (a random or grid sweep saves a variant generator, no study)."""
    import pickle

    import optuna

    folder, trials = searcher_sweep["folder"], searcher_sweep["trials"]
    saved = list((folder / "experiments" / searcher_sweep["manifest"]["lineage"]["sweep"]["name"]).glob(
        "searcher-state-*.pkl"))
    assert len(saved) == 1, saved
    state = pickle.loads(saved[0].read_bytes())
    study = state["_ot_study"]
    assert isinstance(study, optuna.study.Study) and isinstance(study.sampler, optuna.samplers.TPESampler)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.params for t in done] == [t["config"] for t in trials], (done, trials)
    assert [t.value for t in done] == pytest.approx([t["final_eval_loss"] for t in trials])


def test_cli_sweep_interrupted_then_resumed_without_rerunning_finished_trials(ray_session, tiny_model_dir,
                                                                              tmp_path):
    """Two trials one at a time, no ASHA: SIGINT once the second has started, exit 130 with a resume hint; the
    same command again restores the experiment, resumes the second trial (not the first), registers the winner."""
    address = ray_session.get_runtime_context().gcs_address
    config = tmp_path / "tune.yaml"
    config.write_text(f"""name: cli-sweep
output_dir: {tmp_path / 'runs'}
model: {{name: {tiny_model_dir}, dtype: float32}}
data:
  train_path: {DEMO}
  max_length: 128
  split: {{train: 0.85, validation: 0.15, test: 0.0}}
lora: {{r: 8, dropout: 0.0, target_modules: all-linear}}
train: {{num_workers: 1, cpus_per_worker: 0.95, batch_size: 8, warmup_steps: 1, eval_max_batches: 2,
         log_every: 100, tracking_uri: "off"}}
tune:
  space: {{r: [4, 16], lr: [1.0e-3]}}
  searcher: grid
  num_samples: 1
  asha: null
  max_t: 4
  eval_every: 2
  max_concurrent_trials: 1
serve: {{max_lora_rank: 16}}
registry: {{root: {tmp_path / 'registry'}}}
ray: {{address: "{address}"}}
""")
    cmd = [sys.executable, "-m", "cluster", "tune", str(config)]
    sweep_dir = tmp_path / "runs" / "cli-sweep" / "tune"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, finished = [], None
    deadline = time.time() + 420
    for line in proc.stdout:
        lines.append(line)
        if finished is None and " finished" in line and line.startswith("[tune]"):
            finished = line.split()[1]
        if finished and (sweep_dir / "trial_starts.log").is_file() and len(_trial_starts(sweep_dir)) >= 2:
            proc.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline, "".join(lines[-40:])
    rest, _ = proc.communicate(timeout=300)
    out = "".join(lines) + rest
    assert finished, out[-4000:]
    assert proc.returncode == 130, out[-4000:]
    assert "interrupted: 1 of 2 trials finished" in out and "Run the same command again" in out, out[-3000:]
    assert not (sweep_dir / "winner").exists()
    # issue 37: the interrupted fit sealed Tune's pickled state; a changed tuner.pkl would be refused, naming it
    from pipelines.train.state_seal import TUNE_SEAL, UnsealedState, machine_key, verify_tune

    [experiment] = (sweep_dir / "experiments").glob("sweep-*")
    assert (experiment / TUNE_SEAL).is_file() and (experiment / "tuner.pkl").is_file()
    verify_tune(str(experiment), machine_key())
    tuner_pkl = (experiment / "tuner.pkl").read_bytes()
    (experiment / "tuner.pkl").write_bytes(tuner_pkl + b"\0")
    with pytest.raises(UnsealedState, match="tuner.pkl: changed since this run wrote it"):
        verify_tune(str(experiment), machine_key())
    (experiment / "tuner.pkl").write_bytes(tuner_pkl)

    again = subprocess.run(cmd + ["--register", "tiny-sweep"], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "[tune] restoring sweep-" in again.stderr  # our progress lines: on the terminal's stderr (as `run`'s)
    verify_tune(str(experiment), machine_key())  # the restored run sealed what it wrote
    assert again.stdout.strip().splitlines()[-1] == str(sweep_dir.resolve())
    starts = _trial_starts(sweep_dir)
    assert starts.count(finished) == 1, starts  # the finished trial was not rerun
    assert len(set(starts)) == 2 and len(starts) == 3, starts  # the interrupted one started again
    lineage = json.loads((sweep_dir / "winner" / "manifest.json").read_text())["lineage"]["sweep"]
    assert sorted(t["config"]["r"] for t in lineage["trials"]) == [4, 16]
    assert all(t["status"] == "completed" and t["steps"] == 4 for t in lineage["trials"]), lineage["trials"]
    assert "registry: tiny-sweep@1 (lora_adapter)" in again.stdout
