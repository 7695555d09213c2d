"""Former silent fallbacks, each now a counted rejection, an explicit error or a documented choice. Pure: tiny inputs
built here, no Ray instance. The stage-level effects (counts in eval.json / quantize.json, parse_actors on Ray Data)
are checked on the real stages in tests/integration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GOOD = {"instruction": "Name the city.", "input": "Ana flies to Oslo.", "output": "Oslo"}


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- 1. evaluation rows


def test_eval_rows_refused_are_counted_by_reason(tmp_path):
    from pipelines.eval.data import read_rows

    path = write_lines(tmp_path / "test.jsonl", [
        json.dumps(GOOD), "{broken", json.dumps([1, 2]), json.dumps({"instruction": "q"}),
        json.dumps({"instruction": "  ", "output": "a"}), json.dumps({"instruction": "q", "output": 42}), "",
        json.dumps({**GOOD, "output": "Lima"})])
    got = read_rows(path)
    assert [r["output"] for r in got.rows] == ["Oslo", "Lima"]
    assert got.by_reason == {"broken_json": 1, "empty_turn": 1, "missing_field": 1, "not_an_object": 1,
                             "wrong_type": 1}
    assert [r["line"] for r in got.rejected] == [2, 3, 4, 5, 6]  # blank lines are not rows
    c = got.counts()
    assert c["rows_in"] == c["rows_kept"] + c["rows_rejected"] == 7 and c["rows_rejected"] == 5


def test_eval_rows_all_bad_is_a_data_error_naming_the_file(tmp_path):
    from pipelines.eval.data import read_rows
    from pipelines.schema import DataError

    path = write_lines(tmp_path / "test.jsonl", [json.dumps({"instruction": "q"}), "{broken"])
    with pytest.raises(DataError, match=r"test\.jsonl.*line 1: missing_field.*line 2: broken_json"):
        read_rows(path)
    (tmp_path / "list.json").write_text(json.dumps([{"output": "a"}]))
    with pytest.raises(DataError, match=r"list\.json.*line 1: missing_field"):
        read_rows(str(tmp_path / "list.json"))


def test_eval_reads_what_curate_writes_and_other_formats(tmp_path):
    """A curated split folder (Parquet with messages), TRL prompt/completion JSONL (gzip) and preference pairs
    all become test rows; the prompt an Alpaca row makes is the one it made before (instruction + input)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.eval.data import few_shot_messages, read_rows, user_text

    folder = tmp_path / "curated" / "test"
    folder.mkdir(parents=True)
    msgs = [[{"role": "system", "content": "Be exact."}, {"role": "user", "content": f"q{i}"},
             {"role": "assistant", "content": f"a{i}"}] for i in range(3)]
    pq.write_table(pa.table({"row_id": [0, 1, 2], "messages": msgs}), folder / "part-00000.parquet")
    got = read_rows(str(folder))
    assert [r["output"] for r in got.rows] == ["a0", "a1", "a2"] and [user_text(r) for r in got.rows][0] == "q0"
    assert few_shot_messages(got.rows[2], got.rows[:1]) == [
        {"role": "system", "content": "Be exact."}, {"role": "user", "content": "q0"},
        {"role": "assistant", "content": "a0"}, {"role": "user", "content": "q2"}]
    with gzip.open(tmp_path / "pc.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"prompt": "Capital of Peru?", "completion": " Lima "}) + "\n")
        fh.write(json.dumps({"prompt": "Q?", "chosen": "good", "rejected": "bad"}) + "\n")
        fh.write(json.dumps({"text": "raw text"}) + "\n")
    got = read_rows(str(tmp_path / "pc.jsonl.gz"))
    assert [(user_text(r), r["output"]) for r in got.rows] == [("Capital of Peru?", "Lima"), ("Q?", "good")]
    assert got.by_reason == {"text_row": 1} and got.rejected[0]["line"] == 3
    alpaca = read_rows(write_lines(tmp_path / "a.jsonl", [json.dumps({**GOOD, "input": "Ana flies to Oslo."})]))
    assert few_shot_messages(alpaca.rows[0], [], "sys") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": GOOD["instruction"].strip() + "\n\nAna flies to Oslo."}]


# ----------------------------------------------------------------------------- 2. quantize's rows


def test_quantize_rows_refused_are_counted_by_reason(tmp_path):
    from pipelines.export.quantize import sample_conversations

    path = write_lines(tmp_path / "rows.jsonl", [
        json.dumps(GOOD), "{broken", json.dumps({"text": "raw text, no answer"}), json.dumps({"instruction": "q"}),
        json.dumps({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "bye"}]}),
        json.dumps(GOOD)])
    convs, rows = sample_conversations(path, 10, answer_last=True)
    assert len(convs) == 2 and rows["rows_kept"] == 2 and rows["rows_read"] == 6 == 2 + rows["rows_rejected"]
    assert rows["rejected_by_reason"] == {"broken_json": 1, "missing_field": 1, "no_final_answer": 1,
                                          "text_row": 1}
    assert [e["line"] for e in rows["rejected_examples"]] == [2, 3, 4, 5]
    convs, rows = sample_conversations(path, 1)  # reading stops at the limit: only what was read is counted
    assert len(convs) == 1 and rows["rows_read"] == 1 and rows["rows_rejected"] == 0


