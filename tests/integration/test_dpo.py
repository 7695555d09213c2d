"""DPO on Ray Train from an SFT adapter, on real human preference pairs, plus our loss against TRL's numbers.

    .venv/bin/pytest tests/integration/test_dpo.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model standing in for an SFT result (non-zero B, so it changes the model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipelines.artifacts.manifest import write_manifest

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)
    out = tmp_path_factory.mktemp("sft")
    model.save_pretrained(out, safe_serialization=True)
    write_manifest(out, kind="lora_adapter", inputs={}, config={}, extra={"lineage": {"base_model": "tiny"}})
    return out


@pytest.fixture(scope="module")
def dpo_run(ray_session, tiny_model_dir, sft_adapter, repo_data, tmp_path_factory, s3):
    """The run as a run in an object store has it (a real S3 API, moto): the reference actors and the workers
    copy the SFT adapter from the store to their node, and the workers read the prepared pairs there (no node
    but the driver's has its folders). The pairs: tests/data's first 100 (Apache-2.0), of which max_pairs takes 64."""
    from pipelines.artifacts import storage
    from pipelines.artifacts.location import Location
    from pipelines.artifacts.manifest import hash_path
    from pipelines.train import dpo
    from pipelines.train.config import TrainSection, TrainSetup
    from tests.conftest import BUCKET

    cfg = dpo.DPOSection(train_path=str(repo_data / "preference" / "qa_feedback_pairs.jsonl"), beta=0.1,
                         max_length=1024, max_pairs=64, validation_fraction=0.15)
    root = tmp_path_factory.mktemp("dpo")
    sft_hash = hash_path(sft_adapter)
    sft_uri, data_uri = f"s3://{BUCKET}/dpo-run/sft", f"s3://{BUCKET}/dpo-run/dpo_data"
    storage.push(sft_adapter, sft_uri)
    sft = Location(sft_adapter, sft_uri)
    train = TrainSection(num_workers=2, cpus_per_worker=0.5, max_steps=16, batch_size=4, lr=5e-3, warmup_steps=1,
                         eval_every=8, log_every=4, tracking_uri="off")
    setup = TrainSetup(model_dir=tiny_model_dir, train=train)
    data = dpo.prepare(cfg, setup, sft, root / "data")
    storage.push(data, data_uri)
    out = dpo.run(cfg, setup, sft, Location(data, data_uri), root / "dpo")
    return {"data": data, "out": out, "manifest": json.loads((out / "manifest.json").read_text()),
            "sft_hash_before": sft_hash, "sft_hash_after": hash_path(sft_adapter), "cfg": cfg, "sft_uri": sft_uri}


def test_workers_read_the_sft_adapter_from_the_store(dpo_run, sft_adapter):
    """The node copy the workers made of the stored adapter (this one machine is their node) holds its files."""
    import hashlib

    from pipelines.artifacts.models import cache_root

    copy = cache_root() / "fetched" / hashlib.sha256(dpo_run["sft_uri"].encode()).hexdigest()[:20]
    assert (copy / "adapter_model.safetensors").read_bytes() == (sft_adapter / "adapter_model.safetensors"
                                                                   ).read_bytes()


def test_pairs_accounted(dpo_run):
    """The 100 pairs went through curation (near-duplicate pairs dropped); max_pairs took the first 64 it kept."""
    m = json.loads((dpo_run["data"] / "manifest.json").read_text())["metrics"]
    assert m["rows_in"] == 100 and m["rows_in"] == m["rows_kept"] + m["rows_rejected"]
    assert m["rows_kept"] == m["train"] + m["validation"] == 64
    assert m["rejected_by_reason"]["max_pairs"] == 100 - 64 - m["curation"]["rows_rejected"] > 0
    assert m["train"] > 40 and m["validation"] > 0


def test_reward_accuracy_rises_and_margins_grow(dpo_run):
    m = dpo_run["manifest"]["metrics"]
    acc, margins = m["reward_accuracy_history"], m["reward_margin_history"]
    assert len(acc) == m["steps"] == 16
    assert sum(acc[-4:]) / 4 >= 0.75, acc
    assert sum(margins[-4:]) / 4 > sum(margins[:4]) / 4 + 0.05, margins
    assert m["loss_history"][-1] < m["loss_history"][0]
    assert "reward_accuracy" in m["eval_extra_history"]  # held-out pairs are scored too
    assert dpo_run["manifest"]["lineage"]["parent_adapter"]["path"].endswith(Path(dpo_run["manifest"]["config"]
                                                                                   ["parent_adapter"]).name)


def test_reference_is_the_frozen_sft_model(dpo_run, tiny_model_dir, sft_adapter):
    """The stored reference log-probs equal a fresh base+SFT forward after training; the SFT files are untouched."""
    import pyarrow.parquet as pq
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipelines.train.losses import sequence_logps

    assert dpo_run["sft_hash_before"] == dpo_run["sft_hash_after"]
    rows = pq.read_table(dpo_run["data"] / "train").slice(0, 3).to_pylist()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(sft_adapter)).eval()
    for r in rows:
        with torch.no_grad():
            lp, _ = sequence_logps(model(input_ids=torch.tensor([r["chosen_input_ids"]])).logits,
                                   torch.tensor([r["chosen_labels"]]))
        # float32 sums over up to 1024 tokens (the stored one chunked, this one from full logits): relative 1e-6
        assert float(lp[0]) == pytest.approx(r["ref_chosen"], rel=1e-6, abs=1e-3)


def test_loss_matches_trl(tiny_model_dir):
    """Our sigmoid and IPO losses give TRL 1.16's DPOTrainer numbers on the same batch."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from pipelines.train.losses import dpo_loss, sequence_logps

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"Where is the meeting {i}?"}],
         "chosen": [{"role": "assistant", "content": f"In Oslo on {i} May."}],
         "rejected": [{"role": "assistant", "content": "I do not know, maybe somewhere."}]} for i in range(1, 5)])
    for loss_type in ("sigmoid", "ipo"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        args = DPOConfig(output_dir="/tmp/trl-dpo-check", per_device_train_batch_size=4, beta=0.3,
                         loss_type=loss_type, bf16=False, report_to=[], use_cpu=True)
        trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok,
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            trl_loss = float(trainer._compute_loss(trainer.model, batch, return_outputs=False))
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            pol, ntok = sequence_logps(logits, labels)
            with trainer.model.disable_adapter():
                ref, _ = sequence_logps(trainer.model(input_ids=batch["input_ids"],
                                                      attention_mask=batch["attention_mask"]).logits, labels)
        b = pol.shape[0] // 2
        ours = dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], beta=0.3, loss_type=loss_type,
                        chosen_tokens=ntok[:b], rejected_tokens=ntok[b:])["losses"].mean()
        assert float(ours) == pytest.approx(trl_loss, abs=1e-5), loss_type
        assert abs(float(pol[0] - ref[0])) > 1e-4  # the adapter really differs from the reference


