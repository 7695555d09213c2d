"""The job graph as a Ray job on a real cluster of its own: `ray start --head --num-cpus=2` in a temporary folder
(Ray 2.60 token auth on, as a new cluster has it), the whole tiny-model graph submitted with `ray job submit`
exactly as the README writes it, `loraforge submit --dry-run --wait`, and `loraforge jobs stop`. The cluster is
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

from tests.conftest import free_port, tiny_graph_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A one-node Ray cluster with the dashboard (the Job API), its own ports and a short temp folder (Ray's
    socket paths have a length limit). The venv's bin comes first in its PATH: a job's entrypoint `python` is the
    head's."""
    temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token"}
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
        yield from _serve_head(proc, f"http://127.0.0.1:{dash}", env, log)
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
def job_config(tiny_model_dir, tmp_path_factory):
    """The whole graph on the tiny model: data → sft → evaluate → gate (set to pass: the point is the hand-offs,
    not the score) → registry → serve → demo. The config lies inside the repository (the job's working_dir); data,
    outputs and registry live outside it (one machine: the job sees the same paths)."""
    root = tmp_path_factory.mktemp("submit")
    cfg = {**tiny_graph_config("job", root, tiny_model_dir, str(root / "runs"), str(root / "registry")),
           "serve": {"max_lora_rank": 8, "port": free_port(), "max_model_len": 512},
           "demo": {"prompts": ["What is the capital of France?"], "max_tokens": 8}}
    path = REPO / "tests" / "integration" / f"_submit_{os.getpid()}.yaml"  # uploaded with the working_dir
    path.write_text(yaml.safe_dump(cfg))
    yield {"path": path, "rel": path.relative_to(REPO), "root": root, "cfg": cfg}
    path.unlink(missing_ok=True)


def loraforge(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "loraforge"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_ray_job_submit_runs_the_whole_graph_to_the_registry_and_endpoint(head, job_config):
    """`ray job submit --working-dir . -- python -m cluster run CONFIG`, as the README writes it (the client in
    token mode): SUCCEEDED; every stage's outputs are there, the gate passed and the registry holds version 1
    with the adapter's lineage; the demo asked the endpoint its questions."""
    env = {**head["env"], "RAY_ADDRESS": head["address"]}
    t0 = time.time()
    out = subprocess.run([str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "-m", "cluster",
                          "run", str(job_config["rel"])], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    took = time.time() - t0
    text = out.stdout + out.stderr
    (job_config["root"] / "ray_job_submit.log").write_text(text)
    assert out.returncode == 0 and "succeeded" in text, text[-4000:]
    print(f"\n[ray job submit] whole tiny graph: {took:.0f} s")
    run = job_config["root"] / "runs" / "job"
    for stage in ("data", "sft", "evaluate", "gate"):  # the cached stages record themselves
        assert json.loads((run / stage / "stage.json").read_text())["status"] == "done", stage
    assert (run / "sft" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "gate" / "gate.json").read_text())["passed"] is True
    reg = job_config["root"] / "registry"
    entries = list(reg.glob("models/*/*/manifest.json"))
    assert len(entries) == 1, sorted(p.relative_to(reg) for p in reg.rglob("*"))
    assert (entries[0].parent / "adapter_model.safetensors").is_file()
    assert "[graph] demo" in text and "[graph] serve" in text, text[-4000:]


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
