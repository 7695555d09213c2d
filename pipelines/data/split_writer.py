"""Curation's write pass: the decisions joined onto the parsed rows, refused rows to `rejected/` (JSONL) and kept
rows to `train/ validation/ test/` by a deterministic Parquet writer (rows arrive sorted by row id; files roll
every N rows; the same rows give the same bytes).

Kept rows are stored in structured columns for the next stage: `messages` (sft), `text` (raw text), or
`prompt` / `chosen` / `rejected` (preference), plus where each row came from. No Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.decide import DECISION_REASONS, Decisions
from pipelines.data.dedup import SPLITS
from pipelines.data.engine import work_batches

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
META = [("row_id", pa.int64()), ("source", pa.string()), ("line", pa.int64()), ("origin", pa.string()),
        ("category", pa.string()), ("n_tokens", pa.int64())]
BODY = {"sft": [("messages", MESSAGES)], "text": [("text", pa.string())],
        "preference": [("prompt", MESSAGES), ("chosen", pa.string()), ("rejected", pa.string())],
        "unpaired": [("prompt", MESSAGES), ("completion", pa.string()), ("label", pa.bool_())]}


ROW_GROUP = 2048  # rows per Parquet row group: the unit the tokenize pass slices its tasks by
TOKENS = [("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("n_label_tokens", pa.int64())]


def schema(kind: str, tokens: bool = False) -> pa.Schema:
    """A curated split's columns; tokens: with the conversations' token ids and labels (curate_rows)."""
    return pa.schema(META + BODY[kind] + (TOKENS if tokens else []))


class SplitWriter:
    def __init__(self, out: Path, kind: str, rows_per_file: int, tokens: bool = False):
        self.out, self.kind, self.rows_per_file = Path(out), kind, rows_per_file
        self.schema = schema(kind, tokens)
        self.columns = [name for name, _ in TOKENS] if tokens else []  # given as Arrow arrays, not in the dicts
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.rows = {s: 0 for s in SPLITS}
        self.pending: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}
        self.n_pending = {s: 0 for s in SPLITS}
        for s in SPLITS:
            (self.out / s).mkdir(parents=True, exist_ok=True)

    def add_table(self, table: pa.Table | pa.RecordBatch, codes) -> None:
        """table: parsed rows (META columns, 'record': each row's body as JSON, and the token columns when this
        writer keeps them), in row-id order; codes: per row, the index of its split in SPLITS (or anything else:
        not written). Arrow throughout: the bodies are parsed by pyarrow's JSON reader, not row by row."""
        for i, s in enumerate(SPLITS):
            idx = np.flatnonzero(codes == i)
            if len(idx):
                self._write(s, table.take(pa.array(idx, pa.int64())))

    def _body(self, records: pa.Array | pa.ChunkedArray) -> pa.Table:
        """The body columns of BODY[kind] from the rows' JSON records (one object per row)."""
        import pyarrow.json as pj

        text = "\n".join(records.to_pylist()).encode()  # one JSON object per line (json.dumps escapes newlines)
        body = pa.schema(BODY[self.kind])
        out = pj.read_json(pa.BufferReader(text),
                           read_options=pj.ReadOptions(use_threads=False, block_size=len(text) + 1),
                           parse_options=pj.ParseOptions(explicit_schema=body, unexpected_field_behavior="ignore"))
        if len(out) != len(records):
            raise RuntimeError(f"{len(records)} curated records parsed into {len(out)} rows")
        return out.select(body.names).cast(body)

    def _write(self, split: str, rows: pa.Table | pa.RecordBatch) -> None:
        body = self._body(rows["record"])
        cols = {f.name: body[f.name] if f.name in body.column_names else rows[f.name] for f in self.schema}
        self.pending[split].append(pa.Table.from_pydict(cols, schema=self.schema))
        self.n_pending[split] += len(rows)
        while self.n_pending[split] >= ROW_GROUP:
            self._flush(split, ROW_GROUP)

    def _flush(self, split: str, n: int) -> None:
        """Write the next n pending rows as one row group (a new file every rows_per_file rows), so the bytes
        depend only on the rows, not on how the scan happened to batch them."""
        pending = pa.concat_tables(self.pending[split])
        rows, rest = pending.slice(0, n), pending.slice(n)
        self.pending[split], self.n_pending[split] = ([rest] if len(rest) else []), len(rest)
        while len(rows):
            room = self.rows_per_file - self.rows[split] % self.rows_per_file
            head, rows = rows.slice(0, room), rows.slice(room)
            if self.rows[split] % self.rows_per_file == 0:
                if split in self.writers:
                    self.writers[split].close()
                name = self.out / split / f"part-{self.rows[split] // self.rows_per_file:05d}.parquet"
                self.writers[split] = pq.ParquetWriter(name, self.schema, compression="zstd")
            self.writers[split].write_table(head.combine_chunks(), row_group_size=ROW_GROUP)
            self.rows[split] += len(head)

    def close(self) -> int:
        for s in SPLITS:
            if self.n_pending[s]:
                self._flush(s, self.n_pending[s])
        for w in self.writers.values():
            w.close()
        for s in SPLITS:  # an empty split is still a readable Parquet folder
            if self.rows[s] == 0:
                pq.write_table(self.schema.empty_table(), self.out / s / "part-00000.parquet", compression="zstd")
        return sum(self.rows.values())


