"""Runs and the registry in an object store: a real S3 API on localhost (`moto` in server mode, started and stopped
here), reached the way an S3-compatible store is (AWS_ENDPOINT_URL + credentials). The tiny graph runs with
`output_dir` and `registry.root` as s3:// URIs; a second driver with an empty local mirror finds every stage
cached from what the store holds; Ray Train's checkpoints and a sweep's Tune state are in the store; the registry
entry resolves from another machine's (empty) mirror."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import BUCKET, free_port, keys, tiny_graph_config

REPO = Path(__file__).resolve().parents[2]


def test_push_pull_round_trip_and_an_unreachable_store(s3, tmp_path, monkeypatch):
    from pipelines.artifacts import storage

    src = tmp_path / "src"
    (src / "a" / "ray_train").mkdir(parents=True)
    (src / "a" / "f.txt").write_text("one")
    (src / "a" / "ray_train" / "optimizer.pt").write_bytes(b"state")
    (src / "top.json").write_text("{}")
    uri = f"s3://{BUCKET}/roundtrip"
    assert storage.push(src, uri, skip=("ray_train",)) == 2
    assert keys("roundtrip/") == ["roundtrip/a/f.txt", "roundtrip/top.json"]
    dst = tmp_path / "dst"
    assert storage.pull(uri, dst) == 2 and (dst / "a" / "f.txt").read_text() == "one"
    assert storage.pull(uri, dst) == 0  # unchanged: nothing copied again
    (src / "a" / "f.txt").write_text("two!")
    storage.push(src / "a" / "f.txt", f"{uri}/a/f.txt")
    assert storage.pull(uri, dst) == 1 and (dst / "a" / "f.txt").read_text() == "two!"
    assert storage.pull(f"s3://{BUCKET}/nothing-here", tmp_path / "none") == 0

    # a key with '..' (a store accepts it) would be followed out of the local mirror: refused, nothing written
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1").put_object(
        Bucket=BUCKET, Key="hostile/run/../../escaped.txt", Body=b"x")
    mirror = tmp_path / "mirror" / "deep"
    with pytest.raises(storage.StorageError, match="its key leaves the local mirror"):
        storage.pull(f"s3://{BUCKET}/hostile/run", mirror)
    assert not list(tmp_path.rglob("escaped.txt"))

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(storage.StorageError, match="the store does not answer"):
        storage.pull(uri, dst)


def test_registry_in_the_store_resolves_from_another_mirror(s3, tiny_model_dir, tmp_path, monkeypatch):
    """Published through one machine's mirror, resolved (files pulled) and promoted through another's."""
    from pipelines.artifacts.registry import Registry
    from tests.unit.artifacts.test_registry import LINEAGE, make_adapter

    root = f"s3://{BUCKET}/registry-unit"
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "machine-a"))
    version = Registry(root).publish("city", make_adapter(tmp_path / "a"), "lora_adapter", LINEAGE)
    assert f"registry-unit/models/city/{version}/adapter_model.safetensors" in keys("registry-unit/")

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "machine-b"))
    other = Registry(root)
    art = other.resolve("city")
    assert art.version == version and str(art.path).startswith(str(tmp_path / "machine-b"))
    assert (art.path / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    other.promote("city", version, "production", reason="test")

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "machine-a"))
    assert Registry(root).resolve("city@production").version == version  # the alias reached machine a
    assert [r["action"] for r in Registry(root).audit()] == ["publish", "promote"]
    # the CLI reads the store too (its --root once collapsed s3:// into a local folder s3:/ and printed nothing)
    from typer.testing import CliRunner

    from cluster.cli import app

    out = CliRunner().invoke(app, ["registry", "list", "--json", "--root", root])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.strip().splitlines()[-1])[0]["aliases"] == {"production": version}
    assert not (Path.cwd() / "s3:").exists()


def test_graph_with_s3_output_and_registry_resumes_from_the_store(s3, ray_session, tiny_model_dir, tmp_path):
    cfg = tiny_graph_config("s3run", tmp_path, tiny_model_dir, f"s3://{BUCKET}/runs", f"s3://{BUCKET}/registry")
    # and a 1-trial sweep, whose Tune state and trial checkpoints go to the store (its winner is what is evaluated)
    cfg["train"]["fail_once_at_step"] = 3  # the fault drill: its marker goes beside the checkpoints, in the store
    cfg["tune"] = {"space": {"r": [8], "alpha": "ratio", "lr": [5e-3]}, "searcher": "grid", "num_samples": 1,
                   "asha": None, "max_t": 2, "eval_every": 2, "max_concurrent_trials": 1}
    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump(cfg))
    address = ray_session.get_runtime_context().gcs_address

    def run(machine: str, *extra: str) -> subprocess.CompletedProcess:
        env = {**os.environ, **s3["env"], "LORAFORGE_CACHE": str(tmp_path / machine)}
        return subprocess.run([sys.executable, "-m", "cluster", "run", str(config), "--until", "gate",
                               f"ray.address={address}", *extra], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900)

    first = run("machine-a")
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    stored = keys("runs/s3run/")
    for key in ("data/stage.json", "data/manifest.json", "sft/stage.json", "sft/adapter_model.safetensors",
                "sft/manifest.json", "evaluate/eval.json", "gate/gate.json"):
        assert f"runs/s3run/{key}" in stored, (key, stored)
    assert any(k.startswith("runs/s3run/sft/ray_train/") and "checkpoint" in k for k in stored), stored
    assert "runs/s3run/sft/ray_train/fault_drill_step3" in stored, stored  # the drill fired, in the store
    # the sweep: Tune's experiment state, the trial's checkpoints and the finished-trial ledger in the store; the
    # winner and the report pushed as a finished stage; none of the store-only state in the local mirror
    tune_keys = [k for k in stored if k.startswith("runs/s3run/tune/")]
    assert any(k.startswith("runs/s3run/tune/ray_tune/experiments/sweep-") for k in tune_keys), tune_keys
    trials = {k.split("/")[5] for k in tune_keys if k.startswith("runs/s3run/tune/ray_tune/trials/") and "checkpoint"
              in k}
    assert len(trials) == 1, tune_keys
    ledger = [k for k in tune_keys if k.endswith("ray_tune/trials_finished.jsonl")]
    assert ledger and "runs/s3run/tune/winner/adapter_model.safetensors" in tune_keys, tune_keys
    mirror_tune = tmp_path / "machine-a" / "mirror" / "s3" / BUCKET / "runs" / "s3run" / "tune"
    assert (mirror_tune / "sweep_report.md").is_file() and not (mirror_tune / "ray_tune").exists()
    assert not (mirror_tune / "trials").exists() and not (mirror_tune / "experiments" / "trials").exists()
    assert not (tmp_path / "machine-a" / "mirror" / "s3" / BUCKET / "runs" / "s3run" / "sft" / "ray_train").exists()
    assert "registry/models/s3run/1/adapter_model.safetensors" in keys("registry/")
    assert not Path("s3:").exists() and not (REPO / "s3:").exists()  # nothing written to a folder named "s3:"

    second = run("machine-b", "--dry-run")  # another machine: an empty mirror, the store's records
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    plan = {line.split()[0]: line.split()[2] for line in second.stdout.splitlines()[1:] if line.strip()}
    assert {plan[s] for s in ("data", "sft", "tune", "evaluate", "gate")} == {"cached"}, second.stdout

