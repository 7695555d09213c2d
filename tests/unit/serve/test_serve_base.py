"""Which base models this machine can serve, and bases named by registry reference: no Ray, no vLLM."""

from __future__ import annotations

import json

import pytest

from pipelines.schema import UserError
from serve.base import check_servable, resolve_base


def base(tmp_path, name, quant=None):
    folder = tmp_path / name
    folder.mkdir()
    conf = {"model_type": "llama", **({"quantization_config": quant} if quant else {})}
    (folder / "config.json").write_text(json.dumps(conf))
    (folder / "model.safetensors").write_bytes(b"")
    return str(folder)


def test_awq_and_int4_bases_are_refused_on_cpu_with_the_reason(tmp_path):
    awq = base(tmp_path, "awq", {"quant_method": "awq", "bits": 4})
    with pytest.raises(UserError, match="cpu_gemm_wna16"):
        check_servable(awq, has_gpu=False)
    check_servable(awq, has_gpu=True)
    w4 = base(tmp_path, "w4", {"quant_method": "compressed-tensors",
                               "config_groups": {"g0": {"weights": {"num_bits": 4}}}})
    with pytest.raises(ValueError, match="int4 kernel"):
        check_servable(w4, has_gpu=False)


def test_float_and_int8_bases_are_servable_on_cpu(tmp_path):
    check_servable(base(tmp_path, "plain"), has_gpu=False)
    check_servable(base(tmp_path, "int8", {"quant_method": "torchao", "quant_type": {"default": "Int8WeightOnly"}}),
                   has_gpu=False)


def test_base_from_the_registry(tmp_path):
    from pipelines.artifacts.registry import Registry

    reg = Registry(tmp_path / "reg")
    merged = base(tmp_path, "merged")
    reg.publish("city-merged", merged, "merged_model",
                {"base_model": "/m", "base_model_hash": "sha256:x", "source": "city@1"})
    assert resolve_base("city-merged", str(tmp_path / "reg")).endswith("models/city-merged/1")
    assert resolve_base(merged, None) == merged
    with pytest.raises(UserError, match="not registered"):
        resolve_base("nope", str(tmp_path / "reg"))
    with pytest.raises(UserError, match="no serve.registry"):
        resolve_base("nope", None)


def test_deploy_probes_the_proxy_where_it_can_be_reached():
    import pytest

    from cluster.cli_serve import probe_host

    assert probe_host("auto", "127.0.0.1") is None and probe_host("127.0.0.1:6379", "127.0.0.1") is None
    assert probe_host("ray://203.0.113.7:10001", "0.0.0.0") == "203.0.113.7"  # TEST-NET: never this machine
    with pytest.raises(ValueError, match="serve.host=127.0.0.1 binds the proxy to the loopback of the head 203"):
        probe_host("203.0.113.7:6379", "127.0.0.1")