def test_quantize_rows_all_bad_is_a_data_error(tmp_path):
    from pipelines.export.quantize import conversations
    from pipelines.schema import DataError

    path = write_lines(tmp_path / "rows.jsonl", ["{broken", json.dumps({"text": "t"})])
    with pytest.raises(DataError, match=r"rows\.jsonl.*no usable conversation.*broken_json"):
        conversations(path, 4)


# ----------------------------------------------------------------------------- 3. quantize's held-out rows


@pytest.fixture
def run_cfg(tmp_path):
    from cluster.config import RunConfig

    return RunConfig(name="q", output_dir=str(tmp_path / "runs"))


def curated_split(cfg, test_rows: int) -> Path:
    curated = cfg.stage_dir("data") / "curated"
    for split in ("train", "validation", "test"):
        (curated / split).mkdir(parents=True)
    (curated / "manifest.json").write_text(json.dumps({"kind": "curated_dataset", "metrics": {
        "split_rows": {"train": 8, "validation": 1, "test": test_rows}}}))
    return curated


def test_quantize_without_a_test_split_refuses_instead_of_using_training_rows(run_cfg, monkeypatch):
    from cluster import session, stages
    from pipelines.schema import UserError

    def no_ray(_):
        raise AssertionError("the stage went on to Ray without held-out rows")

    monkeypatch.setattr(session, "init_ray", no_ray)
    ctx = stages.Context(run_cfg, places={stages.MERGE.name: Path("/models/merged")})
    with pytest.raises(UserError, match=r"no finished data stage.*quantize\.eval_path.*data\.split\.test > 0"):
        stages.QUANTIZE(ctx)
    curated_split(run_cfg, test_rows=0)  # curated with data.split.test=0: the test folder exists, empty
    with pytest.raises(UserError, match=r"test holds no rows.*quantize\.eval_path"):
        stages.QUANTIZE(ctx)


# ----------------------------------------------------------------------------- 4. a corrupt registry


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid JSON"), ("[]", "top level is a JSON list"), ('{"models": []}', "'models' is a JSON list"),
    ('{"models": {"city": {"versions": {"1": {"kind": "lora_adapter"}}, "aliases": {"prod": "x"}}}}',
     r"models\['city'\]\.aliases\['prod'\]")])
def test_corrupt_registry_index_is_a_registry_error_naming_the_file(tmp_path, text, problem):
    from pipelines.artifacts.registry import Registry, RegistryError

    (tmp_path / "index.json").write_text(text)
    reg = Registry(tmp_path)
    for read in (lambda: reg.resolve("city"), reg.list, lambda: reg.show("city")):
        with pytest.raises(RegistryError, match=rf"index\.json: .*{problem}"):
            read()
    with pytest.raises(RegistryError, match="index.json"):  # a writer does not overwrite it either
        reg.promote("city", 1, "prod")
    assert (tmp_path / "index.json").read_text() == text


