"""Readers and row formats: paths (local, glob, s3://), file types with line numbers, every format → one form."""

from __future__ import annotations

import json

import pytest

from pipelines.data.readers import expand_paths, file_kind, iter_records, parse_location
from pipelines.data.rowformats import RowError, check_decodable, parse_raw, to_canonical
from pipelines.schema import DataError


def test_parse_location_local_glob_and_s3():
    assert parse_location("s3://bucket/dir/*.jsonl") == parse_location("S3://bucket/dir/*.jsonl")
    loc = parse_location("s3://bucket/dir/*.jsonl")
    assert (loc.scheme, loc.path, loc.pattern, loc.uri) == ("s3", "bucket/dir", "*.jsonl", "s3://bucket/dir")
    assert parse_location("s3://bucket/a/b.parquet").pattern == ""
    assert parse_location("data/x.json") == parse_location("data/x.json")
    assert parse_location("data/*.csv").scheme == ""
    with pytest.raises(DataError, match="last path component"):  # a user error: exit 2, no traceback
        parse_location("s3://bucket/*/x.jsonl")
    with pytest.raises(DataError, match="no bucket"):
        parse_location("s3://")
    with pytest.raises(DataError, match="unknown file type; give a file ending in one of .jsonl"):
        file_kind("notes.txt")


def test_expand_file_folder_glob(tmp_path):
    for name in ("a.jsonl", "b.json", "c.csv", "notes.txt"):
        (tmp_path / name).write_text("{}\n")
    assert [p.split("/")[-1] for p in expand_paths(str(tmp_path))] == ["a.jsonl", "b.json", "c.csv"]
    assert [p.split("/")[-1] for p in expand_paths(str(tmp_path / "*.json*"))] == ["a.jsonl", "b.json"]
    assert expand_paths(str(tmp_path / "a.jsonl")) == [str(tmp_path / "a.jsonl")]
    with pytest.raises(FileNotFoundError):
        expand_paths(str(tmp_path / "*.parquet"))


def test_jsonl_lines_and_undecodable(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"a": 1}\n\n{"b": "\xff\xfe"}\n{"c": 3}\n')
    recs = list(iter_records(str(p)))
    assert [r.line for r in recs] == [1, 3, 4]
    assert recs[1].raw is None and recs[1].error.startswith("undecodable")


def test_json_array_line_numbers_and_broken_tail(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('[\n  {"a": 1},\n  {"b": [1,\n 2]},\n  {"c": 3}\n]')
    assert [(r.line, json.loads(r.raw)) for r in iter_records(str(p))] == [(2, {"a": 1}), (3, {"b": [1, 2]}),
                                                                           (5, {"c": 3})]
    p.write_text('[{"a": 1}, {"b": oops}]')
    recs = list(iter_records(str(p)))
    assert len(recs) == 2 and recs[1].error.startswith("broken_json")


def test_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "x.csv").write_text('instruction,output\nhi,"multi\nline"\nyo,ok\n')
    recs = list(iter_records(str(tmp_path / "x.csv")))
    assert [json.loads(r.raw)["instruction"] for r in recs] == ["hi", "yo"] and recs[0].line == 3
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["x", "y"]}), tmp_path / "x.parquet")
    assert [json.loads(r.raw) for r in iter_records(str(tmp_path / "x.parquet"))][1] == {"instruction": "b",
                                                                                       "output": "y"}


