"""Curation and tokenization on real Ray Data: counts add up, faults quarantined with reasons, near-duplicates
found, splits clean and deterministic, labels only on assistant tokens; balancing by a category column and mixing
in general data at a declared share through the `loraforge curate` command.

    .venv/bin/pytest tests/integration/test_data.py -q
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.data.dedup import jaccard, shingles
from pipelines.data.filters import dedup_text

pytestmark = pytest.mark.integration

N_REAL = 600  # rows taken from each real file: enough to hit its real duplicates, small enough for 2 cores
FAULTS = [  # (line text, reason): every class of broken or low-quality row
    ('{"instruction": "Say hi", "output": "hi there"', "broken_json"),
    ('["not", "an", "object"]', "not_an_object"),
    ('{"input": "x", "output": "a long enough answer"}', "missing_field"),
    ('{"instruction": 5, "output": "a long enough answer"}', "wrong_type"),
    ('{"instruction": "Say hi", "output": "   "}', "empty_turn"),
    ('{"instruction": "Bad escape \\ud800 here", "output": "a long enough answer"}', "undecodable"),
    (json.dumps({"instruction": "Tell a long story " + " ".join(f"w{i}" for i in range(1500)), "output": "ok ok"}),
     "too_long"),
    ('{"instruction": "What is two plus two?", "output": "4"}', "too_short_answer"),
    (json.dumps({"instruction": "Sing", "output": "la la la " * 20}), "repeated_ngrams"),
    (json.dumps({"instruction": "Draw", "output": "#$%^&*{}[]<>~|\\\\/@+=_#$%^&*"}), "symbol_ratio"),
]


def _edit(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(max(1, len(words) // 60)):
        words[rng.randrange(len(words))] = "edited"
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    """Real Alpaca and GSM8K rows plus faults and twins. Needs ../shared/data: Alpaca's licence (CC BY-NC 4.0) keeps
    it out of the repository."""
    root = tmp_path_factory.mktemp("curate")
    src = root / "in"
    src.mkdir()
    alpaca = json.loads((shared_data / "sft" / "alpaca_5000.json").read_text())[:N_REAL]
    gsm = json.loads((shared_data / "sft" / "gsm8k_train_alpaca.json").read_text())[:N_REAL]
    (src / "a_alpaca.json").write_text(json.dumps(alpaca, indent=1))
    (src / "b_gsm8k.json").write_text(json.dumps(gsm, indent=1))
    rng = random.Random(0)
    lines, near, exact = [f for f, _ in FAULTS], [], []
    long_rows = [r for r in alpaca + gsm if len(r["output"].split()) >= 60]
    for r in long_rows[:40]:  # near-twins: word edits keeping word-3-gram Jaccard >= 0.8
        twin = dict(r, output=_edit(r["output"], rng))
        j = jaccard(*(shingles(dedup_text("\n".join([x["instruction"], x["input"], x["output"]]))) for x in (r, twin)))
        if j >= 0.8:
            near.append((len(lines) + 1, r, j))
            lines.append(json.dumps(twin))
    for r in long_rows[40:60]:  # exact duplicates after normalisation (spacing differs)
        exact.append(len(lines) + 1)
        lines.append(json.dumps(dict(r, output="  " + r["output"] + " \u200b ")))
    (src / "c_planted.jsonl").write_text("\n".join(lines) + "\n")
    return {"root": root, "src": src, "near": near, "exact": exact}


def _cfg(src, seed=0, **kw):
    from pipelines.data.config import DataConfig

    return DataConfig(train_path=str(src), format="auto", max_length=1024, max_rejected_fraction=0.5,
                      filters={"min_answer_chars": 2, "max_repeated_ngram_ratio": 0.6, "max_symbol_ratio": 0.5},
                      split={"seed": seed}, **kw)


@pytest.fixture(scope="module")
def curated(ray_session, corpus, tiny_model_dir):
    from pipelines.data import curate

    out = curate.run(_cfg(corpus["src"]), corpus["root"] / "seed0", model_dir=tiny_model_dir)
    return {"out": out, "rejected": [json.loads(line) for f in (out / "rejected").glob("*.jsonl")
                                     for line in f.read_text().splitlines()]}


def test_counts_add_up_and_faults_have_their_reason(curated):
    r = json.loads((curated["out"] / "curation_report.json").read_text())
    assert r["rows_in"] == 2 * N_REAL + (r["rows_in"] - 2 * N_REAL) and r["rows_in"] > 2 * N_REAL + len(FAULTS)
    assert r["rows_in"] == r["rows_kept"] + r["rows_rejected"] == r["rows_kept"] + len(curated["rejected"])
    assert sum(r["rejected_by_reason"].values()) == r["rows_rejected"]
    assert sum(pq.read_table(curated["out"] / s).num_rows for s in ("train", "validation", "test")) == r["rows_kept"]
    planted = {x["line"]: x["reason"] for x in curated["rejected"] if x["source"].endswith("c_planted.jsonl")}
    assert {i + 1: planted.get(i + 1) for i in range(len(FAULTS))} == {i + 1: reason for i, (_, reason) in
                                                                       enumerate(FAULTS)}
    m = json.loads((curated["out"] / "manifest.json").read_text())
    assert m["kind"] == "curated_dataset" and m["content_hash"]["train"].startswith("sha256:")
    for f in ("curation_report.md", "length_histogram.png", "category_distribution.png"):
        assert (curated["out"] / f).stat().st_size > 200


def test_near_and_exact_duplicates_found(curated, corpus):
    by_line = {x["line"]: x for x in curated["rejected"] if x["source"].endswith("c_planted.jsonl")}
    assert len(corpus["near"]) >= 20
    found = sum(1 for line, _, _ in corpus["near"] if by_line.get(line, {}).get("reason") == "near_duplicate")
    assert found / len(corpus["near"]) >= 0.95
    assert all(by_line[line]["reason"] == "exact_duplicate" for line in corpus["exact"])
    flagged = [x for x in curated["rejected"] if x["reason"] == "near_duplicate"]
    assert flagged
    # precision: a flagged row is a near-twin of the kept row it was matched to (>= 0.7 allows a transitive
    # cluster member: A~B~C with J(A,C) a little under 0.8), checked on exact shingle sets
    texts = _all_texts(curated["out"], curated["rejected"])
    ok = sum(1 for x in flagged if x["dup_of"] in texts and jaccard(
        shingles(dedup_text(_text(json.loads(x["row"])))), shingles(texts[x["dup_of"]])) >= 0.7)
    assert ok / len(flagged) >= 0.95


def _text(rec) -> str:
    if "messages" in rec:
        return "\n".join(m["content"] for m in rec["messages"])
    return "\n".join([rec.get("instruction", ""), rec.get("input", ""), rec.get("output", "")])


def _all_texts(out: Path, rejected) -> dict[int, str]:
    texts = {}
    for s in ("train", "validation", "test"):
        for r in pq.read_table(out / s).to_pylist():
            texts[r["row_id"]] = dedup_text("\n".join(m["content"] for m in r["messages"]))
    return texts


def test_no_near_duplicate_pair_spans_train_and_test(curated):
    from datasketch import MinHash, MinHashLSH

    def rows(split):
        return [dedup_text("\n".join(m["content"] for m in r["messages"]))
                for r in pq.read_table(curated["out"] / split).to_pylist()]

    lsh = MinHashLSH(threshold=0.6, num_perm=128)
    train = rows("train")
    for i, t in enumerate(train):
        m = MinHash(num_perm=128)
        m.update_batch([s.encode() for s in shingles(t)])
        lsh.insert(str(i), m)
    for t in rows("test"):
        m = MinHash(num_perm=128)
        m.update_batch([s.encode() for s in shingles(t)])
        for k in lsh.query(m):
            assert jaccard(shingles(t), shingles(train[int(k)])) < 0.8


def test_same_seed_identical_bytes_other_seed_differs(curated, corpus, tiny_model_dir):
    """...and the same bytes whichever engine ran it: this small corpus ran in the driver (data.engine auto), the
    rerun runs on Ray Data tasks."""
    from pipelines.data import curate, local_pool
    from pipelines.data.engine import pick_engine

    assert json.loads((curated["out"] / "manifest.json").read_text())["engine"] == "local"
    # auto on this one-node cluster: local whatever the size (data.local_max_mib counts on multi-node clusters)
    big = _cfg(corpus["src"], local_max_mib=0)
    assert pick_engine(big, big.train_files()) == "local"
    assert pick_engine(_cfg(corpus["src"], engine="ray"), big.train_files()) == "ray"
    # one slice per input file, run by forked processes of the driver (one per CPU)
    report = json.loads((curated["out"] / "curation_report.json").read_text())
    assert report["phases"]["local_processes"] == min(local_pool.cpus(), 3), report["phases"]  # 3 input files
    again = curate.run(_cfg(corpus["src"], engine="ray"), corpus["root"] / "seed0b", model_dir=tiny_model_dir)
    assert json.loads((again / "manifest.json").read_text())["engine"] == "ray"
    other = curate.run(_cfg(corpus["src"], seed=1), corpus["root"] / "seed1", model_dir=tiny_model_dir)
    for s in ("train", "validation", "test"):
        a = sorted((curated["out"] / s).glob("*.parquet"))
        assert [f.read_bytes() for f in a] == [(again / s / f.name).read_bytes() for f in a]
    assert (curated["out"] / "train" / "part-00000.parquet").read_bytes() != (other / "train" / "part-00000.parquet"
                                                                              ).read_bytes()


# A tokenized dataset's manifest as commit 8a155db wrote it (before the data wing was split up).
MANIFEST_KEYS_8A155DB = [
    "code_version", "config", "content_hash", "created", "curated", "inputs", "kind", "metrics", "outputs",
    "packed"]
METRICS_8A155DB = [
    "curated_rows", "engine", "phase_seconds", "rejected_by_reason", "rows_in", "rows_kept", "rows_rejected",
    "rows_token_ids_reused", "split_rows", "tokens", "truncated"]


def test_tokenized_labels_only_on_assistant_tokens(ray_session, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from pipelines.data import tokenize as data

    demo = Path(__file__).resolve().parents[2] / "pipelines" / "demo" / "city_date.jsonl"
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(demo.read_text().splitlines()[:60]) + "\n")
    plain = data.run(_cfg(src), tiny_model_dir, tmp_path / "plain")
    m = json.loads((plain / "manifest.json").read_text())
    assert m["packed"] is False and m["metrics"]["rows_in"] == m["metrics"]["rows_kept"] + m["metrics"]["rows_rejected"]
    # the same manifest keys as before the data wing was untangled (commit 8a155db)
    assert sorted(m) == MANIFEST_KEYS_8A155DB and sorted(m["metrics"]) == METRICS_8A155DB
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = pq.read_table(plain / m["outputs"]["train"]).to_pylist()
    source = {json.loads(line)["output"] for line in src.read_text().splitlines()}
    for r in rows:
        learned = [t for t in r["labels"] if t != -100]
        assert learned[-1] == tok.eos_token_id or learned[-2] == tok.eos_token_id
        text = tok.decode(learned, skip_special_tokens=True).strip()
        assert text in source  # exactly the assistant's answer, nothing of the prompt
    assert all(len(r["input_ids"]) == len(r["labels"]) for r in rows)
    # the ids came from curation (encoded once, where rows were counted); a curated folder that does not say which
    # tokenizer its ids are from (or says another) is tokenized from its messages: the same rows either way
    assert m["metrics"]["rows_token_ids_reused"] == m["metrics"]["rows_kept"] > 0
    cm = json.loads((plain / "curated" / "manifest.json").read_text())
    assert set(cm["token_columns"]) == {"tokenizer_hash"}
    (plain / "curated" / "manifest.json").write_text(json.dumps({**cm, "token_columns": {"tokenizer_hash": "x"}}))
    again = data.tokenize(_cfg(src), plain / "curated", tiny_model_dir, tmp_path / "again")
    am = json.loads((again / "manifest.json").read_text())
    assert am["metrics"]["rows_token_ids_reused"] == 0 and am["metrics"]["rows_kept"] == m["metrics"]["rows_kept"]
    assert pq.read_table(again / m["outputs"]["train"]).to_pylist() == rows
    # the same tokens from Ray Data tasks (data.engine=ray), and packed (packing inside the tokenize pass)
    on_ray = data.run(_cfg(src, engine="ray"), tiny_model_dir, tmp_path / "ray")
    ray_rows = pq.read_table(on_ray / m["outputs"]["train"]).to_pylist()
    assert m["metrics"]["engine"] == "local" and json.loads((on_ray / "manifest.json").read_text())["metrics"][
        "engine"] == "ray"
    from pipelines.data import local_pool

    # every row carried ids that fit: written as they are, no tokenize pass; the one that re-tokenized ran a slice
    # per split in forked processes
    assert "carried_write" in m["metrics"]["phase_seconds"] and "local_processes" not in m["metrics"]
    assert am["metrics"]["local_processes"] == min(local_pool.cpus(), 3) and "tokenize" in am["metrics"][
        "phase_seconds"]
    assert sorted(map(str, ray_rows)) == sorted(map(str, rows))
    for engine in ("local", "ray"):
        packed = data.run(_cfg(src, engine=engine, packing={"enabled": True, "block_size": 256}), tiny_model_dir,
                          tmp_path / f"packed-{engine}")
        pm = json.loads((packed / "manifest.json").read_text())
        assert pm["packed"] and pm["metrics"]["rows_kept"] == m["metrics"]["rows_kept"]
        prow = pq.read_table(packed / pm["outputs"]["train"]).to_pylist()
        assert len(prow) < len(rows) and all(sum(r["seq_lens"]) == r["n_tokens"] == len(r["input_ids"]) <= 256
                                             for r in prow)
        assert sorted(t for r in prow for t in r["input_ids"]) == sorted(t for r in rows for t in r["input_ids"])


def test_self_instruct_seed_tasks_with_column_mapping_and_gzip(ray_session, tmp_path, tiny_model_dir, repo_data):
    """The self-instruct seed tasks (instruction + a list of instances), as distributed nobody here wrote them,
    gzipped: without data.columns every row is rejected naming the missing field; with `input`/`output` mapped
    to instances[0] they are curated, and the counts add up. The file (Apache-2.0) is in tests/data: never skips."""
    import gzip

    from pipelines.data import curate
    from pipelines.schema import DataError

    seed = repo_data / "sft" / "alpaca_seed_tasks.jsonl"
    rows = seed.read_text().splitlines()
    src = tmp_path / "seed_tasks.jsonl.gz"
    with gzip.open(src, "wt") as fh:
        fh.write("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="missing_field"):
        curate.run(_cfg(src), tmp_path / "unmapped", model_dir=tiny_model_dir)
    out = curate.run(_cfg(src, columns={"input": "instances[0].input", "output": "instances[0].output"}),
                     tmp_path / "mapped", model_dir=tiny_model_dir)
    r = json.loads((out / "curation_report.json").read_text())
    assert r["rows_in"] == len(rows) == r["rows_kept"] + r["rows_rejected"]
    assert r["rows_kept"] >= 0.8 * len(rows), r["rejected_by_reason"]
    kept = pq.read_table(out / "train").to_pylist()
    assert all([m["role"] for m in k["messages"]] == ["user", "assistant"] for k in kept)


def test_curate_cli_balances_by_category_and_mixes_at_the_declared_share(ray_session, shared_data, tiny_model_dir,
                                                                           tmp_path):
    """`loraforge curate` on a main file of real Alpaca (300) and GSM8K (90) rows tagged by a `source` column,
    capped at 120 rows per source, plus the real Dolly file mixed in at a 0.25 share: the capped source keeps
    exactly the cap and only it loses rows to the cap; the mixed rows are round(share / (1 - share) × main rows
    kept), fewer than Dolly offers (the quota binds); every input line is in exactly one split or in rejected/,
    and the manifest's and the report's counts add up to the rows read. Needs ../shared/data: the Alpaca
    (CC BY-NC 4.0) and Dolly (CC BY-SA 3.0) files may not be copied into the repository."""
    import yaml
    from typer.testing import CliRunner

    from cluster.cli import app

    cap, share = 120, 0.25
    alpaca = json.loads((shared_data / "sft" / "alpaca_5000.json").read_text())[:300]
    gsm = json.loads((shared_data / "sft" / "gsm8k_train_alpaca.json").read_text())[:90]
    mix = shared_data / "sft" / "dolly_151_alpaca.jsonl"
    main = tmp_path / "main.jsonl"
    main.write_text("".join(json.dumps({**r, "source": src}) + "\n"
                            for src, rows in (("alpaca", alpaca), ("gsm8k", gsm)) for r in rows))
    n_mix_in = len(mix.read_text().splitlines())
    config = tmp_path / "curate.yaml"
    config.write_text(yaml.safe_dump({
        "name": "mixed", "output_dir": str(tmp_path / "runs"), "model": {"name": tiny_model_dir},
        "data": {"train_path": str(main), "format": "alpaca", "max_length": 1024, "category_field": "source",
                 "balance": {"max_per_category": cap}, "mix": {"path": str(mix), "share": share},
                 "split": {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 0}}}))
    result = CliRunner().invoke(app, ["curate", str(config)])
    assert result.exit_code == 0, result.output[-3000:]
    out = Path(result.output.strip().splitlines()[-1])
    assert out == (tmp_path / "runs" / "mixed" / "curated").resolve(), result.output[-1000:]

    manifest = json.loads((out / "manifest.json").read_text())
    m, report = manifest["metrics"], json.loads((out / "curation_report.json").read_text())
    assert {k: report[k] for k in m} == m  # the report and the manifest tell the same counts
    kept = {s: pq.read_table(out / s, columns=["source", "line", "origin", "category"]).to_pylist()
            for s in ("train", "validation", "test")}
    rows = [r for split in kept.values() for r in split]
    rejected = [json.loads(line) for f in (out / "rejected").glob("*.jsonl") for line in f.read_text().splitlines()]

    # nothing lost silently: every input line is kept in one split or rejected with its reason, exactly once
    assert m["rows_in"] == len(alpaca) + len(gsm) + n_mix_in
    seen = sorted((Path(r["source"]).name, r["line"]) for r in rows + rejected)
    expected = sorted([("main.jsonl", i) for i in range(1, len(alpaca) + len(gsm) + 1)]
                      + [(mix.name, i) for i in range(1, n_mix_in + 1)])
    assert seen == expected, (len(seen), len(expected))
    assert m["rows_in"] == m["rows_kept"] + m["rows_rejected"] == len(rows) + len(rejected)
    assert m["rows_rejected"] == sum(m["rejected_by_reason"].values())
    assert m["rejected_by_reason"] == dict(Counter(r["reason"] for r in rejected))
    assert m["split_rows"] == {s: len(v) for s, v in kept.items()}
    assert m["kept_by_category"] == dict(Counter(r["category"] for r in rows))

    # balancing: the source over the cap keeps exactly the cap, the one under it loses no row to the cap
    by_cat = Counter(r["category"] for r in rows if r["origin"] == "main")
    capped = Counter("alpaca" if r["line"] <= len(alpaca) else "gsm8k"  # main.jsonl: alpaca lines, then gsm8k
                     for r in rejected if r["reason"] == "category_cap")
    assert by_cat["alpaca"] == cap and capped["alpaca"] == m["rejected_by_reason"]["category_cap"] > 0, (
        by_cat, capped)
    assert capped["gsm8k"] == 0 and 0 < by_cat["gsm8k"] < cap, (by_cat, capped)
    assert sum(by_cat.values()) + m["kept_from_mix"] == m["rows_kept"]

    # mixing: the mixed rows are the declared share of what is kept (within rounding), and the quota bound
    n_main, n_mixed = sum(by_cat.values()), sum(r["origin"] == "mix" for r in rows)
    assert n_mixed == m["kept_from_mix"] == round(share / (1 - share) * n_main), (n_mixed, n_main)
    assert abs(n_mixed / len(rows) - share) <= 0.5 / len(rows), n_mixed / len(rows)
    assert m["rejected_by_reason"]["mix_quota"] > 0
    assert all(r["category"] == mix.stem for r in rows if r["origin"] == "mix")  # no source column: the file name
    assert {Path(r["source"]).name for r in rejected if r["reason"] == "mix_quota"} == {mix.name}
