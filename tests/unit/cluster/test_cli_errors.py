"""What a new user sees when they get something wrong: every stage command, as a real process, exits 2 with one
line naming the file, key or folder and what to do, before Ray starts (well under 10 s), with no traceback;
LORAFORGE_DEBUG=1 adds the traceback. No Ray, no model: these fail in the config/preflight checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "pipelines" / "demo" / "city_date.jsonl"


@pytest.fixture()
def config(tmp_path):
    """A valid run config on the demo rows and a local model folder (a config.json is all preflight reads)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def write(**sections) -> Path:
        doc = {"name": "ux", "output_dir": str(tmp_path / "runs"), "model": {"name": str(model)},
               "data": {"train_path": str(DEMO)}}
        for key, value in sections.items():
            doc.setdefault(key, {}).update(value) if isinstance(value, dict) else doc.update({key: value})
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return write


def loraforge(*args: str, debug: bool = False) -> tuple[int, str, float]:
    env = {**os.environ, "LORAFORGE_DEBUG": "1" if debug else "0"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cluster", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def assert_user_error(rc: int, out: str, seconds: float, *needles: str) -> None:
    assert rc == 2, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out  # one message, nothing else: Ray never started, so no Ray log either
    for needle in needles:
        assert needle in out, out
    assert seconds < 10, f"{seconds:.1f} s"


def test_missing_train_file(config, tmp_path):
    missing = tmp_path / "nope.jsonl"
    rc, out, s = loraforge("curate", str(config()), f"data.train_path={missing}")
    assert_user_error(rc, out, s, "data.train_path", "nope.jsonl", "no such file")


def test_empty_train_file(config, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    rc, out, s = loraforge("tokenize", str(config()), f"data.train_path={empty}")
    assert_user_error(rc, out, s, "data.train_path", "empty.jsonl", "no rows")


def test_missing_model_folder(config, tmp_path):
    rc, out, s = loraforge("sft", str(config()), f"model.name={tmp_path / 'no-such-model'}")
    assert_user_error(rc, out, s, "model.name", "no such folder")


def test_folder_that_is_not_a_model(config, tmp_path):
    (tmp_path / "notamodel").mkdir()
    rc, out, s = loraforge("merge", str(config()), f"model.name={tmp_path / 'notamodel'}")
    assert_user_error(rc, out, s, "model.name", "config.json")


def test_unknown_deepspeed_config(config):
    rc, out, s = loraforge("validate", str(config()), "train.deepspeed=zero9")
    assert_user_error(rc, out, s, "train.deepspeed", "zero9", "zero2")


def test_qlora_with_zero3(config):
    rc, out, s = loraforge("sft", str(config()), "quant.load_in_4bit=true", "quant.compute_dtype=float32",
                           "train.deepspeed=zero3")
    assert_user_error(rc, out, s, "zero3", "load_in_4bit", "zero2")


def test_unknown_key_names_file_and_key(config):
    rc, out, s = loraforge("validate", str(config()), "train.max_stepz=3")
    assert_user_error(rc, out, s, "run.yaml", "train.max_stepz")


def test_bad_split_shares(config):
    rc, out, s = loraforge("curate", str(config()), "data.split.train=0.9")
    assert_user_error(rc, out, s, "data.split", "add up to 1")


def test_rank_above_served_slots(config):
    rc, out, s = loraforge("serve", str(config()), "lora.r=32", "serve.max_lora_rank=16")
    assert_user_error(rc, out, s, "lora.r=32", "serve.max_lora_rank=16")


def test_dora_with_serving(config):
    rc, out, s = loraforge("run", str(config()), "lora.dora=true")
    assert_user_error(rc, out, s, "lora.dora", "merge")


def test_sft_before_tokenize(config):
    rc, out, s = loraforge("sft", str(config()))
    assert_user_error(rc, out, s, "loraforge tokenize")


def test_dpo_before_sft(config, tmp_path):
    rc, out, s = loraforge("dpo", str(config(dpo={"train_path": str(DEMO)})))
    assert_user_error(rc, out, s, "loraforge sft")


def test_dpo_missing_pairs_file(config, tmp_path):
    rc, out, s = loraforge("dpo", str(config(dpo={"train_path": str(tmp_path / "pairs.jsonl")})))
    assert_user_error(rc, out, s, "dpo.train_path", "pairs.jsonl")


def test_evaluate_without_an_adapter(config):
    rc, out, s = loraforge("evaluate", str(config()))
    assert_user_error(rc, out, s, "--adapter", "loraforge sft")


def test_evaluate_missing_test_file(config, tmp_path):
    rc, out, s = loraforge("evaluate", str(config()), "--test", str(tmp_path / "test.jsonl"))
    assert_user_error(rc, out, s, "eval.test_path", "test.jsonl")


def test_merge_adapter_folder_without_adapter(config, tmp_path):
    rc, out, s = loraforge("merge", str(config()), "--adapter", str(tmp_path))
    assert_user_error(rc, out, s, "--adapter", "adapter_config.json")


def test_quantize_without_a_merged_model(config):
    rc, out, s = loraforge("quantize", str(config()))
    assert_user_error(rc, out, s, "loraforge merge", "--model")


def test_missing_config_file(tmp_path):
    rc, out, s = loraforge("validate", str(tmp_path / "absent.yaml"))
    assert_user_error(rc, out, s, "absent.yaml", "no such config file")


def test_debug_shows_the_traceback(config, tmp_path):
    rc, out, _ = loraforge("curate", str(config()), f"data.train_path={tmp_path / 'nope.jsonl'}", debug=True)
    assert rc == 2 and "Traceback" in out and "MissingInput" in out, out


def test_validate_prints_the_resolved_config(config):
    rc, out, _ = loraforge("validate", str(config()), "train.max_steps=7")
    assert rc == 0, out
    assert '"max_steps": 7' in out


HOSTILE_CONFIGS = {
    # a second serve: block silently dropped the first one's api_key
    "duplicate_key": ("name: ux\nserve:\n  api_key: k1\nmodel:\n  name: x\nserve:\n  port: 9000\n".encode(),
                      ["key 'serve' is given twice", "lines 2 and 6"]),
    # nine nested anchors: validate hung for over a minute expanding them
    "alias_bomb": (("a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "name: *i\n").encode(),
        ["aliases expand to more than 100,000 values"]),
    # a Latin-1 byte: a UnicodeDecodeError traceback
    "not_utf8": ("name: ux\n# caf\xe9\n".encode("latin-1"), ["line 2", "byte 0xe9 is not UTF-8"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CONFIGS))
def test_hostile_config_files_are_one_line_errors_within_a_second(case, tmp_path):
    """`validate` on a config with a duplicate key, an alias bomb or a non-UTF-8 byte: exit 2, one line naming
    the file and the cause, in well under the 10 s of any user error (the YAML is refused before it is expanded)."""
    body, needles = HOSTILE_CONFIGS[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(body)
    rc, out, s = loraforge("validate", str(path))
    assert_user_error(rc, out, s, str(path), *needles)


def test_validate_prints_keys_and_credentials_as_stars(config):
    rc, out, _ = loraforge("validate", str(config()), "serve.api_key=k1-secret",
                           "train.tracking_uri=postgresql://ml:hunter2@db/mlflow")
    assert rc == 0, out
    doc = json.loads(out)
    assert doc["serve"]["api_key"] == "***" and doc["train"]["tracking_uri"] == "postgresql://ml:***@db/mlflow"
    assert "k1-secret" not in out and "hunter2" not in out


def test_serve_with_a_corrupt_adapter_config_is_one_line_before_ray(config, tmp_path):
    """The run's SFT adapter with an adapter_config.json that is not JSON: `serve` says so in one line, exit 2,
    before Ray starts (it once raised a ValueError traceback after Ray had started)."""
    sft = tmp_path / "runs" / "ux" / "sft"
    sft.mkdir(parents=True)
    (sft / "manifest.json").write_text('{"kind": "lora_adapter"}')
    (sft / "adapter_config.json").write_text('{"r": 8, "peft_type": ')
    (sft / "adapter_model.safetensors").write_bytes(b"")
    rc, out, s = loraforge("serve", str(config()))
    assert rc == 2 and "Traceback" not in out, out
    assert "adapter 'ux' cannot be served" in out and "adapter_config.json is not JSON" in out, out
    assert "Ray" not in out and s < 30, out


def test_serve_with_adapter_weights_that_disagree_with_its_config_is_one_line_before_ray(config, tmp_path):
    """Issue 37: the run's adapter whose adapter_model.safetensors has q_proj at rank 4 while adapter_config.json
    says r=8 (vLLM would load it): `serve` refuses it from the file's header in one line naming the file, the
    tensor and what is wrong, exit 2, before Ray starts."""
    import numpy as np
    from safetensors.numpy import save_file

    sft = tmp_path / "runs" / "ux" / "sft"
    sft.mkdir(parents=True)
    (sft / "manifest.json").write_text('{"kind": "lora_adapter"}')
    (sft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                         "target_modules": ["q_proj", "v_proj"]}))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{q}.lora_A.weight": np.zeros((4, 16), np.float32),
               f"{q}.lora_B.weight": np.zeros((16, 4), np.float32)}, str(sft / "adapter_model.safetensors"))
    rc, out, s = loraforge("serve", str(config()))
    assert rc == 2 and "Traceback" not in out, out
    assert "adapter 'ux' cannot be served" in out, out
    assert f"{sft / 'adapter_model.safetensors'}: tensor '{q}.lora_A.weight' has rank 4 (shape [4, 16]), but " \
           "adapter_config.json says r=8" in out, out
    assert "Ray" not in out, out  # refused before Ray started


def _tiny_llama(folder: Path) -> Path:
    """A base folder whose config.json has the tiny Llama's sizes (q 128 -> 128, k/v 128 -> 64, 2 layers)."""
    from tests.unit.artifacts.test_adapter_check import BASE

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**BASE, "architectures": ["LlamaForCausalLM"]}))
    return folder