@pytest.mark.parametrize("row,kind,check", [
    ({"instruction": "Add", "input": "1 2", "output": "3"}, "sft", lambda r: r["messages"][1]["content"] == "3"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "sft",
     lambda r: [m["role"] for m in r["messages"]] == ["user", "assistant"]),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "sft",
     lambda r: r["messages"][1] == {"role": "assistant", "content": "yo"}),
    ({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, "preference",
     lambda r: r == {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "good", "rejected": "bad"}),
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A1"},
                 {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "good"}],
      "rejected": [{"role": "user", "content": "Q "}, {"role": "assistant", "content": "A1"},
                   {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "bad"}]}, "preference",
     lambda r: len(r["prompt"]) == 3 and (r["chosen"], r["rejected"]) == ("good", "bad")),
    ({"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "\n\nHuman: Q\n\nAssistant: bad"}, "preference",
     lambda r: r["prompt"] == [{"role": "user", "content": "Q"}] and r["rejected"] == "bad"),
    ({"text": "plain words"}, "text", lambda r: r == {"text": "plain words"}),
    ({"prompt": "Q?", "completion": "A."}, "sft",  # TRL prompt-completion, standard
     lambda r: r["messages"] == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]),
    ({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],  # conversational
      "completion": [{"role": "assistant", "content": "A."}]}, "sft",
     lambda r: [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]),
])
def test_formats_detected_and_normalised(row, kind, check):
    k, rec = to_canonical(row, "auto")
    assert k == kind and check(rec)


@pytest.mark.parametrize("raw,reason", [
    ('{"instruction": "x"', "broken_json"), ("[1, 2]", "not_an_object"), ('{"foo": 1}', "missing_field"),
    ('{"messages": "hi"}', "wrong_type"), ('{"messages": [{"role": "user", "content": " "}]}', "empty_turn"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "missing_field"),
    ('{"messages": [{"role": "alien", "content": "q"}]}', "wrong_type"),
    ('{"prompt": "q", "chosen": 3, "rejected": "b"}', "wrong_type"),
    ('{"prompt": "q", "completion": "a", "label": "maybe"}', "wrong_type"),  # unpaired (KTO): a label it can't read
    ('{"prompt": "q"}', "unsupported_format"),  # prompt-only: nothing to learn
    ('{"prompt": "q", "completion": [{"role": "user", "content": "a"}]}', "wrong_type"),
])
def test_bad_rows_have_reasons(raw, reason):
    with pytest.raises(RowError) as e:
        to_canonical(parse_raw(raw), "auto")
    assert e.value.reason == reason


def test_undecodable_text():
    with pytest.raises(RowError, match="undecodable"):
        check_decodable({"text": json.loads('"bad \\ud800 surrogate"')})
    with pytest.raises(RowError, match="undecodable"):
        check_decodable({"text": "mojibake \ufffd"})
    check_decodable({"text": "fine ünïcode"})


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json.gz", ".jsonl.zst", ".csv.bz2"])
def test_compressed_files_are_streamed_with_their_line_numbers(tmp_path, suffix):
    import pyarrow as pa

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    if suffix.startswith(".jsonl"):
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif suffix.startswith(".json"):
        text = "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n"
    else:
        text = "instruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n" for r in rows)
    path = tmp_path / f"rows{suffix}"
    codec = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}[path.suffix]
    with pa.output_stream(str(path), compression=codec) as out:
        out.write(text.encode())
    assert expand_paths(str(tmp_path)) == [str(path)]
    recs = list(iter_records(str(path)))
    assert [json.loads(r.raw) for r in recs] == rows
    assert [r.line for r in recs] == ([1, 2, 3] if suffix.startswith(".jsonl") else
                                      [2, 3, 4])


