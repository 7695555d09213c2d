"""Where evaluation and merge compute, without Ray: the dtype rule (`eval.dtype`: auto is bfloat16 on a GPU,
float32 on a CPU), the Ray options of the scorer actor and the merge task (a GPU when the cluster has one), and the
resolved dtype reaching both generation engines and the scorer.

    .venv/bin/pytest tests/unit/eval/test_eval_device.py -q
"""

from __future__ import annotations

import sys
import types

import pytest

from pipelines.eval.evaluate import EvalSection, scorer_options
from pipelines.eval.generate import resolve_dtype
from pipelines.export.merge import MergeSection, task_options


@pytest.mark.parametrize(("requested", "device", "expected"), [
    ("auto", "cuda", "bfloat16"), ("auto", "cpu", "float32"),
    ("float32", "cuda", "float32"), ("bfloat16", "cpu", "bfloat16"), ("float16", "cuda", "float16"),
])
def test_resolve_dtype(requested, device, expected):
    assert resolve_dtype(requested, device) == expected


def test_resolve_dtype_refuses_an_unknown_dtype():
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype("float64", "cpu")


def test_eval_dtype_defaults_to_auto_and_is_checked():
    assert EvalSection().dtype == "auto"
    assert EvalSection(dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError):
        EvalSection(dtype="float64")


@pytest.mark.parametrize("options", [scorer_options, task_options], ids=["scorer", "merge"])
def test_scorer_and_merge_ask_for_a_gpu_when_the_cluster_has_one(options):
    assert options(None, 2.0) == {"num_cpus": 1, "num_gpus": 1.0}
    assert options(None, 0.0) == {"num_cpus": 1, "num_gpus": 0.0}
    assert options(0.5, 2.0)["num_gpus"] == 0.5  # configured: kept
    assert options(0.0, 8.0)["num_gpus"] == 0.0  # configured to stay on CPU, even on a GPU cluster
    assert options(1.0, 0.0)["num_gpus"] == 1.0  # an autoscaling cluster starts a GPU node for it


def test_merge_num_gpus_is_a_config_key():
    assert MergeSection().num_gpus is None and MergeSection(num_gpus=1).num_gpus == 1.0
    with pytest.raises(ValueError):
        MergeSection(num_gpus=-1)


def test_vllm_engine_gets_the_resolved_dtype(monkeypatch):
    """The vLLM backend's engine is built with the dtype it is given (no fixed float32)."""
    from pipelines.eval.generate import Generator

    built = {}
    fake = types.ModuleType("vllm")
    fake.LLM = lambda **kw: built.update(kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    Generator("vllm", "/nonexistent/model", {}, max_new_tokens=4, device="cuda", dtype="bfloat16")
    assert built["dtype"] == "bfloat16"


@pytest.fixture
def torch_threads():
    """The generator and the scorer set torch's thread count for their process (an actor's); restored here."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_hf_generator_and_scorer_load_the_model_in_the_given_dtype(tiny_model_dir, torch_threads):
    import torch

    from pipelines.eval.evaluate import Scorer
    from pipelines.eval.generate import Generator

    gen = Generator("hf", tiny_model_dir, {}, max_new_tokens=2, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in gen.model.parameters()} == {torch.bfloat16}
    scorer = Scorer(tiny_model_dir, {}, "bfloat16", "cpu")
    assert {p.dtype for p in scorer.model.parameters()} == {torch.bfloat16}
    total, count = scorer.nll(["Hello"], [" world"], None)
    assert type(total) is float and total > 0 and count > 0
    assert scorer.where()["dtype"] == "bfloat16" and scorer.where()["device"] == "cpu"
    assert {p.dtype for p in Scorer(tiny_model_dir, {}, "float32", "cpu").model.parameters()} == {torch.float32}
