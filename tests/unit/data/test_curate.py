"""Curation's pure parts: normalisation, filters, dedup keys, LSH banding (vs datasketch), split, quotas."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.chat import drop_oldest_exchange
from pipelines.data.config import FilterSection
from pipelines.data.dedup import (
    assign_split,
    candidate_pairs,
    category_quotas,
    clusters,
    jaccard,
    optimal_bands,
    shingles,
    signatures,
)
from pipelines.data.filters import (
    dedup_text,
    exact_key,
    normalise_text,
    quality_reason,
    repeated_ngram_ratio,
    symbol_ratio,
)


def test_normalise_keeps_layout_and_nfc():
    assert normalise_text("  Cafe\u0301\r\n  indented   \n\n\n\nend\u200b  ") == "Café\n  indented\n\nend"
    assert exact_key("Hello,   WORLD!") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello there world")


def test_filters_have_reasons():
    t = FilterSection(max_chars=100, min_answer_chars=3, max_repeated_ngram_ratio=0.5, max_symbol_ratio=0.3)
    def sft(q: str, a: str) -> dict:
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    assert quality_reason("sft", sft("q", "fine answer"), t) == ""
    assert quality_reason("sft", sft("q" * 200, "fine"), t) == "too_long"
    assert quality_reason("sft", sft("q", "ok"), t) == "too_short_answer"
    assert quality_reason("sft", sft("say", "go " * 30), t) == "repeated_ngrams"
    assert quality_reason("sft", sft("q", "#$%^&*{}[]<>~ ab"), t) == "symbol_ratio"
    assert quality_reason("sft", sft("q", "fine"), t, n_tokens=600, max_tokens=512) == "too_long"
    assert repeated_ngram_ratio("a b c d e f g h i j k l") == 0.0 and symbol_ratio("") == 0.0


def test_lsh_banding_matches_datasketch():
    from datasketch import MinHash, MinHashLSH

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(400)]
    texts = [" ".join(rng.choice(words, 40)) for _ in range(60)]
    texts += [t.replace(t.split()[5], "zzz", 1) for t in texts[:20]]  # near-twins
    sig = signatures(texts, 64)
    b, r = optimal_bands(0.8, 64)
    ours = {tuple(p) for p in candidate_pairs(sig, b, r).tolist()}
    lsh = MinHashLSH(num_perm=64, params=(b, r))
    for i, s in enumerate(sig):
        lsh.insert(i, MinHash(num_perm=64, hashvalues=s, scheme="affine32"))
    theirs = {(min(i, j), max(i, j)) for i, s in enumerate(sig)
              for j in lsh.query(MinHash(num_perm=64, hashvalues=s, scheme="affine32")) if i != j}
    # twins have Jaccard ~0.85: a candidate with probability 1-(1-0.85^8)^8 ~ 0.92 each (8 bands x 8 rows)
    assert ours == theirs and len({(i, 60 + i) for i in range(20)} & ours) >= 16


def test_clusters_are_connected_components_rooted_at_first():
    assert clusters(5, [(1, 3), (3, 4)]).tolist() == [0, 1, 2, 1, 1]
    assert jaccard(shingles("a b c d"), shingles("a b c d")) == 1.0


def test_split_is_deterministic_and_seeded():
    keys = [exact_key(f"row {i}") for i in range(2000)]
    a = [assign_split(k, 0, (0.8, 0.1, 0.1)) for k in keys]
    assert a == [assign_split(k, 0, (0.8, 0.1, 0.1)) for k in keys]
    assert a != [assign_split(k, 1, (0.8, 0.1, 0.1)) for k in keys]
    share = np.bincount(a, minlength=3) / len(a)
    assert abs(share[0] - 0.8) < 0.04 and abs(share[2] - 0.1) < 0.03


def test_category_quotas():
    assert category_quotas({"a": 100, "b": 10}, cap=50, temperature=None) == {"a": 50, "b": 10}
    assert category_quotas({"a": 100, "b": 10}, cap=None, temperature=1.0) == {"a": 100, "b": 10}
    q = category_quotas({"a": 100, "b": 25}, cap=None, temperature=2.0)  # shares ∝ sqrt(n): 10:5
    assert q == {"a": 50, "b": 25}


def test_truncation_drops_oldest_exchange_never_the_answer():
    m = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
         {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
    assert drop_oldest_exchange(m) == [m[0], m[3], m[4]]
    assert drop_oldest_exchange([m[0], m[3], m[4]]) is None
    assert dedup_text("A  b") == "a b"


def test_engine_auto_without_a_cluster_or_for_small_inputs_is_local(tmp_path, monkeypatch):
    """data.engine auto: small local inputs and no Ray cluster → local; object-store inputs → ray; a forced engine
    stays as set. (On one node and on two: tests/integration/test_data.py and test_multinode.py.)"""
    import ray

    from pipelines.data.config import DataConfig
    from pipelines.data.engine import pick_engine

    src = tmp_path / "rows.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n' * 10)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert pick_engine(DataConfig(train_path=str(src)), [str(src)]) == "local"
    assert pick_engine(DataConfig(train_path=str(src), local_max_mib=0), [str(src)]) == "local"
    assert pick_engine(DataConfig(train_path=str(src)), ["s3://b/rows.jsonl"]) == "ray"
    assert pick_engine(DataConfig(train_path=str(src), engine="ray"), [str(src)]) == "ray"


def test_symbol_ratio_fast_ascii_path_equals_the_character_rule(repo_data):
    """symbol_ratio counts ASCII text with bytes.translate; the result is the per-character rule's, on every
    printable and control ASCII character and on 500 real GSM8K rows (math symbols; 48 of them not ASCII) and the
    175 self-instruct seed tasks, from tests/data (MIT, Apache-2.0: never skips)."""
    import json
    import string

    from pipelines.data.filters import symbol_ratio

    def rule(text: str) -> float:
        chars = [c for c in text if not c.isspace()]
        return sum(1 for c in chars if not c.isalnum() and c not in ".,;:!?'\"()-") / len(chars) if chars else 0.0

    texts = ["", "   \n\t", string.printable, "".join(map(chr, range(128))), "a_b#c$d", "x\x1cy\x0bz", "ünïcode ✓ ok"]
    texts += [" ".join(r.values()) for r in json.loads((repo_data / "sft" / "gsm8k_train_alpaca.json").read_text())]
    seeds = [json.loads(line) for line in (repo_data / "sft" / "alpaca_seed_tasks.jsonl").read_text().splitlines()]
    texts += [" ".join([s["instruction"], *(v for i in s["instances"] for v in i.values())]) for s in seeds]
    assert len(texts) > 600
    assert all(symbol_ratio(t) == rule(t) for t in texts)


def test_split_writer_parses_each_kind_body_and_carried_tokens_roll_files(tmp_path):
    """The split writer's Arrow path: a batch's JSON bodies (any kind, non-ASCII and newlines in the text) come
    back as the typed columns, only the rows coded for a split are written, in row order; carried token ids are
    written to tokens/ in files of at most rows_per_file rows, in curated order, with the counts summed."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data.split_writer import SplitWriter
    from pipelines.data.token_writer import TokenCounts, write_carried

    bodies = {"sft": {"messages": [{"role": "user", "content": "héllo\nthere"},
                                   {"role": "assistant", "content": "ok"}]},
              "text": {"text": "plain «text»"},
              "preference": {"prompt": [{"role": "user", "content": "q"}], "chosen": "yes", "rejected": "no"}}
    for kind, body in bodies.items():
        n = 7
        batch = pa.table({"row_id": list(range(n)), "source": ["f.jsonl"] * n, "line": list(range(1, n + 1)),
                          "origin": ["main"] * n, "category": ["c"] * n, "n_tokens": [5] * n,
                          "record": [json.dumps(body, ensure_ascii=False)] * n})
        w = SplitWriter(tmp_path / kind, kind, rows_per_file=50)
        w.add_table(batch, np.array([0, 1, 0, 9, 2, 0, -1]))  # 9, -1: not written (rejected elsewhere)
        assert w.close() == 5
        train = pq.read_table(tmp_path / kind / "train").to_pylist()
        assert [r["row_id"] for r in train] == [0, 2, 5]
        assert all({k: r[k] for k in body} == body for r in train)
    src = tmp_path / "carried" / "train"
    src.mkdir(parents=True)
    rows = [{"input_ids": [i, i + 1], "labels": [-100, i + 1], "n_tokens": 2} for i in range(7)]
    types = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                       ("n_tokens", pa.int64())])
    pq.write_table(pa.Table.from_pylist(rows[:4], schema=types), src / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:], schema=types), src / "part-00001.parquet")
    counts = write_carried([src], tmp_path / "out", rows_per_file=3, rows_per_group=2)
    files = sorted((tmp_path / "out" / "tokens" / "split=train").glob("*.parquet"))
    assert [f.name for f in files] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [3, 3, 1]
    out = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert out == rows and pq.read_schema(files[0]).field("input_ids").type == pa.list_(pa.int64())
    assert counts == TokenCounts(kept=7, reused=7, tokens=14, split={"train": 7})