def test_alpaca_default_on_another_format_says_which_format_to_set():
    with pytest.raises(RowError, match=r"looks like format 'prompt_completion': set data.format=auto"):
        to_canonical({"prompt": "q", "completion": "a"}, "alpaca")
    with pytest.raises(RowError, match=r"looks like format 'dialogue'"):
        to_canonical({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "alpaca")
    with pytest.raises(RowError) as e:
        to_canonical({"foo": 1}, "alpaca")
    assert "looks like" not in str(e.value)


def test_columns_map_a_files_fields_to_our_roles():
    from pipelines.data.rowformats import apply_columns

    dolly = {"prompt": "Below is an instruction.\n\nName a city.", "answer": "Oslo", "category": "qa"}
    k, rec = to_canonical(apply_columns(dolly, {"completion": "answer"}), "auto")
    assert k == "sft" and rec["messages"][-1] == {"role": "assistant", "content": "Oslo"}
    self_instruct = {"instruction": "Add the numbers.", "instances": [{"input": "2 3", "output": "5"}]}
    mapped = apply_columns(self_instruct, {"input": "instances[0].input", "output": "instances[0].output"})
    k, rec = to_canonical(mapped, "alpaca")
    assert rec["messages"] == [{"role": "user", "content": "Add the numbers.\n\n2 3"},
                               {"role": "assistant", "content": "5"}]
    with pytest.raises(RowError, match=r"data.columns.output: 'instances\[1\].output' is not in the row") as e:
        apply_columns(self_instruct, {"output": "instances[1].output"})
    assert e.value.reason == "missing_field"


def test_columns_are_validated_with_the_config():
    from pipelines.data.config import DataConfig

    assert DataConfig(columns={"prompt": "q.text", "completion": "a[0]"}).columns == {"prompt": "q.text",
                                                                                       "completion": "a[0]"}
    with pytest.raises(ValueError, match="unknown role 'answer'"):
        DataConfig(columns={"answer": "x"})
    with pytest.raises(ValueError, match="is not a field path"):
        DataConfig(columns={"prompt": "a..b"})


def test_a_hugging_face_save_to_disk_folder_is_read(tmp_path):
    """`datasets.Dataset.save_to_disk` writes Arrow IPC shards next to its JSON metadata: the folder is data."""
    from datasets import Dataset

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    files = expand_paths(str(tmp_path / "hf"))
    assert len(files) == 1 and files[0].endswith(".arrow")  # state.json / dataset_info.json are not rows
    assert [json.loads(r.raw) for r in iter_records(files[0])] == rows
    assert to_canonical(json.loads(next(iter_records(files[0])).raw), "auto")[0] == "sft"


def test_format_hint_names_the_fields_and_a_columns_line():
    from pipelines.data.rowformats import format_hint

    hint = format_hint([{"question": "q", "answer": "a", "id": 1}], "alpaca", {})
    assert "fields seen ['answer', 'id', 'question']" in hint and "alpaca only" in hint
    assert "`data.columns: {prompt: question, completion: answer}`" in hint
    assert "prompt + completion" in format_hint([{"foo": 1}], "auto", {})
    assert "<question field>" in format_hint([{"foo": 1}], "auto", {})


def test_jsonl_slices_read_every_line_once_with_its_number(tmp_path):
    from pipelines.data.readers import jsonl_ranges

    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"a": 1}\n\n{"b": 2}\r\n\xff\xfe\n' + b"".join(b'{"n": %d}\n' % i for i in range(200))
                  + b'{"last": true}')
    whole = [(r.line, r.raw, r.error) for r in iter_records(str(f))]
    for target in (7, 100, 10_000):
        ranges = jsonl_ranges(str(f), target)
        assert [(r.line, r.raw, r.error) for rg in ranges for r in iter_records(str(f), rg)] == whole
    assert len(jsonl_ranges(str(f), 100)) > 5 and whole[-1][1] == '{"last": true}' and whole[2][2]