def test_serving_tells_an_unknown_adapter_from_a_corrupt_registry(tmp_path):
    from serve.adapters import AdapterNotFound, AdapterSourceUnavailable, ChainSource, RegistrySource, StaticSource

    (tmp_path / "index.json").write_text(json.dumps({"format": 1, "models": {}}))
    source = ChainSource([StaticSource({"static": str(tmp_path)}), RegistrySource(str(tmp_path))])
    with pytest.raises(AdapterNotFound):
        source.resolve("nope@3")
    (tmp_path / "index.json").write_text("{not json")
    assert source.resolve("static").name == "static"  # the static adapters still answer
    with pytest.raises(AdapterSourceUnavailable, match=r"index\.json: not valid JSON") as e:
        source.resolve("nope")
    assert e.value.status == 503 and "index.json" in e.value.message  # what serve.ingress answers with


# ----------------------------------------------------------------------------- 5. adapter health


def tiny_adapter(folder: Path, module: str) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    g = torch.Generator().manual_seed(0)
    save_file({f"base_model.model.{module}.lora_A.weight": torch.randn(2, 4, generator=g),
               f"base_model.model.{module}.lora_B.weight": torch.randn(4, 2, generator=g)},
              str(folder / "adapter_model.safetensors"))


def tiny_base(folder: Path, key: str) -> str:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({key: torch.ones(4, 4)}, str(folder / "model.safetensors"))
    return str(folder)


def test_adapter_health_is_none_when_no_base_weight_matches(tmp_path):
    from pipelines.train.driver import adapter_health

    module = "model.layers.0.self_attn.q_proj"
    tiny_adapter(tmp_path / "ad", module)
    matched = adapter_health(tmp_path / "ad", tiny_base(tmp_path / "base", module + ".weight"))
    assert matched["matched_modules"] == 1 == matched["adapter_modules"] and matched["delta_over_weight_mean"] > 0
    other = adapter_health(tmp_path / "ad", tiny_base(tmp_path / "other", "transformer.h.0.attn.q.weight"))
    assert other == {"delta_over_weight": {}, "delta_over_weight_mean": None, "delta_over_weight_max": None,
                     "matched_modules": 0, "adapter_modules": 1}


def test_stage_manifest_carries_unmeasured_health_as_null(tmp_path):
    from pipelines.artifacts.location import Location
    from pipelines.train.config import QuantSection, TrainSection, WorkerJob
    from pipelines.train.driver import finish_stage

    out = tmp_path / "sft"
    tiny_adapter(out, "model.layers.0.self_attn.q_proj")
    base = tiny_base(tmp_path / "base", "lm_head.weight")
    job = WorkerJob(model_dir=base, dtype="float32", quant=QuantSection(), train=TrainSection(tracking_uri="off"),
                    storage=str(tmp_path / "storage"), data=Location(tmp_path))
    state = {"step": 2, "loss_history": [2.0, 1.0], "eval_history": [], "best_eval": float("inf")}
    finish_stage(out, job, kind="lora_adapter", state=state,
                 data_manifest={"inputs": {"train": {"hash": "sha256:aa"}}}, title="SFT", config={})
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["delta_over_weight_mean"] is None and metrics["matched_modules"] == 0


# ----------------------------------------------------------------------------- 7. config keys that did nothing


def test_registry_alias_is_gone_gate_alias_is_the_one():
    from pydantic import ValidationError

    from cluster.config import ConfigError, RunConfig, apply_overrides
    from pipelines.artifacts.registry import RegistrySection

    with pytest.raises(ValidationError, match="alias"):
        RegistrySection(alias="production")
    with pytest.raises((ConfigError, ValidationError)):
        RunConfig.model_validate(apply_overrides({}, ["registry.alias=production"]))
    assert RunConfig.model_validate(apply_overrides({}, ["gate.alias=production"])).gate.alias == "production"
