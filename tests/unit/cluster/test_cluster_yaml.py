"""cluster.yaml: valid for Ray's own cluster launcher (its JSON schema, after Ray fills in the provider's
defaults, all from the installed package: no cloud call), and every run config in configs/ fits one of its node
types (each training worker's, sweep trial's, quantize task's and Serve replica's resource bundle)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.config import load_config

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))  # raises jsonschema.ValidationError naming the bad key


def test_node_types_cpu_head_and_gpu_groups(cluster):
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_groups = {n: t for n, t in types.items() if t["resources"].get("GPU")}
    assert len(gpu_groups) >= 2
    for name, t in gpu_groups.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["resources"]["CPU"] >= 1, name
    assert any("requirements/cpu.lock.txt" in c for c in cluster["setup_commands"])  # the tested pins


def bundles(path: Path) -> list[dict[str, float]]:
    """The resource bundles a run config asks Ray for, one per worker / task / replica."""
    cfg = load_config(path)
    worker = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}
    out = [worker, {"CPU": cfg.quantize.num_cpus, **({"GPU": cfg.quantize.num_gpus} if cfg.quantize.num_gpus else {})},
           # a tensor-parallel replica's GPUs are one STRICT_PACK placement group: all on one node
           {"CPU": cfg.serve.replica_cpus,
            **({"GPU": cfg.serve.tensor_parallel_size} if cfg.serve.accelerator == "gpu" else {})},
           {"CPU": 1, **({"GPU": cfg.eval.num_gpus} if cfg.eval.num_gpus else {})}]
    return out


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_fits_some_node_type(path, cluster):
    nodes = [t["resources"] for t in cluster["available_node_types"].values()]
    for bundle in bundles(path):
        assert any(all(node.get(k, 0) >= v for k, v in bundle.items()) for node in nodes), (path.name, bundle)


def test_a_bundle_no_node_holds_is_caught(cluster, tmp_path):
    """The check above can fail: a worker asking for 400 CPUs fits no node type."""
    p = tmp_path / "big.yaml"
    p.write_text("train:\n  cpus_per_worker: 400\n")
    nodes = [t["resources"] for t in cluster["available_node_types"].values()]
    assert not all(any(all(n.get(k, 0) >= v for k, v in b.items()) for n in nodes) for b in bundles(p))
