"""Unpaired feedback rows (KTO): prompt / completion / label, read, validated, de-duplicated and split by curation
like every other row, with the desirable / undesirable counts in the report."""

from __future__ import annotations

import json

import pytest

from pipelines.data.rowformats import RowError, apply_columns, check_columns, parse_raw, to_canonical, unpaired_view


@pytest.mark.parametrize("label,good", [(True, True), (False, False), (1, True), (0, False), ("thumbs_up", True),
                                        ("Down", False), (" good ", True), ("BAD", False), ("\U0001f44d", True)])
def test_unpaired_rows_and_their_labels(label, good):
    kind, rec = to_canonical({"prompt": "Capital of Norway?", "completion": "Oslo.", "label": label}, "auto")
    assert kind == "unpaired" and rec["label"] is good
    assert rec["prompt"] == [{"role": "user", "content": "Capital of Norway?"}] and rec["completion"] == "Oslo."


@pytest.mark.parametrize("label", ["maybe", 2, None, [True]])
def test_an_unreadable_label_is_refused_naming_it(label):
    with pytest.raises(RowError) as e:
        to_canonical({"prompt": "q", "completion": "a", "label": label}, "unpaired")
    assert e.value.reason in ("wrong_type", "missing_field") and "label" in str(e.value)


def test_thumbs_up_fields_through_columns():
    check_columns({"prompt": "question", "completion": "answer", "label": "feedback.thumbs_up"})
    row = apply_columns(parse_raw(json.dumps({"question": "q?", "answer": "a.", "feedback": {"thumbs_up": False}})),
                        {"prompt": "question", "completion": "answer", "label": "feedback.thumbs_up"})
    assert to_canonical(row, "auto")[1]["label"] is False
    with pytest.raises(RowError, match=r"data.columns.label"):
        apply_columns({"question": "q", "answer": "a"}, {"label": "thumbs_up"})


def test_kto_view_of_a_pair():
    pair = to_canonical({"prompt": "q", "chosen": "good", "rejected": "bad"}, "auto")[1]
    assert [(r["completion"], r["label"]) for r in unpaired_view(pair)] == [("good", True), ("bad", False)]


def test_curation_of_unpaired_rows_counts_labels(tmp_path):
    """Duplicates (same prompt and completion, whatever the label) are removed, a bad label and a broken line are
    refused with their reasons, and the report and manifest carry desirable / undesirable per split."""
    import random

    import pyarrow.dataset as pads

    from pipelines.data import curate
    from pipelines.data.config import DataConfig

    rng = random.Random(0)
    words = "oslo bergen river mountain coffee ledger orbit violin cedar harbor quartz meadow lantern pepper".split()

    def text(n):
        return " ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(n))

    rows = [{"q": text(6) + "?", "a": text(10) + ".", "up": i % 3 != 0} for i in range(60)]
    lines = [json.dumps(r) for r in rows]
    lines += [json.dumps({**rows[4], "up": not rows[4]["up"]}), json.dumps(rows[5])]  # duplicates
    lines += [json.dumps({"q": "x?", "a": "y.", "up": "perhaps"}), "{broken"]
    f = tmp_path / "feedback.jsonl"
    f.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(train_path=str(f), columns={"prompt": "q", "completion": "a", "label": "up"},
                     split={"train": 0.7, "validation": 0.2, "test": 0.1})
    out = curate.run(cfg, tmp_path / "curated")
    m = json.loads((out / "manifest.json").read_text())
    assert m["data_kind"] == "unpaired" and m["metrics"]["rows_in"] == 64
    assert m["metrics"]["rows_kept"] == 60, m["metrics"]
    reasons = m["metrics"]["rejected_by_reason"]
    assert reasons.get("exact_duplicate") == 2 and reasons.get("wrong_type") == 1 and reasons.get("broken_json") == 1
    labels = m["metrics"]["labels"]
    assert sum(n["desirable"] for n in labels.values()) == 40 and sum(n["undesirable"] for n in labels.values()) == 20
    assert {s: n["desirable"] + n["undesirable"] for s, n in labels.items()} == m["metrics"]["split_rows"]
    train = pads.dataset(str(out / "train"), format="parquet").to_table().to_pylist()
    assert set(train[0]) >= {"prompt", "completion", "label"} and isinstance(train[0]["label"], bool)
    assert "desirable" in (out / "curation_report.md").read_text()