def test_serve_with_an_adapter_of_another_base_is_one_line_before_ray(config, tmp_path):
    """Issue 37: the run's adapter agrees with its own config, but its q_proj maps 64 -> 64 features where the base's
    config.json (hidden_size 128, 4 heads) gives 128 -> 128: `serve` reads both and refuses it, one line naming the
    file, the tensor and both sizes, exit 2, before Ray starts (vLLM would fail on it inside the engine)."""
    from tests.unit.artifacts.test_adapter_check import lora, write

    base = _tiny_llama(tmp_path / "llama")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    write(tmp_path / "runs" / "ux" / "sft", lora(q, 8, 64, 64), target_modules=["q_proj"])
    (tmp_path / "runs" / "ux" / "sft" / "manifest.json").write_text('{"kind": "lora_adapter"}')
    rc, out, s = loraforge("serve", str(config()), f"model.name={base}")
    assert rc == 2 and "Traceback" not in out and "Ray" not in out, out
    [error] = [line for line in out.splitlines() if "cannot be served" in line]  # beside `model: <folder>` only
    for needle in ("adapter 'ux' cannot be served", f"tensor '{q}.lora_A.weight' is a LoRA on a q_proj of 64 -> 64 "
                   "features", "but the base's q_proj maps 128 -> 128"):
        assert needle in error, out
    assert s < 10, f"{s:.1f} s"  # refused before Ray Serve and vLLM are imported


