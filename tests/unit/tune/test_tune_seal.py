"""Ray Tune's experiment state is pickles Tuner.restore unpickles (issue 37): tune.sweep seals them after every fit
and verifies them before a restore (pipelines.train.state_seal.seal_tune / verify_tune). A folder laid out as
Tune 2.60 writes it (tuner.pkl, experiment_state-*.json, searcher-state-*.pkl, a trial's params.pkl); the real
folder of an interrupted sweep is checked in tests/integration/test_tune.py."""

from __future__ import annotations

import pickle

import pyarrow.fs as pafs
import pytest

from pipelines.train.state_seal import TUNE_SEAL, UnsealedState, seal_tune, verify_tune

KEY = "k" * 64


@pytest.fixture()
def experiment(tmp_path):
    folder = tmp_path / "experiments" / "sweep-abc"
    trial = folder / "run_trial_1a2b_00000"
    trial.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(pickle.dumps({"param_space": {"r": [4, 16]}}))
    (folder / "experiment_state-2026-12-07_18-00-00.json").write_text('{"trial_data": []}')
    (folder / "basic-variant-state-2026-12-07_18-00-00.json").write_text("{}")
    (folder / "searcher-state-2026-12-07_18-00-00.pkl").write_bytes(pickle.dumps([1, 2]))
    (trial / "params.pkl").write_bytes(pickle.dumps({"r": 4}))
    (trial / "params.json").write_text('{"r": 4}')
    (trial / "result.json").write_text('{"eval_loss": 1.0}\n')
    return folder


def refused(folder, key=KEY, fs=None) -> str:
    with pytest.raises(UnsealedState) as e:
        verify_tune(str(folder), key, fs)
    message = str(e.value)
    assert "\n" not in message  # one line: the CLI prints it as is, exit 2
    return message


def test_sealed_state_verifies_locally_and_through_a_pyarrow_filesystem(experiment):
    seal_tune(str(experiment), KEY)
    verify_tune(str(experiment), KEY)
    (experiment / TUNE_SEAL).unlink()
    seal_tune(str(experiment), KEY, pafs.LocalFileSystem())  # the store's path: written and read through fs
    verify_tune(str(experiment), KEY, pafs.LocalFileSystem())
    (experiment / "run_trial_1a2b_00000" / "result.json").write_text('{"eval_loss": 0.5}\n')  # not unpickled
    verify_tune(str(experiment), KEY)


def test_a_changed_tuner_pkl_is_refused_naming_it(experiment):
    seal_tune(str(experiment), KEY)
    (experiment / "tuner.pkl").write_bytes(pickle.dumps({"param_space": {"r": [4, 16]}, "x": 1}))
    message = refused(experiment)
    assert f"{experiment / 'tuner.pkl'}: changed since this run wrote it" in message
    assert "refusing to unpickle it" in message and f"remove {experiment}" in message


@pytest.mark.parametrize("planted", ["searcher-state-2027-01-01_00-00-00.pkl", "experiment_state-2027.json",
                                     "run_trial_1a2b_00000/error.pkl"])
def test_a_planted_pickle_or_experiment_state_is_refused(experiment, planted):
    seal_tune(str(experiment), KEY)
    (experiment / planted).write_bytes(b"\x80\x04planted")
    assert f"{experiment / planted}: pickled state that this run did not write" in refused(experiment)


def test_no_seal_or_another_machines_seal_is_refused(experiment):
    # unsealed: the first file Tune would read, in sorted order, is named
    assert f"{experiment / 'basic-variant-state-2026-12-07_18-00-00.json'}: pickled state" in refused(experiment)
    seal_tune(str(experiment), "another machine's key")
    assert "was not made with this machine's key" in refused(experiment)
    (experiment / TUNE_SEAL).write_text("not json")
    assert "not a seal of loraforge's" in refused(experiment)


def test_a_fit_that_wrote_nothing_is_not_sealed(tmp_path):
    seal_tune(str(tmp_path / "never-written"), KEY)
    assert not (tmp_path / "never-written").exists()
