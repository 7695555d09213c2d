"""The job graph as a Ray job on a real cluster of its own: `ray start --head --num-cpus=2` in a temporary folder
(Ray 2.60 token auth on, as a new cluster has it), the whole tiny-model graph submitted with `ray job submit`
exactly as the README writes it, `loraforge submit --dry-run --wait`, and `loraforge jobs stop`.

The graph's runs and registry live in an object store (a real S3 API: moto on localhost, the conftest `s3`
fixture), as on a cluster whose nodes share no disk: Ray Train's checkpoints (a fault drill fires in SFT) and a
1-trial sweep's Tune state go to the store, the registry entry is published there, and a driver on another
machine (an empty local mirror) finds every stage cached from what the store holds. One graph run for both
(it was two: this one and test_s3.py's, ~140 s each). The cluster is
stopped at the end by SIGTERM to its `ray start --block` process group (not `ray stop`, which would also stop this
test session's own Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import BUCKET, free_port, keys, tiny_graph_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head(tmp_path_factory, s3):
    """A one-node Ray cluster with the dashboard (the Job API), its own ports and a short temp folder (Ray's
    socket paths have a length limit). The venv's bin comes first in its PATH: a job's entrypoint `python` is the
    head's. Its processes reach the store as this one does (AWS_ENDPOINT_URL and credentials: on a real cluster
    the machines' environment or instance role), keep their local mirror in a folder of their own ("machine a"),
    and find this cluster's State API by its address (a real node runs one Ray instance; this machine runs the
    test session's too, and Ray asked with no address refuses to pick one)."""
    temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    gcs, dash = free_port(), free_port()
    cache = tmp_path_factory.mktemp("machine-a")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
           "LORAFORGE_CACHE": str(cache), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    # every port of its own: the defaults (e.g. the dashboard agent's 52365) are taken by this session's Ray
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--num-cpus=2", f"--port={gcs}",
                             f"--dashboard-port={dash}", *ports, f"--temp-dir={temp}", "--node-ip-address=127.0.0.1",
                             "--include-dashboard=true", "--disable-usage-stats", "--block"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for info in _serve_head(proc, f"http://127.0.0.1:{dash}", env, log):
            yield {**info, "cache": cache}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` then stops every process of its cluster;
        try:  # that takes ~30 s, which the next tests need not wait for
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        log.close()


def _serve_head(proc, address: str, env: dict, log):
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401: up, and asking for the token
            break
        except OSError:  # not listening yet
            if time.time() > deadline:
                raise
            time.sleep(1)
    # a job can be submitted once the head's job agent is up: until then, HTTP 500 "No available agent"
    from cluster.cli_jobs import _submit

    mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"  # this module's clients only: restored below for the rest of the session
    try:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(address)
        warm = _submit(client, entrypoint="python -c 'print(1)'")
        while client.get_job_status(warm).value not in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert time.time() < deadline + 60, client.get_job_logs(warm)
            time.sleep(0.5)
        yield {"address": address, "env": env}
    finally:
        if mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = mode


@pytest.fixture(scope="module")
def job_config(tiny_model_dir, tmp_path_factory, s3):
    """The whole graph on the tiny model: data → sft (a worker fails once at step 3: the fault drill, its marker
    beside the checkpoints in the store) → tune (1 trial: its Tune state and checkpoints in the store; its winner
    is what is evaluated) → evaluate → gate (set to pass: the point is the hand-offs, not the score) → registry →
    serve → demo, with output_dir and registry.root in the store. The config lies inside the repository (the
    job's working_dir); the data files live outside it (one machine: the job sees the same paths)."""
    root = tmp_path_factory.mktemp("submit")
    cfg = {**tiny_graph_config("job", root, tiny_model_dir, f"s3://{BUCKET}/runs", f"s3://{BUCKET}/registry"),
           "serve": {"max_lora_rank": 8, "port": free_port(), "max_model_len": 512},
           "demo": {"prompts": ["What is the capital of France?"], "max_tokens": 8}}
    cfg["train"]["fail_once_at_step"] = 3
    cfg["tune"] = {"space": {"r": [8], "alpha": "ratio", "lr": [5e-3]}, "searcher": "grid", "num_samples": 1,
                   "asha": None, "max_t": 2, "eval_every": 2, "max_concurrent_trials": 1}
    path = REPO / "tests" / "integration" / f"_submit_{os.getpid()}.yaml"  # uploaded with the working_dir
    path.write_text(yaml.safe_dump(cfg))
    yield {"path": path, "rel": path.relative_to(REPO), "root": root, "cfg": cfg}
    path.unlink(missing_ok=True)


def loraforge(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "loraforge"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_ray_job_submit_runs_the_whole_graph_to_the_store_registry_and_endpoint(head, job_config, ray_session,
                                                                                 tmp_path):
    """`ray job submit --working-dir . -- python -m cluster run CONFIG`, as the README writes it (the client in
    token mode): SUCCEEDED; every stage's records and outputs are in the store (none of the store-only state in the
    job's local mirror), the gate passed and the store's registry holds version 1 with the adapter; the demo asked
    the endpoint its questions. Then another machine (an empty mirror) plans the same config: every stage cached."""
    import boto3

    env = {**head["env"], "RAY_ADDRESS": head["address"]}
    t0 = time.time()
    out = subprocess.run([str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "-m", "cluster",
                          "run", str(job_config["rel"])], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    took = time.time() - t0
    text = out.stdout + out.stderr
    (job_config["root"] / "ray_job_submit.log").write_text(text)
    assert out.returncode == 0 and "succeeded" in text, text[-4000:]
    print(f"\n[ray job submit] whole tiny graph, store output and registry: {took:.0f} s")
    assert "[graph] demo" in text and "[graph] serve" in text, text[-4000:]

    stored = keys("runs/job/")
    bucket = boto3.resource("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1").Bucket(BUCKET)

    def record(key: str) -> dict:
        return json.loads(bucket.Object(f"runs/job/{key}").get()["Body"].read())

    for stage in ("data", "sft", "tune", "evaluate", "gate"):  # the cached stages record themselves
        assert record(f"{stage}/stage.json")["status"] == "done", stage
    for key in ("data/manifest.json", "sft/adapter_model.safetensors", "sft/manifest.json", "evaluate/eval.json"):
        assert f"runs/job/{key}" in stored, (key, stored)
    assert record("gate/gate.json")["passed"] is True
    assert any(k.startswith("runs/job/sft/ray_train/") and "checkpoint" in k for k in stored), stored
    assert "runs/job/sft/ray_train/fault_drill_step3" in stored, stored  # the drill fired, in the store
    # the sweep: Tune's experiment state, the trial's checkpoints and the finished-trial ledger in the store; the
    # winner and the report pushed as a finished stage; none of the store-only state in the local mirror
    tune_keys = [k for k in stored if k.startswith("runs/job/tune/")]
    assert any(k.startswith("runs/job/tune/ray_tune/experiments/sweep-") for k in tune_keys), tune_keys
    trials = {k.split("/")[5] for k in tune_keys if k.startswith("runs/job/tune/ray_tune/trials/") and "checkpoint"
              in k}
    assert len(trials) == 1, tune_keys
    ledger = [k for k in tune_keys if k.endswith("ray_tune/trials_finished.jsonl")]
    assert ledger and "runs/job/tune/winner/adapter_model.safetensors" in tune_keys, tune_keys
    mirror = head["cache"] / "mirror" / "s3" / BUCKET / "runs" / "job"
    assert (mirror / "tune" / "sweep_report.md").is_file() and not (mirror / "tune" / "ray_tune").exists()
    assert not (mirror / "tune" / "trials").exists() and not (mirror / "tune" / "experiments" / "trials").exists()
    assert not (mirror / "sft" / "ray_train").exists()
    registry = keys("registry/")
    assert [k for k in registry if k.endswith("/manifest.json")] == ["registry/models/job/1/manifest.json"], registry
    assert "registry/models/job/1/adapter_model.safetensors" in registry
    assert not (REPO / "s3:").exists()  # nothing written to a folder named "s3:"

    # another machine: an empty mirror, the store's records
    second = subprocess.run([sys.executable, "-m", "cluster", "run", str(job_config["path"]), "--dry-run",
                             f"ray.address={ray_session.get_runtime_context().gcs_address}"], cwd=REPO,
                            env={**os.environ, "LORAFORGE_CACHE": str(tmp_path / "machine-b")}, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    plan = {line.split()[0]: line.split()[2] for line in second.stdout.splitlines()[1:]
            if line.strip() and len(line.split()) > 2}
    assert {plan[s] for s in ("data", "sft", "tune", "evaluate", "gate")} == {"cached"}, second.stdout


def test_loraforge_submit_dry_run_waits_and_prints_the_plan(head, job_config):
    """`loraforge submit --dry-run --wait`: the cluster's plan comes back in the followed logs, exit 0 on
    SUCCEEDED, the submission id is the last line, and `jobs status`/`jobs list` name it. Run after the whole
    graph: every cached stage says so."""
    out = loraforge("submit", str(job_config["rel"]), "--address", head["address"], "--dry-run", "--wait",
                    env=head["env"])
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    sid = out.stdout.strip().splitlines()[-1]
    assert sid.startswith("loraforge-job-"), out.stdout[-2000:]
    assert "cached" in out.stdout and "sft" in out.stdout, out.stdout[-3000:]
    status = loraforge("jobs", "status", sid, "--address", head["address"], env=head["env"])
    assert status.returncode == 0 and f"{sid}: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    listed = loraforge("jobs", "list", "--address", head["address"], env=head["env"])
    assert sid in listed.stdout and "--dry-run" in listed.stdout, listed.stdout


def test_loraforge_jobs_stop_stops_a_running_job(head):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head["address"])
    sid = client.submit_job(entrypoint="python -c 'import time; print(\"sleeping\", flush=True); time.sleep(600)'")
    deadline = time.time() + 120
    while client.get_job_status(sid).value != "RUNNING":
        assert time.time() < deadline, client.get_job_logs(sid)
        time.sleep(0.5)
    out = loraforge("jobs", "stop", sid, "--address", head["address"], env=head["env"], timeout=120)
    assert out.returncode == 0 and f"{sid}: STOPPED" in out.stdout, out.stdout + out.stderr
    logs = loraforge("jobs", "logs", sid, "--address", head["address"], env=head["env"])
    assert "sleeping" in logs.stdout


def test_submit_refuses_a_config_outside_the_working_dir_and_a_missing_cluster(job_config, tmp_path):
    """Both exit 2 with one line naming what to do, before anything is uploaded."""
    outside = tmp_path / "job.yaml"
    outside.write_text(job_config["path"].read_text())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = loraforge("submit", str(outside), "--address", "http://127.0.0.1:9", env=env)
    assert out.returncode == 2 and "must lie inside the folder uploaded" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    port = free_port()
    out = loraforge("submit", str(job_config["rel"]), "--address", f"http://127.0.0.1:{port}", env=env)
    assert out.returncode == 2 and f"no Ray dashboard answers at http://127.0.0.1:{port}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