_REJECTED = ["reason", "detail", "source", "line", "raw", "record"]
_NAMES = list(SPLITS) + DECISION_REASONS  # by code


def write_outputs(parsed: Path, out: Path, dec: Decisions, tokens: bool = False) -> tuple[int, int]:
    """Join the decisions onto the parsed rows in one streaming scan: refused rows → rejected/ (JSONL), kept rows
    → train/ validation/ test/ sorted by row id in deterministic files (same data + seed → identical bytes);
    tokens: with the token columns the parse pass computed. Kept rows stay Arrow (a row is turned into Python
    only to be written to rejected/). Returns (rows rejected, rows kept)."""
    writer = SplitWriter(out, dec.kind, rows_per_file=50_000, tokens=tokens)
    (out / "rejected").mkdir()
    n_rejected, last = 0, -1
    with open(out / "rejected" / "part-00000.jsonl", "w") as rej:
        for b in work_batches(parsed, ["row_id", "source", "line", "origin", "category", "kind", "reason", "detail",
                                       "raw", "record", "n_tokens"] + writer.columns):
            ids = b.column("row_id").to_numpy()
            if len(ids) and (ids[0] <= last or np.any(np.diff(ids) <= 0)):
                raise RuntimeError(f"{parsed}: rows are not in row-id order; the parse pass must preserve order")
            last = int(ids[-1]) if len(ids) else last
            codes, pos = _codes(b, ids, dec)
            bad = np.flatnonzero((codes < 0) | (codes >= len(SPLITS)))
            rows = b.select(_REJECTED).take(pa.array(bad, pa.int64()))
            for r, code, p in zip(rows.to_pylist(), codes[bad], pos[bad]):
                rej.write(_rejected_line(r, int(code), int(dec.dup_of[p]) if code >= len(SPLITS) else -1))
            n_rejected += len(bad)
            writer.add_table(b, codes)
    return n_rejected, writer.close()


def _codes(b: pa.RecordBatch, ids: np.ndarray, dec: Decisions) -> tuple[np.ndarray, np.ndarray]:
    """Per row of the batch: its decided code (-1: refused by the parse pass, or not decided) and its position
    in the decisions."""
    pos = np.searchsorted(dec.ids, ids).clip(0, max(len(dec.ids) - 1, 0))
    codes = np.full(len(ids), -1, dtype=np.int64)
    if len(dec.ids):
        ok = (b.column("reason").to_numpy(zero_copy_only=False) == "") & (dec.ids[pos] == ids)
        codes[ok] = dec.codes[pos[ok]]
    return codes, pos


def _rejected_line(r: dict, code: int, dup_of: int) -> str:
    reason = r["reason"] or _NAMES[code]
    return json.dumps({"reason": reason, "detail": r["detail"], "source": r["source"], "line": r["line"],
                       "row": r["raw"] or r["record"], "dup_of": dup_of}, ensure_ascii=False) + "\n"