def test_auto_format_is_decided_once_per_file_and_reported(tmp_path):
    """Curation without Ray (small input: data.engine auto runs in this process). An odd row in a
    prompt/completion file is refused for its shape, not read as another format; the report names each
    file's format."""
    from pipelines.data import curate
    from pipelines.data.config import DataConfig

    pc = tmp_path / "pc.jsonl"
    rows = [{"prompt": f"Question number {i}?", "completion": f"The answer is number {i}."} for i in range(30)]
    pc.write_text("\n".join(json.dumps(r) for r in rows + [{"instruction": "odd row", "output": "an alpaca row"}]))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"},
                                                       {"role": "assistant", "content": f"Hello there {i}!"}]})
                              for i in range(20)))
    out = curate.run(DataConfig(train_path=str(tmp_path / "*.jsonl"), max_rejected_fraction=0.5), tmp_path / "out")
    r = json.loads((out / "curation_report.json").read_text())
    assert r["formats"] == {str(chat): "messages", str(pc): "prompt_completion"} and r["phases"]["engine"] == "local"
    rejected = [json.loads(x) for x in (out / "rejected" / "part-00000.jsonl").read_text().splitlines()]
    assert [(x["line"], x["reason"]) for x in rejected if x["source"] == str(pc)] == [(31, "missing_field")]
    assert r["rows_in"] == 51 == r["rows_kept"] + r["rows_rejected"]
    assert "prompt_completion" in (out / "curation_report.md").read_text()


def test_a_file_no_format_fits_stops_before_any_row_is_processed(tmp_path):
    from pipelines.data import curate
    from pipelines.data.config import DataConfig

    f = tmp_path / "qa.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(50)))
    with pytest.raises(DataError) as e:
        curate.run(DataConfig(train_path=str(f)), tmp_path / "out")
    msg = str(e.value)
    assert str(f) in msg and "['answer', 'question']" in msg
    assert "data.columns: {prompt: question, completion: answer}" in msg
    assert not (tmp_path / "out" / "_work").exists()  # stopped before the parse pass
    kto = tmp_path / "kto.jsonl"  # unpaired feedback (KTO) is a format now: curated, not stopped
    kto.write_text("\n".join(json.dumps({"prompt": "p", "completion": "c", "label": True}) for _ in range(5)))
    assert curate.file_formats([str(kto)], DataConfig(train_path=str(kto)))[str(kto)] == "unpaired"


def test_a_hugging_face_dataset_is_read_through_datasets(tmp_path):
    """data.hf_dataset: what `datasets.load_dataset` returns for a name (here a local folder: no downloads in
    tests; a hub id goes the same way) is curated from its cached Arrow files."""
    from pipelines.data import curate
    from pipelines.data.config import DataConfig
    from pipelines.data.readers import _hub_spec

    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"{i} plus {i} is {2 * i}."} for i in range(40)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = curate.run(DataConfig(hf_dataset=str(folder)), tmp_path / "out")
    r = json.loads((out / "curation_report.json").read_text())
    assert r["rows_in"] == 40 == r["rows_kept"] + r["rows_rejected"] and r["rows_kept"] >= 38
    assert [f.endswith(".arrow") for f in r["formats"]] == [True] and set(r["formats"].values()) == {
        "prompt_completion"}
    assert _hub_spec("hf://datasets/tatsu-lab/alpaca") == ("tatsu-lab/alpaca", "train")
    assert _hub_spec("hf://datasets/openai/gsm8k:test") == ("openai/gsm8k", "test")
    assert _hub_spec("hf://datasets/owner/repo/data/file.jsonl") is None  # a file in a repo: fsspec
    with pytest.raises(ValueError, match="not both"):
        DataConfig(hf_dataset="a/b", train_path="x.jsonl")


def test_a_one_line_json_array_gives_every_element_its_own_row_id(tmp_path):
    """The shared Alpaca file is one line: `[{...}, {...}, ...]`. Its elements all start on line 1, so the row id
    (file id << 32 | position) takes the element's number; the curation of such a file keeps every row."""
    from pipelines.data.readers import record_batches

    p = tmp_path / "one_line.json"
    p.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]) + "\n")
    (b,) = record_batches([str(p)], [3])
    assert b["line"] == [1] * 5
    assert b["row_id"] == [(3 << 32) | i for i in range(1, 6)]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "q", "output": "a"}, {"instruction": oops}]')
    (b,) = record_batches([str(broken)], [0])
    assert b["row_id"] == [1, 2] and b["error"][1].startswith("broken_json")


def _alpaca(i: int) -> dict:
    return {"instruction": f"Say {i}", "output": f"ok {i}"}


