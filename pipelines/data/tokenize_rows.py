"""Per-slice work of the tokenize pass: a slice (file, row groups) of a curated split → token ids, assistant-only
labels and refusals, packed when data.packing is on. Run as a Ray Data task or in the local engine's processes.

Pure enough to unit-test without Ray: `TokenizeRows(job)(rows, body, split)` is a plain function of row dicts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from pipelines.data.chat import load_tokenizer, tokenize_records
from pipelines.data.config import DataConfig
from pipelines.data.engine import cached
from pipelines.data.packing import pack_rows
from pipelines.data.rowformats import RowError
from pipelines.data.split_writer import TOKENS

TOKEN_COLUMNS = tuple(name for name, _ in TOKENS)
INTS = pa.list_(pa.int64())
_TYPES = {"input_ids": INTS, "labels": INTS, "seq_lens": INTS, "n_tokens": pa.int64(), "truncated": pa.int64(),
          "line": pa.int64(), "n_rows": pa.int64(), "reused": pa.int64()}
_COLUMNS = ("input_ids", "labels", "n_tokens", "truncated", "reason", "detail", "reused", "row", "source", "line",
            "split", "n_rows")


def pass_schema(packed: bool) -> pa.Schema:
    """The tokenize pass's work-file columns (what token_writer reads back)."""
    return pa.schema([(k, _TYPES.get(k, pa.string())) for k in _COLUMNS + (("seq_lens",) if packed else ())])


@dataclass(frozen=True)
class TokenizeJob:
    """What every tokenize task is given: the tokenizer's folder, the data section, and whether the token ids
    the curated splits carry are from this tokenizer (then taken where they fit, not encoded again)."""

    model_dir: str
    cfg: DataConfig
    reuse: bool = False


class TokenizeRows:
    """Curated rows → tokens; one instance per worker process (the tokenizer is loaded once)."""

    def __init__(self, job: TokenizeJob):
        self.tokenizer = load_tokenizer(job.model_dir)
        self.cfg = job.cfg

    def __call__(self, rows: list[dict[str, Any]], body: str, split: str) -> dict[str, Any]:
        """Rows that carry their token ids from curation (input_ids/labels columns: same tokenizer) and fit are
        taken as they are; the others (none carried, too long, nothing to learn) are tokenized here."""
        recs = [r[body] for r in rows]
        ready = [r.get("n_label_tokens", -1) > 0 and len(r["input_ids"]) <= self.cfg.max_length for r in rows]
        rest = [i for i, ok in enumerate(ready) if not ok]
        results: list = [(r["input_ids"], r["labels"], 0) if ok else None for r, ok in zip(rows, ready)]
        for i, res in zip(rest, tokenize_records(self.tokenizer, body, [recs[i] for i in rest], self.cfg.max_length,
                                                 self.cfg.truncation)):
            results[i] = res
        out: dict[str, list] = {"input_ids": [], "labels": [], "n_tokens": [], "truncated": [], "reason": [],
                                "detail": [], "reused": [int(ok) for ok in ready]}
        for res in results:
            ids, labels, cut = ([], [], 0) if isinstance(res, RowError) else res
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["n_tokens"].append(len(ids))
            out["truncated"].append(cut)
            out["reason"].append(res.reason if isinstance(res, RowError) else "")
            out["detail"].append(res.detail if isinstance(res, RowError) else "")
        out["row"] = [json.dumps(rec) if r else "" for rec, r in zip(recs, out["reason"])]
        out["source"] = [r["source"] for r in rows]
        out["line"] = [r["line"] for r in rows]
        out["split"] = [split] * len(rows)
        return out


def tokenize_slices(batch: dict[str, Any], job: TokenizeJob) -> Iterator[pa.Table]:
    """Ray Data task UDF: each input row names a slice (file, row groups) of a curated split; the slice is read
    with pyarrow and tokenized in one batched call (job.reuse: the token ids curation stored are taken where they
    fit), then packed when data.packing is on. Yields Arrow tables of pass_schema."""
    import pyarrow.parquet as pq

    cfg = job.cfg
    tok = cached(TokenizeRows, job)
    for path, split, first, last in zip(batch["path"], batch["split"], batch["first"], batch["last"]):
        pf = pq.ParquetFile(str(path))
        body = "messages" if "messages" in pf.schema_arrow.names else "text"
        carried = job.reuse and "input_ids" in pf.schema_arrow.names
        tab = pf.read_row_groups(list(range(int(first), int(last))),
                                 columns=[body, "source", "line"] + (list(TOKEN_COLUMNS) if carried else []))
        if carried and not cfg.packing.enabled:
            yield _carried(tab, tok, body, str(split), cfg)
            continue
        out = tok(tab.to_pylist(), body, str(split))
        out = _packed(out, cfg) if cfg.packing.enabled else {**out, "n_rows": [0 if r else 1 for r in out["reason"]]}
        yield pa.Table.from_pydict(out, schema=pass_schema(cfg.packing.enabled))


