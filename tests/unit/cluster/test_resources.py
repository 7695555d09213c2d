"""The resource mapping of every GPU-using actor, checked without a GPU: what each asks Ray for and where its
model goes, on a CPU cluster and on a GPU cluster, as configured or automatic."""

from __future__ import annotations

import pytest

from pipelines.schema import accelerator_kind, actor_gpus, torch_device


@pytest.mark.parametrize("requested, available, expected", [
    (None, 0, 0.0), (None, 8, 1.0), (0, 8, 0.0), (0.5, 8, 0.5), (2, 0, 2.0)])
def test_actor_gpus_as_configured_else_one_when_the_cluster_has_gpus(requested, available, expected):
    assert actor_gpus(requested, available) == expected


def test_actor_gpus_refuses_a_negative_count():
    with pytest.raises(ValueError, match="num_gpus must be >= 0"):
        actor_gpus(-1, 4)


def test_torch_device_follows_the_gpus_held():
    assert torch_device(0) == "cpu" and torch_device(0.5) == "cuda" and torch_device(1) == "cuda"


@pytest.mark.parametrize("requested, available, expected", [
    ("auto", 0, "cpu"), ("auto", 4, "gpu"), ("cpu", 4, "cpu"), ("gpu", 0, "gpu")])
def test_serve_accelerator(requested, available, expected):
    assert accelerator_kind(requested, available) == expected


def test_eval_generator_actor_asks_for_its_gpus():
    from pipelines.eval.generate import actor_options

    assert actor_options(0.0) == {"num_cpus": 1, "num_gpus": 0.0}
    assert actor_options(1.0) == {"num_cpus": 1, "num_gpus": 1.0}


def test_dpo_reference_actor_asks_for_its_gpus():
    from pipelines.train.config import DPOSection
    from pipelines.train.dpo import reference_options

    assert reference_options(DPOSection(), available=0) == {"num_gpus": 0.0}
    assert reference_options(DPOSection(), available=8) == {"num_gpus": 1.0}
    assert reference_options(DPOSection(reference_num_gpus=0), available=8) == {"num_gpus": 0.0}


@pytest.mark.parametrize("kind", ["cpu", "gpu"], ids=["cpu_replica", "cuda_replica"])  # an id "gpu" = the marker
def test_serve_replica_resources_per_kind(kind):
    """CPU: the replica's CPUs in the engine's placement-group bundle, eager mode, actor adds nothing. GPU: Ray
    Serve LLM's default GPU bundle (placement_group_config None), the replica actor takes the CPUs, CUDA graphs."""
    from serve.app import llm_config
    from serve.config import ServeConfig

    cfg = ServeConfig(replica_cpus=3)
    llm = llm_config(cfg, "/models/base", gpu=kind == "gpu")
    actor = llm.deployment_config["ray_actor_options"]
    if kind == "cpu":
        assert llm.placement_group_config == {"bundles": [{"CPU": 3}]}
        assert actor["num_cpus"] == 0 and llm.engine_kwargs["enforce_eager"] is True
    else:
        assert llm.placement_group_config is None
        assert actor["num_cpus"] == 3 and llm.engine_kwargs["enforce_eager"] is False


def test_serve_config_accelerator_field():
    from serve.config import ServeConfig

    assert ServeConfig().accelerator == "auto"
    with pytest.raises(ValueError):
        ServeConfig(accelerator="tpu")
