"""Run config: every shipped config validates; typos and bad values fail naming the key, before any Ray work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError, RunConfig, apply_overrides, json_schema, load_config

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_quickstart_is_the_small_model_on_local_ray():
    cfg = load_config(REPO / "configs" / "quickstart-cpu.yaml")
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.ray.address is None
    assert cfg.train.num_workers == 2 and cfg.train.cpus_per_worker < 1
    assert cfg.demo.prompts


def test_unknown_key_names_file_and_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "train.max_stepz" in str(e.value) and "not permitted" in str(e.value)


def test_unknown_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"trian: Extra inputs"):
        load_config(p)


def test_bad_value_names_path_and_value(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  r: abc\ntrain:\n  lr: -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "lora.r" in msg and "'abc'" in msg
    assert "train.lr" in msg and "greater than 0" in msg


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.max_steps=7", "lora.r=8", "lora.target_modules=[q_proj, v_proj]",
                             "serve.api_key=secret"])
    assert cfg.train.max_steps == 7 and cfg.lora.r == 8
    assert cfg.lora.modules() == ["q_proj", "v_proj"]
    assert cfg.serve.api_key == "secret"


def test_override_typo_fails():
    with pytest.raises(ConfigError, match=r"train\.max_stepz"):
        load_config(None, ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["train.max_steps"])


def test_not_a_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_schema_has_every_section_with_descriptions():
    schema = json.loads(json_schema())
    assert {"model", "data", "lora", "train", "serve", "ray", "demo"} <= set(schema["properties"])
    train = schema["$defs"]["TrainSection"]["properties"]
    assert all(field.get("description") for field in train.values())


def test_cli_typo_fails_before_ray_starts(tmp_path):
    """The CLI refuses a typo'd key with exit 2 and never imports Ray (so no Ray work can have started)."""
    p = tmp_path / "c.yaml"
    p.write_text("name: t\ntrain:\n  max_stepz: 3\n")
    code = ("import sys; from cluster.cli import app\n"
            "try:\n    app(['run', sys.argv[1]])\n"
            "except SystemExit as e:\n    print('exit', e.code, 'ray' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=120)
    assert "exit 2 False" in out.stdout, out.stdout + out.stderr
    assert "train.max_stepz" in out.stderr


def test_qlora_with_zero3_needs_a_16bit_storage_dtype():
    """ZeRO-3 partitions QLoRA's packed weights stored as compute-dtype tensors: float32 compute is refused."""
    from pipelines.train.config import QuantSection, TrainSection, check_combination

    with pytest.raises(ValueError, match="quant.compute_dtype=bfloat16"):
        check_combination(QuantSection(load_in_4bit=True, compute_dtype="float32"), TrainSection(deepspeed="zero3"))
    check_combination(QuantSection(load_in_4bit=True, compute_dtype="bfloat16"), TrainSection(deepspeed="zero3"))
    check_combination(QuantSection(load_in_4bit=True), TrainSection(deepspeed="zero2"))


def test_deepspeed_auto_fields_filled_from_run_config():
    from pipelines.train.config import TrainSection, deepspeed_config

    cfg = deepspeed_config(TrainSection(deepspeed="zero3", batch_size=4, grad_accum=2, num_workers=2), "float32")
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 16 and cfg["bf16"]["enabled"] is False
    assert "auto" not in json.dumps(cfg)
    assert deepspeed_config(TrainSection(), "float32") is None
    with pytest.raises(ValueError, match="early_stopping_patience needs eval_every"):
        TrainSection(early_stopping_patience=2, eval_every=0)


def test_checkpoint_and_eval_cadence_auto_by_default():
    """A run is resumable without settings: checkpoints every 10% of its steps (at least every 10), validation
    with each; explicit numbers are kept."""
    from pipelines.train.config import AUTO_MIN_STEPS, TrainSection

    assert TrainSection().checkpoint_every == "auto" == TrainSection().eval_every
    assert TrainSection(max_steps=1000).checkpoint_steps() == 100 == TrainSection(max_steps=1000).eval_steps()
    assert TrainSection(max_steps=12).checkpoint_steps() == AUTO_MIN_STEPS == 10
    assert TrainSection(max_steps=1001).checkpoint_steps() == 101
    t = TrainSection(max_steps=1000, checkpoint_every=0, eval_every=25)
    assert (t.checkpoint_steps(), t.eval_steps()) == (0, 25)
    assert TrainSection(max_steps=1000, checkpoint_every=40).eval_steps() == 40  # eval auto follows checkpoints
    with pytest.raises(ValueError):
        TrainSection(checkpoint_every=-1)
    with pytest.raises(ValueError):
        TrainSection(eval_every="sometimes")


def test_tracking_off_survives_yaml():
    assert load_config(None, ["train.tracking_uri=off"]).train.tracking_uri == "off"


def test_eval_on_the_runs_curated_test_split(tmp_path):
    """eval.test_path: curated is this run's curated test split; preflight does not look for a file of that name."""
    from cluster.config import preflight
    from cluster.stages import EVALUATE, eval_section

    cfg = RunConfig(name="x", output_dir=str(tmp_path), eval={"test_path": "curated"})
    preflight(cfg, EVALUATE.needs, source="c.yaml")
    assert eval_section(cfg).test_path == str(tmp_path / "x" / "data" / "curated" / "test")
    assert eval_section(RunConfig(eval={"test_path": "t.jsonl"})).test_path == "t.jsonl"
