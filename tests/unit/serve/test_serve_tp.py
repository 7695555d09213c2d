"""serve.tensor_parallel_size: what the engine deployment's LLMConfig (serve.app.llm_config) asks ray.serve.llm
and vLLM for, checked without a GPU or a Ray instance: ray.serve.llm's own VLLMEngineConfig derives the replica's
placement group from it, as it does when the app starts.

    .venv/bin/python -m pytest tests/unit/serve/test_serve_tp.py -q
"""

from __future__ import annotations

import pytest

from pipelines.schema import UserError
from serve.config import ServeConfig


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_gpu_replica_gets_one_placement_group_of_tp_gpus(tp):
    from serve.app import llm_config

    llm = llm_config(ServeConfig(accelerator="gpu", replica_cpus=3, tensor_parallel_size=tp), "/models/base",
                     gpu=True)
    assert llm.engine_kwargs["tensor_parallel_size"] == tp
    engine = llm.get_engine_config()  # what ray.serve.llm builds the replica's placement group from
    assert engine.tensor_parallel_degree == engine.num_devices == tp
    assert [b.get("GPU") for b in engine.placement_bundles] == [1] * tp
    assert all("CPU" not in b for b in engine.placement_bundles)  # the replica actor's CPUs are added by Serve
    assert engine.get_initialization_kwargs()["distributed_executor_backend"] == "ray"
    assert llm.deployment_config["ray_actor_options"]["num_cpus"] == 3
    # one GPU: Ray's default bundle (unchanged); several: kept on one node (TP all-reduces in every layer)
    assert engine.placement_strategy == ("PACK" if tp == 1 else "STRICT_PACK")


def test_a_cpu_replica_refuses_tensor_parallelism_naming_the_key():
    from serve.app import llm_config

    with pytest.raises(UserError, match=r"serve\.tensor_parallel_size=2 needs GPU replicas.*set "
                                        r"serve\.tensor_parallel_size=1"):
        llm_config(ServeConfig(tensor_parallel_size=2), "/models/base", gpu=False)  # accelerator auto → cpu
    cpu = llm_config(ServeConfig(replica_cpus=2), "/models/base", gpu=False)
    assert cpu.engine_kwargs["tensor_parallel_size"] == 1
    assert cpu.get_engine_config().placement_bundles == [{"CPU": 2}]


def test_the_config_refuses_tensor_parallelism_on_cpu_when_it_is_read():
    with pytest.raises(ValueError, match=r"serve\.tensor_parallel_size=4 needs GPU replicas"):
        ServeConfig(accelerator="cpu", tensor_parallel_size=4)
    with pytest.raises(ValueError):
        ServeConfig(tensor_parallel_size=0)
    assert ServeConfig().tensor_parallel_size == 1
    assert ServeConfig(accelerator="auto", tensor_parallel_size=2).tensor_parallel_size == 2  # decided at start