def _read(path) -> list:
    from pipelines.data.readers import iter_records

    return list(iter_records(str(path)))


def test_a_latin1_byte_refuses_its_csv_row_only(tmp_path):
    """600 rows, one Latin-1 byte on line 501: every row is read; that one is refused (it once stopped reading,
    leaving 134 rows unread without a word)."""
    lines = ["instruction,output"] + [f"Say {i},ok {i}" for i in range(600)]
    body = "\n".join(lines).encode()
    at = body.index(b"Say 499,")
    path = tmp_path / "rows.csv"
    path.write_bytes(body[:at] + b"Caf\xe9 " + body[at:] + b"\n")
    recs = _read(path)
    assert len(recs) == 600
    bad = [r for r in recs if r.error]
    assert [(r.line, r.error.split(":")[0]) for r in bad] == [(501, "undecodable")]


def test_a_bom_a_huge_cell_and_hostile_json_are_rows_refused_not_stage_failures(tmp_path):
    from pipelines.data.rowformats import RowError, parse_raw

    bom = tmp_path / "bom.csv"  # the BOM once became part of the first field's name
    bom.write_bytes(b"\xef\xbb\xbfinstruction,output\nSay hi,hello\n")
    assert json.loads(_read(bom)[0].raw) == {"instruction": "Say hi", "output": "hello"}
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(_alpaca(0)).encode() + b"\n")
    assert json.loads(_read(jsonl)[0].raw) == _alpaca(0)

    big = tmp_path / "big.csv"  # a cell over Python's 128 KiB csv limit once raised _csv.Error for the file
    big.write_text("instruction,output\nSay 1,ok\n\"" + "x" * (200 << 10) + "\",ok\nSay 3,ok\n")
    recs = _read(big)
    assert [r.error for r in recs] == ["", "", ""] and len(json.loads(recs[1].raw)["instruction"]) == 200 << 10
    from pipelines.data import readers

    huge = tmp_path / "huge.csv"
    huge.write_text("instruction,output\nSay 1,ok\n\"" + "x" * (readers.MAX_CELL_BYTES + 10) + "\",ok\nSay 3,ok\n")
    recs = _read(huge)
    assert [r.error.split(":")[0] for r in recs] == ["", "too_long", ""], [r.error[:80] for r in recs]

    for raw, why in (("[" * 100_000 + "]" * 100_000, "nested too deep"), ('{"a": ' + "9" * 5000 + "}", "4300")):
        with pytest.raises(RowError, match=why) as e:
            parse_raw(raw)
        assert e.value.reason == "broken_json"


def test_damaged_files_are_one_error_naming_them_or_rows_then_where_reading_stopped(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data.readers import iter_records
    from pipelines.schema import DataError

    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"instruction": [f"Say {i}" for i in range(50)], "output": ["ok"] * 50}), parquet)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(parquet.read_bytes()[:-40])  # a partial copy: the footer is gone
    with pytest.raises(DataError, match=r"cut\.parquet: cannot be read as parquet"):
        list(iter_records(str(cut)))
    fake = tmp_path / "rows.jsonl.gz"
    fake.write_text(json.dumps(_alpaca(0)) + "\n")  # not gzip at all
    with pytest.raises(DataError, match=r"rows\.jsonl\.gz: cannot be read as jsonl \(gzip\)"):
        list(iter_records(str(fake)))
    truncated = tmp_path / "cut.jsonl.gz"  # a gzip cut short: the rows before the damage, then where it stopped
    whole = gzip.compress("".join(json.dumps(_alpaca(i)) + "\n" for i in range(3000)).encode())
    truncated.write_bytes(whole[: len(whole) // 2])
    recs = list(iter_records(str(truncated)))
    assert recs[-1].raw is None and recs[-1].error.startswith(f"unreadable: reading stopped after line {len(recs) - 1}")
    assert len(recs) > 100 and not any(r.error for r in recs[:-1])
