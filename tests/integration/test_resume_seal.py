"""Resuming a training stage (issue 37): the loop unpickles a checkpoint's state only when the run sealed it. A
pickle planted in the checkpoint, or a changed optimizer state, stops the resume before anything is loaded, naming
the file (a UserError: exit 2 through the CLI); the checkpoint as written resumes. Real loop, real checkpoints
(`fit_local`: the worker loop in this process, no Ray)."""

from __future__ import annotations

import shutil

import pytest

from pipelines.train.state_seal import UnsealedState

pytestmark = pytest.mark.integration


def test_resume_refuses_pickled_state_the_run_did_not_write(tiny_model_dir, tokenized_dir, tmp_path, capsys):
    from pipelines.artifacts.location import Location
    from pipelines.artifacts.manifest import read_manifest
    from pipelines.train.config import LoraSection, QuantSection, TrainSection, WorkerJob
    from pipelines.train.driver import fit_local
    from pipelines.train.sft import train_loop_per_worker

    job = WorkerJob(model_dir=tiny_model_dir, dtype="float32", quant=QuantSection(), lora=LoraSection(r=4),
                    train=TrainSection(max_steps=2, batch_size=4, checkpoint_every=2, eval_every=2,
                                       tracking_uri="off"),
                    storage=str(tmp_path / "storage"), data=Location(tokenized_dir))
    manifest = read_manifest(tokenized_dir)
    result = fit_local(train_loop_per_worker, job, manifest, "sft")
    last = result.checkpoint.path
    assert sorted(p.name for p in last.glob("seal*.json")) == ["seal0.json"]

    planted = last / "evil.pt"
    shutil.copy(last / "optimizer.pt", planted)  # a real torch pickle, not one this run wrote there
    with pytest.raises(UnsealedState, match=rf"{planted}: pickled state that this run did not write"):
        fit_local(train_loop_per_worker, job, manifest, "sft", fresh=False)
    planted.unlink()
    optimizer = (last / "optimizer.pt").read_bytes()
    (last / "optimizer.pt").write_bytes(optimizer[:-1] + bytes([optimizer[-1] ^ 1]))
    with pytest.raises(UnsealedState, match="optimizer.pt: changed since this run wrote it"):
        fit_local(train_loop_per_worker, job, manifest, "sft", fresh=False)
    (last / "optimizer.pt").write_bytes(optimizer)
    capsys.readouterr()
    longer = job.model_copy(update={"train": job.train.model_copy(update={"max_steps": 3})})  # the same key
    again = fit_local(train_loop_per_worker, longer, manifest, "sft", fresh=False)  # as written: it resumes
    assert "[sft] resumed from step 2" in capsys.readouterr().out
    assert again.checkpoint is not None and (again.checkpoint.path / "seal0.json").is_file()
