"""Registry: immutable versions, aliases with promote/rollback, audit log, atomic publish, lineage, name checks."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from pipelines.artifacts.registry import Registry, RegistryError, lineage_from_manifest, parse_ref

LINEAGE = {"base_model": "/models/tiny", "base_model_hash": "sha256:aa", "dataset_hash": "sha256:bb",
           "config": {"lora": {"r": 8}}, "eval_scores": {"rougeL": 0.5}}


def make_adapter(folder: Path, payload: bytes = b"weights-1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(payload)
    (folder / "manifest.json").write_text(json.dumps({"kind": "lora_adapter"}))
    return folder


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


def test_publish_resolve_and_versions_are_immutable(reg, tmp_path):
    src = make_adapter(tmp_path / "a")
    assert reg.publish("city", src, "lora_adapter", LINEAGE) == 1
    (src / "adapter_model.safetensors").write_bytes(b"weights-2")  # the source changes after publishing...
    assert reg.publish("city", src, "lora_adapter", LINEAGE) == 2
    v1 = reg.resolve("city@1")
    assert (v1.path / "adapter_model.safetensors").read_bytes() == b"weights-1"  # ...v1 does not
    assert reg.verify("city@1") and reg.verify("city@2")
    published = sorted(f for f in v1.path.rglob("*") if f.is_file())
    assert {f.name for f in published} == {"adapter_config.json", "adapter_model.safetensors", "manifest.json",
                                           "registry.json"}
    # read-only by mode bits (root ignores them, so os.access would prove nothing there): r--r--r-- everywhere
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in published} == {f.name: 0o444 for f in published}
    weights = v1.path / "adapter_model.safetensors"  # whoever changes a published file anyway is caught by verify
    weights.chmod(0o644)
    weights.write_bytes(b"weights-X")
    assert not reg.verify("city@1") and reg.verify("city@2")
    assert reg.resolve("city").version == 2 and reg.resolve("city@2").kind == "lora_adapter"
    assert v1.manifest == {"kind": "lora_adapter"} and v1.name == "city"
    assert [r["versions"] for r in reg.list()] == [[1, 2]]


def test_promote_and_rollback_move_aliases_and_are_audited(reg, tmp_path):
    for i in range(3):
        reg.publish("city", make_adapter(tmp_path / f"a{i}", f"w{i}".encode()), "lora_adapter", LINEAGE)
    reg.promote("city", 1, "production")
    reg.promote("city", 3, "production", reason="gate passed")
    reg.promote("city", 2, "candidate")
    assert reg.resolve("city@production").version == 3
    assert reg.rollback("city", "production", reason="bad answers") == 1
    assert reg.resolve("city@production").version == 1 and reg.resolve("city@candidate").version == 2
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("city", "production")
    actions = [(a["action"], a.get("alias"), a.get("version")) for a in reg.audit()]
    assert actions[-4:] == [("promote", "production", 1), ("promote", "production", 3),
                            ("promote", "candidate", 2), ("rollback", "production", 1)]
    assert reg.audit()[-1]["reason"] == "bad answers" and reg.audit()[-1]["user"]
    with pytest.raises(RegistryError, match="no such version"):
        reg.promote("city", 9, "production")


def test_unknown_refs_and_bad_names_are_refused(reg, tmp_path):
    reg.publish("city", make_adapter(tmp_path / "a"), "lora_adapter", LINEAGE)
    for ref, match in [("nope", "not registered"), ("city@7", "no version 7"), ("city@staging", "no alias"),
                       ("../etc", "must match"), ("a/b", "must match"), ("city@", "nothing after")]:
        with pytest.raises(RegistryError, match=match):
            reg.resolve(ref)
    with pytest.raises(RegistryError, match="must match"):
        reg.publish("../../x", tmp_path / "a", "lora_adapter", LINEAGE)
    with pytest.raises(RegistryError, match="alias"):
        reg.promote("city", 1, "../prod")
    assert parse_ref("city@production") == ("city", "production")


def test_pickles_and_incomplete_lineage_are_refused(reg, tmp_path):
    src = make_adapter(tmp_path / "a")
    (src / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(RegistryError, match="pickle"):
        reg.publish("city", src, "lora_adapter", LINEAGE)
    (src / "adapter_model.bin").unlink()
    with pytest.raises(RegistryError, match="dataset_hash"):
        reg.publish("city", src, "lora_adapter", {**LINEAGE, "dataset_hash": None})
    with pytest.raises(RegistryError, match="config.json"):
        reg.publish("city-merged", src, "merged_model", {**LINEAGE, "source": "city@1"})
    assert reg.list() == []


def test_training_state_beside_an_adapter_is_left_behind_not_refused(reg, tmp_path):
    """The SFT stage keeps Ray Train's checkpoints (torch optimizer/RNG state) in ray_train/ beside the adapter
    for resuming: publishing the adapter leaves that folder out instead of refusing the pickles in it."""
    src = make_adapter(tmp_path / "a")
    (src / "ray_train" / "checkpoint_000001").mkdir(parents=True)
    (src / "ray_train" / "checkpoint_000001" / "optimizer.pt").write_bytes(b"pickle")
    version = reg.publish("city", src, "lora_adapter", LINEAGE)
    copied = reg.resolve(f"city@{version}").path
    assert (copied / "adapter_config.json").is_file() and not (copied / "ray_train").exists()
    (src / "rng0.pt").write_bytes(b"pickle")  # outside ray_train/: still refused
    with pytest.raises(RegistryError, match=r"pickle files \['rng0.pt'\]"):
        reg.publish("city", src, "lora_adapter", LINEAGE)


def test_crash_after_the_folder_move_leaves_previous_state_intact(reg, tmp_path, monkeypatch):
    reg.publish("city", make_adapter(tmp_path / "a", b"one"), "lora_adapter", LINEAGE)
    reg.promote("city", 1, "production")
    before_index = (reg.root / "index.json").read_text()
    before_audit = reg.audit()

    def crash(self, index):
        raise KeyboardInterrupt("killed while writing the index")

    monkeypatch.setattr(Registry, "_write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        reg.publish("city", make_adapter(tmp_path / "b", b"two"), "lora_adapter", LINEAGE)
    monkeypatch.undo()
    assert (reg.root / "models" / "city" / "2").is_dir()  # the orphan exists on disk...
    assert (reg.root / "index.json").read_text() == before_index  # ...but no reader can see it
    assert reg.resolve("city").version == 1 and reg.resolve("city@production").version == 1
    with pytest.raises(RegistryError):
        reg.resolve("city@2")
    assert reg.audit() == before_audit
    assert reg.publish("city", make_adapter(tmp_path / "c", b"three"), "lora_adapter", LINEAGE) == 2
    assert (reg.resolve("city@2").path / "adapter_model.safetensors").read_bytes() == b"three"
    assert reg.verify("city@2")


def test_crash_during_the_copy_leaves_no_trace(reg, tmp_path, monkeypatch):
    reg.publish("city", make_adapter(tmp_path / "a"), "lora_adapter", LINEAGE)
    real_copy = shutil.copytree

    def half_copy(src, dst, **kw):
        Path(dst).mkdir(parents=True)
        shutil.copy2(Path(src) / "adapter_config.json", dst)
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", half_copy)
    with pytest.raises(OSError):
        reg.publish("city", make_adapter(tmp_path / "b"), "lora_adapter", LINEAGE)
    monkeypatch.setattr(shutil, "copytree", real_copy)
    assert [r["versions"] for r in reg.list()] == [[1]]
    assert not (reg.root / "models" / "city" / "2").exists()
    reg.promote("city", 1, "candidate")  # the next writer sweeps the staging area
    assert not any((reg.root / ".staging").glob("*"))


def test_lineage_from_manifest_and_variants(reg, tmp_path):
    from pipelines.artifacts.manifest import write_manifest

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    src = make_adapter(tmp_path / "a")
    write_manifest(src, kind="lora_adapter", inputs={"data": str(data), "base_model": str(base)},
                   config={"lora": {"r": 8}}, extra={"base_model": str(base), "data_hash": "sha256:dd"})
    lineage = lineage_from_manifest(src, eval_scores={"rougeL": 0.7})
    assert lineage["base_model_hash"].startswith("sha256:") and lineage["dataset_hash"] == "sha256:dd"
    reg.publish("city", src, "lora_adapter", lineage)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"m")
    reg.publish("city-merged", merged, "merged_model", {**lineage, "source": "city@1"})
    shown = reg.show("city")
    assert shown["versions"]["1"]["variants"] == ["city-merged@1"]
    assert shown["versions"]["1"]["lineage"]["eval_scores"] == {"rougeL": 0.7}
    with pytest.raises(RegistryError, match="another kind"):
        reg.publish("city", merged, "merged_model", {**lineage, "source": "city@1"})


def test_cli_list_show_promote_rollback(reg, tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app

    for i in range(2):
        reg.publish("city", make_adapter(tmp_path / f"a{i}", f"w{i}".encode()), "lora_adapter", LINEAGE)
    run = CliRunner().invoke
    root = ["--root", str(reg.root)]
    assert run(app, ["registry", "promote", "city", "1", "production", *root]).exit_code == 0
    assert run(app, ["registry", "promote", "city", "2", "production", *root]).exit_code == 0
    out = run(app, ["registry", "list", "--json", *root])
    assert json.loads(out.stdout.strip().splitlines()[-1])[0]["aliases"] == {"production": 2}
    out = run(app, ["registry", "rollback", "city", "production", *root])
    assert out.exit_code == 0 and reg.resolve("city@production").version == 1
    out = run(app, ["registry", "show", "city", *root])
    assert out.exit_code == 0 and "sha256:bb" in out.stdout
    out = run(app, ["registry", "promote", "city", "7", "production", *root])
    assert out.exit_code == 2 and "no such version" in out.output


def _results(tuned_rougeL: float, few_shot: float = 0.2, nll_delta: float = 0.0) -> dict:
    return {"variants": {"base": {"rougeL": 0.1, "exact_match": 0.0}, "few_shot": {"rougeL": few_shot},
                         "a": {"rougeL": tuned_rougeL, "exact_match": 0.5}},
            "forgetting": {"a": {"general_nll_delta": nll_delta, "mmlu_accuracy_delta": -0.1}}}


def test_gate_check_lists_every_reason():
    from pipelines.eval.gate import GateSection, check

    cfg = GateSection(min_rougeL_gain_over_base=0.05, min_rougeL_gain_over_few_shot=0.0,
                      max_general_nll_increase=0.2, max_mmlu_drop=0.05, min_exact_match=0.9)
    assert check(_results(0.5), "a", GateSection()) == []
    reasons = check(_results(0.12, few_shot=0.3, nll_delta=0.5), "a", cfg)
    assert len(reasons) == 5 and any("few-shot" in r for r in reasons) and any("NLL" in r for r in reasons)
    assert check(_results(0.5), "missing", cfg) == ["adapter 'missing' was not evaluated"]


def test_few_shot_verdict_is_plain():
    from pipelines.eval.judge import parse_score
    from pipelines.eval.report import verdicts

    scores = _results(0.15, few_shot=0.3)["variants"]
    assert verdicts(scores, ["a"])["a"].startswith("The few-shot base wins")
    assert "the fine-tune did not help" in verdicts(scores, ["a"])["a"]
    assert verdicts(_results(0.5)["variants"], ["a"])["a"].startswith("The fine-tune helped")
    assert parse_score("Score: 7/10") == 7.0 and parse_score("10") == 10.0 and parse_score("none") is None


def test_a_lost_index_refuses_every_write_and_deletes_nothing(reg, tmp_path):
    """index.json gone (a partial copy, a sync tool) while versions exist: a write would see an empty registry
    and garbage-collect every version folder; it is refused instead (exit 2 through the CLI, one line), and the
    folders stay."""
    from typer.testing import CliRunner

    from cluster.cli import app
    from pipelines.artifacts.registry import RegistryCorrupt

    for i in range(2):
        reg.publish("quickstart", make_adapter(tmp_path / f"a{i}", f"w{i}".encode()), "lora_adapter", LINEAGE)
    (reg.root / "index.json").unlink()
    folders = sorted(p.name for p in (reg.root / "models" / "quickstart").iterdir())
    with pytest.raises(RegistryCorrupt, match="index.json is missing, but the registry holds 2 version folder"):
        reg.publish("other", make_adapter(tmp_path / "b"), "lora_adapter", LINEAGE)
    out = CliRunner().invoke(app, ["registry", "promote", "quickstart", "1", "production", "--root", str(reg.root)])
    assert out.exit_code == 2 and "index.json is missing" in out.output and "Traceback" not in out.output
    assert sorted(p.name for p in (reg.root / "models" / "quickstart").iterdir()) == folders == ["1", "2"]
    assert not (reg.root / "models" / "other").exists()


def test_secrets_never_land_in_the_index_or_a_manifest(reg, tmp_path):
    """A credential inside a lineage value (an MLflow URI with a password) or a key named as a secret is written
    as ***, in the registry index and in a manifest."""
    from pipelines.artifacts.manifest import write_manifest

    lineage = {**LINEAGE, "mlflow": {"tracking_uri": "postgresql://ml:hunter2@db:5432/mlflow"},
               "serve": {"api_key": "k1", "max_tokens": 7}}
    reg.publish("city", make_adapter(tmp_path / "a"), "lora_adapter", lineage)
    index = (reg.root / "index.json").read_text()
    assert "hunter2" not in index and "k1" not in index and "postgresql://ml:***@db:5432/mlflow" in index
    write_manifest(tmp_path / "m", kind="x", inputs={}, config={"serve": {"api_key": "k1", "max_tokens": 7},
                                                                "train": {"tracking_uri": "http://u:pw@h/"}})
    doc = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert doc["config"] == {"serve": {"api_key": "***", "max_tokens": 7}, "train": {"tracking_uri": "http://u:***@h/"}}