def test_pairs_in_any_file_type_with_column_mapping(ray_session, tiny_model_dir, sft_adapter, repo_data,
                                                   tmp_path):
    """dpo.train_path goes through the data stage's readers: a gzip'd JSONL whose fields are named otherwise,
    mapped by dpo.columns; a broken line and a row without the mapped field are refused with source and line,
    and the kept pairs are the same tokens as the plain file gives."""
    import gzip

    import pyarrow.parquet as pq

    from pipelines.train import dpo
    from pipelines.train.config import TrainSetup

    src = repo_data / "preference" / "qa_feedback_pairs.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()[:12]]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
    lines = [json.dumps(r) for r in renamed[:6]] + ["{not json", json.dumps({"question": "q", "good": "a"})] + \
        [json.dumps(r) for r in renamed[6:]]
    packed = tmp_path / "pairs.jsonl.gz"
    with gzip.open(packed, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    common = dict(max_length=1024, validation_fraction=0.0)
    setup = TrainSetup(model_dir=tiny_model_dir)
    mapped = dpo.prepare(dpo.DPOSection(train_path=str(packed), columns={"prompt": "question", "chosen": "good",
                                                                          "rejected": "bad"}, **common),
                         setup, sft_adapter, tmp_path / "mapped")
    base = dpo.prepare(dpo.DPOSection(train_path=str(plain), **common), setup, sft_adapter, tmp_path / "base")
    m = json.loads((mapped / "manifest.json").read_text())["metrics"]
    plain_m = json.loads((base / "manifest.json").read_text())["metrics"]
    near = plain_m["rejected_by_reason"].get("near_duplicate", 0)  # curation's dedup, the same in both files
    assert (m["rows_in"], m["rows_kept"], m["rows_rejected"]) == (14, 12 - near, 2 + near), m
    assert m["rows_in"] == m["rows_kept"] + m["rows_rejected"] and m["train"] == m["rows_kept"]
    refused = [json.loads(line) for line in (mapped / "rejected.jsonl").read_text().splitlines()]
    faults = sorted((r["line"], r["reason"].split(":")[0]) for r in refused if "duplicate" not in r["reason"])
    assert faults == [(7, "broken_json"), (8, "missing_field")], refused
    assert all(r["source"].endswith("pairs.jsonl.gz") for r in refused)
    assert "dpo.columns.rejected" in next(r["reason"] for r in refused if r["line"] == 8)
    curated = json.loads((mapped / "curated" / "manifest.json").read_text())  # the data wing's own report
    assert curated["kind"] == "curated_dataset" and curated["data_kind"] == "preference"
    assert (mapped / "curated" / "curation_report.md").is_file()
    got, want = (pq.read_table(d / "train").to_pydict() for d in (mapped, base))
    assert sorted(got["chosen_input_ids"]) == sorted(want["chosen_input_ids"])
    assert sorted(got["rejected_input_ids"]) == sorted(want["rejected_input_ids"])