def test_validate_checks_the_adapters_of_serve_adapter_dir(config, tmp_path):
    """Issue 37: `validate` checks every adapter under serve.adapter_dir as serve would: a good one passes (exit 0,
    the config printed), one whose v_proj is 128 -> 128 on a base with 2 KV heads (128 -> 64) is one line naming
    the adapter and the tensor, exit 2 (its checks against its own config are adapter_check's unit tests)."""
    from tests.unit.artifacts.test_adapter_check import good, lora, write

    base = _tiny_llama(tmp_path / "llama")
    hot = tmp_path / "hot"
    write(hot / "fine", good())
    rc, out, _ = loraforge("validate", str(config()), f"model.name={base}", f"serve.adapter_dir={hot}")
    assert rc == 0 and json.loads(out)["serve"]["adapter_dir"] == str(hot), out
    v = "base_model.model.model.layers.1.self_attn.v_proj"
    write(hot / "wide", {**good(), **lora(v, 8, 128, 128)})
    rc, out, s = loraforge("validate", str(config()), f"model.name={base}", f"serve.adapter_dir={hot}")
    assert_user_error(rc, out, s, "adapter 'wide' cannot be served", str(hot / "wide" / "adapter_model.safetensors"),
                      f"tensor '{v}.lora_A.weight' is a LoRA on a v_proj of 128 -> 128 features",
                      "the base's v_proj maps 128 -> 64")