def test_plot_process_draws_its_job_and_a_cancelled_one_exits(tmp_path):
    """report.start_plotter forks the plot process early; plot() gives it the job and wait_plots joins it (PNGs
    written); a started process that gets no job (the stage failed) exits cleanly on cancel_plotter; one that
    is not done within wait_plots' patience is stopped and the plots are drawn in this process."""
    from pipelines.data import report

    report.start_plotter()
    proc = report._PLOTTER[0]
    report.cancel_plotter()
    assert proc.exitcode == 0 and report._PLOTTER is None
    report.start_plotter()
    report.plot(tmp_path, np.array([10, 20, 20, 400]), 512, {"alpaca": 3, "dolly": 1})
    report.wait_plots()
    for name in report.PLOTS.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        (tmp_path / name).unlink()
    # one not done within the patience (here none: it is still importing matplotlib) is stopped; drawn here
    report.plot(tmp_path, np.array([10, 20]), 512, {"alpaca": 2})
    proc = report._PENDING[-1][0]
    report.wait_plots(patience_s=0)
    assert proc.exitcode is not None and not report._PENDING
    for name in report.PLOTS.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokenize_given_preference_rows_is_a_user_error_naming_the_folder(tmp_path):
    """Preference rows are the DPO stage's to tokenize: `loraforge tokenize` on them is a DataError (exit 2, no
    traceback) naming the curated manifest and what to run instead, raised before any tokenizer is loaded."""
    from pipelines.artifacts.manifest import write_manifest
    from pipelines.data import tokenize
    from pipelines.data.config import DataConfig
    from pipelines.schema import DataError

    write_manifest(tmp_path / "curated", kind="curated_dataset", inputs={}, config={},
                   extra={"data_kind": "preference"})
    with pytest.raises(DataError, match="preference pairs.*loraforge dpo") as e:
        tokenize.tokenize(DataConfig(), tmp_path / "curated", str(tmp_path / "no-model"), tmp_path / "out")
    assert str(tmp_path / "curated" / "manifest.json") in str(e.value)


