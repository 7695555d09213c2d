"""Deterministic Parquet writer of curated splits: rows arrive sorted by row id; files roll every N rows.

Kept rows are stored in structured columns for the next stage: `messages` (sft), `text` (raw text), or
`prompt` / `chosen` / `rejected` (preference), plus where each row came from. No Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.dedup import SPLITS

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
META = [("row_id", pa.int64()), ("source", pa.string()), ("line", pa.int64()), ("origin", pa.string()),
        ("category", pa.string()), ("n_tokens", pa.int64())]
BODY = {"sft": [("messages", MESSAGES)], "text": [("text", pa.string())],
        "preference": [("prompt", MESSAGES), ("chosen", pa.string()), ("rejected", pa.string())]}


ROW_GROUP = 2048  # rows per Parquet row group: the unit the tokenize pass slices its tasks by


def schema(kind: str) -> pa.Schema:
    return pa.schema(META + BODY[kind])


class SplitWriter:
    def __init__(self, out: Path, kind: str, rows_per_file: int):
        self.out, self.kind, self.rows_per_file = Path(out), kind, rows_per_file
        self.schema = schema(kind)
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.rows = {s: 0 for s in SPLITS}
        self.pending: dict[str, list[dict]] = {s: [] for s in SPLITS}
        for s in SPLITS:
            (self.out / s).mkdir(parents=True, exist_ok=True)

    def add_rows(self, rows: list[dict]) -> None:
        for s in SPLITS:
            mine = [r for r in rows if r["split"] == s]
            if mine:
                self._write(s, mine)

    def _write(self, split: str, rows: list[dict]) -> None:
        for r in rows:
            r.update(json.loads(r["record"]))
        self.pending[split] += rows
        while len(self.pending[split]) >= ROW_GROUP:
            self._flush(split, ROW_GROUP)

    def _flush(self, split: str, n: int) -> None:
        """Write the next n pending rows as one row group (a new file every rows_per_file rows), so the bytes
        depend only on the rows, not on how the scan happened to batch them."""
        rows, self.pending[split] = self.pending[split][:n], self.pending[split][n:]
        while rows:
            room = self.rows_per_file - self.rows[split] % self.rows_per_file
            head, rows = rows[:room], rows[room:]
            if self.rows[split] % self.rows_per_file == 0:
                if split in self.writers:
                    self.writers[split].close()
                name = self.out / split / f"part-{self.rows[split] // self.rows_per_file:05d}.parquet"
                self.writers[split] = pq.ParquetWriter(name, self.schema, compression="zstd")
            cols = {f.name: [r.get(f.name) for r in head] for f in self.schema}
            self.writers[split].write_table(pa.Table.from_pydict(cols, schema=self.schema), row_group_size=ROW_GROUP)
            self.rows[split] += len(head)

    def close(self) -> int:
        for s in SPLITS:
            if self.pending[s]:
                self._flush(s, len(self.pending[s]))
        for w in self.writers.values():
            w.close()
        for s in SPLITS:  # an empty split is still a readable Parquet folder
            if self.rows[s] == 0:
                pq.write_table(self.schema.empty_table(), self.out / s / "part-00000.parquet", compression="zstd")
        return sum(self.rows.values())
