"""ORPO, SimPO and KTO through the align (dpo) stage on the shared preference pairs (tests/data, Apache-2.0):
each method's own training signal improves, the reference stays frozen where there is one.

    .venv/bin/pytest tests/integration/test_align.py -q

Every method starts from a fresh LoRA adapter on the base (dpo.start=base; the SFT-adapter start is DPO's path,
covered by test_dpo.py). One Ray Train run (ORPO: no SFT, no reference model) and two in-process loops (SimPO
without a reference; KTO on the KTO view of the pairs against the base frozen): the same worker loop, loss
functions and checkpoints.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

STEPS = 12


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def aligned(ray_session, tiny_model_dir, repo_data, tmp_path_factory):
    from pipelines.artifacts.manifest import hash_path
    from pipelines.train import dpo
    from pipelines.train.config import DPOSection, LoraSection, TrainSection, TrainSetup

    pairs = str(repo_data / "preference" / "qa_feedback_pairs.jsonl")
    root = tmp_path_factory.mktemp("align")
    base_hash = hash_path(tiny_model_dir)
    lora = LoraSection(r=8, alpha=16, target_modules=["q_proj", "v_proj", "o_proj"])
    # 16 pairs (13 to train on), 4 a step: 12 steps are 4 passes, so the signal is the method's own on pairs it
    # trains on; ORPO and SimPO average token log-probs, which a tiny random model does not separate in one pass
    train = TrainSection(num_workers=1, cpus_per_worker=1, max_steps=STEPS, batch_size=4, lr=1e-2, warmup_steps=1,
                         eval_every=0, log_every=4, tracking_uri="off")
    common = dict(train_path=pairs, max_length=1024, max_pairs=16, validation_fraction=0.15, start="base")
    out = {}
    # ORPO and SimPO read the same pairs the same way (no reference): one prepared dataset serves both
    orpo = DPOSection(method="orpo", **common)
    paired = dpo.prepare(orpo, TrainSetup(model_dir=tiny_model_dir, train=train), None, root / "pairs")
    out["orpo"] = dpo.run(orpo, TrainSetup(model_dir=tiny_model_dir, train=train), None, paired, root / "orpo",
                          lora=lora)
    local = TrainSetup(model_dir=tiny_model_dir, train=train, local=True)
    out["simpo"] = dpo.run(DPOSection(method="simpo", **common), local, None, paired, root / "simpo", lora=lora)
    kto = DPOSection(method="kto", lr=1e-3, **common)  # KTO's own lr: at 1e-2 the policy's drift (z0) outruns it
    out["kto_data"] = dpo.prepare(kto, local, None, root / "kto_data")
    out["kto"] = dpo.run(kto, local, None, out["kto_data"], root / "kto", lora=lora)
    out["pairs"] = paired
    out["base_hash"] = (base_hash, hash_path(tiny_model_dir))
    return out


def metrics(folder):
    return json.loads((folder / "manifest.json").read_text())["metrics"]


def test_orpo_from_the_base_on_ray_train(aligned):
    """No reference model anywhere: the prepared pairs carry no reference log-probs, the adapter starts fresh on
    the base; the ORPO loss and its NLL part fall. (Its odds-ratio term, a difference of mean token log-probs,
    stays flat on this tiny random model: log σ ≈ -0.69 throughout, at λ 0.1 and at λ 3 alike; it is reported.)"""
    data = json.loads((aligned["pairs"] / "manifest.json").read_text())
    assert set(data["inputs"]) == {"curated"} and data["metrics"]["reference"] is None  # curated pairs, no reference
    assert data["metrics"]["method"] == "orpo" and data["metrics"]["rows_kept"] == 16
    assert data["metrics"]["rows_in"] == 100 == data["metrics"]["rows_kept"] + data["metrics"]["rows_rejected"]
    assert data["metrics"]["train"] >= 10
    man = json.loads((aligned["orpo"] / "manifest.json").read_text())
    m = man["metrics"]
    assert man["lineage"]["start"] == "base" and man["config"]["method"] == "orpo"
    assert len(m["loss_history"]) == m["steps"] == STEPS
    assert _mean(m["loss_history"][-3:]) < _mean(m["loss_history"][:3]), m["loss_history"]
    assert _mean(m["nll_history"][-3:]) < _mean(m["nll_history"][:3]) - 0.1, m["nll_history"]
    assert len(m["log_odds_ratio_history"]) == STEPS and max(m["log_odds_ratio_history"]) < 0
    assert (aligned["orpo"] / "adapter_model.safetensors").is_file()


def test_simpo_without_a_reference(aligned):
    m = metrics(aligned["simpo"])
    acc, margin = m["reward_accuracy_history"], m["reward_margin_history"]
    assert _mean(m["loss_history"][-3:]) < _mean(m["loss_history"][:3]), m["loss_history"]
    assert _mean(margin[-3:]) > _mean(margin[:3]) + 0.02, margin
    assert _mean(acc[-3:]) >= 0.75, acc


def test_kto_on_the_kto_view_of_the_pairs(aligned):
    """Each pair gives a desirable and an undesirable row (counted in the prepared manifest); the loss falls, the
    reward margin (desirable − undesirable) rises, the KL estimate z0 is reported (never negative)."""
    data = metrics(aligned["kto_data"])
    train = data["labels"]["train"]
    assert train["desirable"] == train["undesirable"] == data["train"] // 2 >= 10
    m = metrics(aligned["kto"])
    margin, kl = m["reward_margin_history"], m["kl_history"]
    assert _mean(m["loss_history"][-3:]) < _mean(m["loss_history"][:3]), m["loss_history"]
    assert _mean(margin[-3:]) > _mean(margin[:3]) + 0.1, margin
    assert len(kl) == STEPS and min(kl) >= 0
    weights = json.loads((aligned["kto"] / "manifest.json").read_text())["config"]["kto_weights"]
    assert (weights["desirable"], weights["undesirable"]) == (1.0, 1.0)  # n_D = n_U: already 1:1


def test_kto_reference_is_the_frozen_base(aligned, tiny_model_dir):
    """The stored reference log-probs (row and its mismatched KL sequence) equal a fresh forward of the base after
    training; the base's files are untouched."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.train.losses import sequence_logps

    assert aligned["base_hash"][0] == aligned["base_hash"][1]
    assert metrics(aligned["kto_data"])["reference"] == "base"
    rows = pq.read_table(aligned["kto_data"] / "train").slice(0, 2).to_pylist()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for r in rows:
        assert r["kl_input_ids"] != r["input_ids"]  # a mismatched completion
        for ids, labels, want in ((r["input_ids"], r["labels"], r["ref"]),
                                  (r["kl_input_ids"], r["kl_labels"], r["ref_kl"])):
            with torch.no_grad():
                lp, _ = sequence_logps(model(input_ids=torch.tensor([ids])).logits, torch.tensor([labels]))
            assert float(lp[0]) == pytest.approx(want, abs=1e-3)
