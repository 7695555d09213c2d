"""Multi-node on one machine: a 2-node cluster built with Ray's own `ray.cluster_utils.Cluster` (1 CPU per node,
each node with its own LORAFORGE_CACHE, as two machines would have), and QLoRA SFT with its 2 workers spread
across both nodes (`train.placement_strategy=STRICT_SPREAD`). It finishes; each worker ran on its own node; each
node quantized the base once into its own cache. The cluster lives in a child process (this test session has its
own Ray already), which runs `loraforge run --until sft` against it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "pipelines" / "demo" / "city_date.jsonl"

DRIVER = r'''
import os, subprocess, sys
from ray.cluster_utils import Cluster

config, caches = sys.argv[1], sys.argv[2:]
env = {k: os.environ[k] for k in ("TOKENIZERS_PARALLELISM", "RAY_ENABLE_UV_RUN_RUNTIME_ENV") if k in os.environ}
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "env_vars": {**env, "LORAFORGE_CACHE": caches[0]}})
cluster.add_node(num_cpus=1, env_vars={**env, "LORAFORGE_CACHE": caches[1]})
cluster.wait_for_nodes()
try:
    run = subprocess.run([sys.executable, "-m", "cluster", "run", config, "--until", "sft",
                          f"ray.address={cluster.address}"], timeout=900)
finally:
    cluster.shutdown()
sys.exit(run.returncode)
'''


def test_qlora_sft_spread_over_two_nodes_quantizes_once_per_node(tiny_model_dir, tmp_path):
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:64]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"name": "spread", "output_dir": str(tmp_path / "runs"), "model": {"name": tiny_model_dir},
           # local_max_mib 0: data.engine auto decides by the cluster alone; on 2 nodes that is Ray Data
           "data": {"train_path": str(tmp_path / "train.jsonl"), "max_length": 128, "local_max_mib": 0},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "quant": {"load_in_4bit": True},
           "train": {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD", "max_steps": 2,
                     "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "log_every": 1, "tracking_uri": "off"}}
    config = tmp_path / "spread.yaml"
    config.write_text(yaml.safe_dump(cfg))
    caches = [tmp_path / "node-a-cache", tmp_path / "node-b-cache"]
    out = subprocess.run([sys.executable, "-c", DRIVER, str(config), *map(str, caches)], cwd=REPO,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]

    data = json.loads((tmp_path / "runs" / "spread" / "data" / "manifest.json").read_text())
    assert data["metrics"]["engine"] == "ray", data["metrics"]  # two nodes: the data stage ran on Ray Data
    manifest = json.loads((tmp_path / "runs" / "spread" / "sft" / "manifest.json").read_text())
    ranks = manifest["metrics"]["ranks"]
    assert len(ranks) == 2 and len({r["node_id"] for r in ranks}) == 2, ranks  # one worker per node
    assert [r["base_load"] for r in ranks] == ["quantized-here", "quantized-here"], ranks  # each node quantized
    for cache in caches:  # ... once, into its own cache
        bases = [p for p in (cache / "quantized-bases").iterdir() if p.is_dir()]
        assert len(bases) == 1 and list(bases[0].glob("*.safetensors")), sorted(cache.rglob("*"))
    assert manifest["metrics"]["steps"] == 2
