"""The rl stage across two nodes: a 2-node cluster built with Ray's own `ray.cluster_utils.Cluster` on this machine,
the trainer on one node (custom resource `trainer`, 2 Ray Train workers under DDP) and the vLLM rollout engine on
the other (custom resource `rollout`, `rl.run(engine_node=...)`); each optimizer step's adapter goes to the engine
through the object store (`ray.put` on the trainer's node, fetched by the engine's). The cluster lives in a child
process (this test session has its own Ray already).

The same run exercises the KL penalty (rl.kl_beta > 0, reference = the base with the adapter disabled) and the
truncated importance-sampling correction (rl.tis_cap), with one step of staleness.

    .venv/bin/pytest tests/integration/test_rl_multinode.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

DRIVER = r'''
import json, os, sys, time
import ray
import ray._private.services as services
from ray.cluster_utils import Cluster

# Ray waits a fixed 30 s for a new raylet to register (ray/_private/node.py); a machine this loaded can take longer:
# the node lookup it polls retries here for up to 3 minutes instead
_get_node = services.get_node


def patient_get_node(*args, **kwargs):
    deadline = time.monotonic() + 180
    while True:
        try:
            return _get_node(*args, **kwargs)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


services.get_node = patient_get_node
# ... and a raylet waits for its metrics agent's port file (then dies: "Timed out waiting for file"); the raylets
# started below inherit this process's environment
os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")

model, prompts, out = sys.argv[1:4]
keep = ("TOKENIZERS_PARALLELISM", "RAY_ENABLE_UV_RUN_RUNTIME_ENV", "VLLM_HOST_IP", "VLLM_CPU_KVCACHE_SPACE")
env = {k: os.environ[k] for k in keep if k in os.environ}
store = 128 * 2**20
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 2, "resources": {"trainer": 2}, "object_store_memory": store, "env_vars": env})
rollout = cluster.add_node(num_cpus=1, resources={"rollout": 1}, object_store_memory=store, env_vars=env)
cluster.wait_for_nodes()
try:
    ray.init(address=cluster.address, log_to_driver=True)
    from pipelines.train import rl
    from pipelines.train.config import LoraSection, TrainSection, TrainSetup
    from pipelines.train.rl_config import RLSection
    from serve.config import ServeConfig

    cfg = RLSection(prompts_path=prompts, rewards=[{"fn": "length_penalty", "args": {"max_chars": 0, "scale": 64}}],
                    num_generations=2, prompts_per_step=2, micro_batch_size=2, sampling={"max_new_tokens": 8},
                    steps=3, lr=3e-3, staleness=1, kl_beta=0.1, tis_cap=2.0, parity={"warn": 0.002, "stop": 0.01})
    setup = TrainSetup(model_dir=model, train=TrainSection(num_workers=2, cpus_per_worker=1, log_every=1,
                                                           tracking_uri="off"))
    rl.run(cfg, setup, LoraSection(r=8, alpha=16, dropout=0.0), ServeConfig(max_lora_rank=8, max_model_len=256), out,
           engine_node=rollout.node_id, trainer_resources={"trainer": 1})
    print("NODES " + json.dumps({"head": cluster.head_node.node_id, "rollout": rollout.node_id}), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
'''


def test_rl_trainer_and_rollout_engine_on_two_nodes(tiny_model_dir, tmp_path):
    from pipelines.artifacts.manifest import read_manifest

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ("Name a city.", "Say a date.",
                                                                          "Pick a colour.", "Greet me.")))
    out = tmp_path / "rl"
    run = subprocess.run([sys.executable, "-c", DRIVER, tiny_model_dir, str(prompts), str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    nodes = json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("NODES "))[len("NODES "):])
    assert nodes["head"] != nodes["rollout"]
    steps = [json.loads(line) for line in (out / "rl_steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    # the trainer on the head (custom resource `trainer`), every rollout on the other node (`rollout`)
    assert {s["trainer_node"] for s in steps} == {nodes["head"]}
    assert {s["rollout_node"] for s in steps} == {nodes["rollout"]}
    m = read_manifest(out, kind="lora_adapter")["metrics"]
    assert m["rollout_engine"]["node_id"] == nodes["rollout"]
    # the version chain: step k trains policy@k-1 on rollouts within the staleness bound, versions never go back,
    # the overlap really happened (step 2 sampled by policy@0 while step 1 trained), one LoRA id per version
    for s in steps:
        assert s["trainer_version"] == s["step"] - 1 and 0 <= s["lag"] <= 1
        assert s["rollout_version"] == s["step"] - 1 - s["lag"] and s["published"] == f"policy@{s['step']}"
    versions = [s["rollout_version"] for s in steps]
    assert versions == sorted(versions) and versions == [0, 0, 1], versions
    ids = {s["rollout_version"]: s["lora_id"] for s in steps}
    assert len(set(ids.values())) == len(ids)
    policies = out / "ray_train" / "policies"
    assert sorted(p.name for p in policies.iterdir()) == [f"policy@{v}" for v in range(4)]
    # the sync, measured across the nodes: the adapter's bytes reached the engine, publish → first rollout timed
    first = [s for s in steps if s["sync_s"] is not None]
    assert [s["rollout_version"] for s in first] == [0, 1] and all(0 < s["sync_s"] < 60 for s in first), first
    assert all(s["sync_bytes"] > 1000 and s["load_s"] is not None for s in steps)
    assert m["sync_s_median"] > 0
    # 2 DDP workers: each scored its share of the groups; the reduced parity covers every sampled token
    assert all(s["workers"] == 2 and s["parity_tokens"] == s["completion_tokens"] for s in steps), steps
    assert max(s["parity_mean"] for s in steps) < 0.002
    # KL penalty on: zero while the policy is the reference (step 1: LoRA B = 0), positive once it moved
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps[2]["kl"] > 0, [s["kl"] for s in steps]
    assert all(s["loss"] == s["loss"] for s in steps)  # finite (not NaN) with tis_cap on
    assert (out / "adapter_model.safetensors").is_file()
