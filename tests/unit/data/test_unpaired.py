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


def test_preference_pairs_through_curation_for_the_align_stage(tmp_path):
    """dpo.train_path's pairs go through the data wing (pipelines.train.dpo.curate_rows): bad rows refused with
    their reason (a missing mapped field named as dpo.columns.<role>), an identical pair and an exact duplicate
    dropped, every row of one prompt in one split, and rows_in = kept + rejected; a file of another row kind is
    one DataError naming dpo.train_path."""
    import random

    import pyarrow.dataset as pads

    from pipelines.schema import DataError
    from pipelines.train.config import DPOSection
    from pipelines.train.dpo import curate_rows

    rng = random.Random(1)
    words = "oslo bergen river mountain coffee ledger orbit violin cedar harbor quartz meadow lantern pepper".split()

    def text(n):
        return " ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(n))

    prompts = [text(6) + "?" for _ in range(12)]
    rows = [{"q": prompts[i // 3], "good": text(10) + ".", "bad": text(10) + "."} for i in range(36)]
    lines = [json.dumps(r) for r in rows]
    lines += [json.dumps(rows[7]),  # exact duplicate
              json.dumps({"q": "Same?", "good": "Same answer.", "bad": "Same answer. "}),  # identical_pair
              json.dumps({"q": "No rejected?", "good": "An answer."}),  # missing_field: dpo.columns.rejected
              "{broken"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    cfg = DPOSection(train_path=str(pairs), columns={"prompt": "q", "chosen": "good", "rejected": "bad"},
                     validation_fraction=0.25)
    out = curate_rows(cfg, None, tmp_path / "curated")
    man = json.loads((out / "manifest.json").read_text())
    m = man["metrics"]
    assert man["data_kind"] == "preference" and (out / "curation_report.md").is_file()
    assert (m["rows_in"], m["rows_kept"], m["rows_rejected"]) == (40, 36, 4)
    assert m["rows_in"] == m["rows_kept"] + m["rows_rejected"]
    assert m["rejected_by_reason"] == {"exact_duplicate": 1, "identical_pair": 1, "missing_field": 1,
                                       "broken_json": 1}, m["rejected_by_reason"]
    refused = [json.loads(r) for f in (out / "rejected").glob("*.jsonl") for r in f.read_text().splitlines()]
    assert "dpo.columns.rejected" in next(r["detail"] for r in refused if r["reason"] == "missing_field")
    where = {}
    for split in ("train", "validation"):
        for r in pads.dataset(str(out / split), format="parquet").to_table().to_pylist():
            where.setdefault(r["prompt"][0]["content"], set()).add(split)
    assert len(where) == 12 and all(len(s) == 1 for s in where.values())  # a prompt's pairs share a split
    assert {s for v in where.values() for s in v} == {"train", "validation"}
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"instruction": text(5), "output": text(8)}) + "\n" for _ in range(5)))
    with pytest.raises(DataError, match=r"dpo.train_path=.*holds sft rows; dpo.method=dpo trains on"):
        curate_rows(DPOSection(train_path=str(sft)), None, tmp_path / "wrong")