def test_the_decide_pass_runs_on_parse_rows_output_without_ray(tmp_path):
    """ParseRows(job) → a work file → decide(): an exact duplicate (after normalisation) and a broken row are
    decided without Ray, the counts add up, and each kept row has a split."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data.config import DataConfig
    from pipelines.data.curate_rows import PARSED_SCHEMA, ParseJob, ParseRows
    from pipelines.data.decide import EXACT, check_accounting, decide

    cfg = DataConfig(train_path=str(tmp_path / "rows.jsonl"), max_rejected_fraction=1.0)
    rows = [json.dumps({"instruction": f"Question {i} about cities?", "output": f"Answer number {i} is here."})
            for i in range(6)]
    rows += [rows[2].replace("here.", "here.  "), '{"instruction": "broken"']
    job = ParseJob.of(cfg, ["alpaca"], 1, None)
    assert job.file_formats == {0: "alpaca"} and job.mix_fids == () and job.max_tokens == cfg.max_length
    batch = {"raw": rows, "error": [""] * len(rows), "row_id": list(range(len(rows))),
             "source": ["rows.jsonl"] * len(rows), "line": list(range(1, len(rows) + 1))}
    (tmp_path / "parsed").mkdir()
    pq.write_table(pa.Table.from_pydict(ParseRows(job)(batch), schema=PARSED_SCHEMA),
                   tmp_path / "parsed" / "part-000000-00000.parquet")
    dec = decide(tmp_path / "parsed", cfg)
    assert dec.kind == "sft" and list(dec.ids) == list(range(7))  # the broken row (7) was refused when parsed
    assert dec.codes[6] == EXACT and dec.dup_of[6] == 2 and all(0 <= c < 3 for c in dec.codes[:6])
    c = dec.counts
    assert (c["rows_in"], c["rows_kept"], c["rejected_by_reason"]) == (8, 6, {"broken_json": 1,
                                                                              "exact_duplicate": 1})
    check_accounting(c, 2, 6)
    with pytest.raises(RuntimeError, match="row accounting broke"):
        check_accounting(c, 1, 6)


def test_size_caps_refuse_a_row_before_it_is_parsed_or_tokenized(tmp_path):
    """data.max_row_chars and data.max_turns refuse a pathological row as too_long (before parsing it or running
    the chat template over it); the rows beside it are kept and the counts add up."""
    import json

    from pipelines.data.config import DataConfig
    from pipelines.data.curate_rows import ParseJob, ParseRows

    cfg = DataConfig(train_path=str(tmp_path / "rows.jsonl"), max_row_chars=2048, max_turns=4)
    many = [{"role": r, "content": "hi"} for _ in range(5) for r in ("user", "assistant")]
    rows = [json.dumps({"instruction": "Say hi", "output": "hi"}),
            json.dumps({"instruction": "x" * 5000, "output": "long"}),
            json.dumps({"messages": many}),
            json.dumps({"messages": many[:4]})]
    job = ParseJob.of(cfg, ["auto"], 1, None)
    out = ParseRows(job)({"raw": rows, "error": [""] * 4, "row_id": list(range(4)), "source": ["rows.jsonl"] * 4,
                          "line": [1, 2, 3, 4]})
    assert out["reason"] == ["", "too_long", "too_long", ""], out["detail"]
    assert "data.max_row_chars 2,048" in out["detail"][1] and "10 turns > data.max_turns 4" in out["detail"][2]