def _carried(tab: pa.Table, tok: TokenizeRows, body: str, split: str, cfg: DataConfig) -> pa.Table:
    """A slice whose rows carry their token ids: the ones that fit pass through as Arrow columns (no Python ints),
    the others are tokenized (TokenizeRows); rows stay in the slice's order."""
    import pyarrow.compute as pc

    fits = pc.and_(pc.greater(tab["n_label_tokens"], 0),
                   pc.less_equal(pc.list_value_length(tab["input_ids"]), cfg.max_length))
    mask = pc.fill_null(fits, False).to_numpy(zero_copy_only=False)
    idx = np.arange(len(tab))
    ok, n = tab.take(idx[mask]), int(mask.sum())
    zeros, ones, blank = pa.array([0] * n, pa.int64()), pa.array([1] * n, pa.int64()), pa.array([""] * n)
    ready = pa.Table.from_pydict(
        {"input_ids": ok["input_ids"].cast(INTS), "labels": ok["labels"].cast(INTS),
         "n_tokens": pc.list_value_length(ok["input_ids"]).cast(pa.int64()), "truncated": zeros, "reason": blank,
         "detail": blank, "reused": ones, "row": blank, "source": ok["source"], "line": ok["line"],
         "split": pa.array([split] * n), "n_rows": ones}, schema=pass_schema(False))
    out = tok(tab.take(idx[~mask]).select([body, "source", "line"]).to_pylist(), body, split)
    rest = pa.Table.from_pydict({**out, "n_rows": [0 if r else 1 for r in out["reason"]]}, schema=pass_schema(False))
    order = np.argsort(np.concatenate([idx[mask], idx[~mask]]), kind="stable")
    return pa.concat_tables([ready, rest]).take(order)


def _packed(out: dict[str, list], cfg: DataConfig) -> dict[str, list]:
    """The slice's kept rows packed (first-fit decreasing, cfg.packing.window rows at a time), its refused rows
    as they are. n_rows: original rows in a row (0 for a refusal); a window's truncation count rides on its
    first packed row, so the sums the driver takes stay right."""
    kept = [i for i, r in enumerate(out["reason"]) if not r]
    res = {k: [v[i] for i in range(len(v)) if out["reason"][i]] for k, v in out.items()}
    res["seq_lens"] = [[] for _ in res["reason"]]
    res["n_rows"] = [0] * len(res["reason"])
    capacity = cfg.packing.block_size or cfg.max_length
    for w in range(0, len(kept), cfg.packing.window):
        win = kept[w:w + cfg.packing.window]
        packed = pack_rows({"input_ids": [out["input_ids"][i] for i in win],
                            "labels": [out["labels"][i] for i in win]}, capacity)
        for j, (ids, labels, lens, n) in enumerate(zip(packed["input_ids"], packed["labels"], packed["seq_lens"],
                                                       packed["n_tokens"])):
            for k, v in (("input_ids", ids), ("labels", labels), ("seq_lens", lens), ("n_tokens", n),
                         ("n_rows", len(lens)), ("truncated", sum(out["truncated"][i] for i in win) if j == 0 else 0),
                         ("reused", sum(out["reused"][i] for i in win) if j == 0 else 0),
                         ("reason", ""), ("detail", ""), ("row", ""), ("source", ""), ("line", 0),
                         ("split", out["split"][0])):
                res[k].append(v)
    return res


def slices(srcs: list[Path], rows_per_slice: int = 2048) -> list[dict[str, Any]]:
    """The tokenize tasks: (file, row-group range) slices of about rows_per_slice rows over the curated split
    folders, each read by its task with pyarrow."""
    import pyarrow.parquet as pq

    items = []
    for src in srcs:
        for f in sorted(src.glob("*.parquet")):
            md = pq.ParquetFile(str(f)).metadata
            first, rows = 0, 0
            for g in range(md.num_row_groups):
                rows += md.row_group(g).num_rows
                if rows >= rows_per_slice or g == md.num_row_groups - 1:
                    if rows:
                        items.append({"path": str(f), "split": src.name, "first": first, "last": g + 1})
                    first, rows = g + 1, 0
    return items
