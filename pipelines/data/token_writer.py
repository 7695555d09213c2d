"""The one writer of a tokenized dataset's `tokens/split=<name>/` (Parquet: input_ids, labels, n_tokens, and
seq_lens when packed; part-<i> files of up to 50,000 rows, rows in curated order): `write_tokens`, from either
source. No Ray.

- carried: every curated row carries token ids from this tokenizer that fit (carried_fit): the curated splits'
  token columns are copied by one streaming read-cast-write; nothing is tokenized, packed or refused;
- the tokenize pass's work files (packed or not): refused rows go to `rejected/tokenize.jsonl` and are counted,
  kept rows are written by one scan-filter-write.

A split with no row still gets one empty, readable Parquet file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pipelines.data.dedup import SPLITS
from pipelines.data.engine import Clock
from pipelines.data.tokenize_rows import INTS

ROWS_PER_FILE, ROWS_PER_GROUP = 50_000, 10_000
_REJECTED = ["reason", "detail", "source", "line", "row"]  # a tokenize refusal's line in rejected/


@dataclass
class TokenCounts:
    """What was written: rows kept (original rows, also when packed) and refused, by reason and by split; tokens
    and truncations summed over the kept rows; rows whose token ids curation computed (reused)."""

    kept: int = 0
    rejected: int = 0
    tokens: int = 0
    truncated: int = 0
    reused: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    split: dict[str, int] = field(default_factory=dict)


def write_tokens(out: Path, clock: Clock, *, carried: list[Path] | None = None, work: Path | None = None,
                 packed: bool = False) -> TokenCounts:
    """out/tokens/split=<name>/ from the curated split folders `carried` (every row's ids taken as they are), or
    from the tokenize pass's `work` files (packed: with seq_lens); then an empty file for each split without one."""
    if carried is not None:
        with clock.phase("carried_write"):
            counts = write_carried(carried, out)
    else:
        with clock.phase("account"):
            counts = _account(work, out / "rejected" / "tokenize.jsonl")
        with clock.phase("write"):
            _write_kept(work, out, packed, counts.kept)
    for s in SPLITS:
        if not (out / "tokens" / f"split={s}").is_dir():
            _empty_split(out / "tokens" / f"split={s}")
    return counts


def carried_fit(srcs: list[Path], max_length: int) -> bool:
    """Whether every curated row carries token ids that are taken as they are (labels with something to learn,
    no longer than max_length): then there is nothing left to tokenize, pack or refuse. Reads two int columns."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for src in srcs:
        for f in sorted(src.glob("*.parquet")):
            pf = pq.ParquetFile(f)
            if "n_label_tokens" not in pf.schema_arrow.names:
                return False
            t = pf.read(columns=["n_label_tokens", "n_tokens"])
            if len(t) and not (pc.all(pc.greater(t["n_label_tokens"], 0)).as_py()
                               and pc.max(t["n_tokens"]).as_py() <= max_length):
                return False
    return True


def write_carried(srcs: list[Path], out: Path, rows_per_file: int = ROWS_PER_FILE,
                  rows_per_group: int = ROWS_PER_GROUP) -> TokenCounts:
    """Each curated split's token columns → tokens/split=<name>/ by one streaming read-cast-write (no tokenize
    tasks, no work files), in the layout _write_kept writes, rows in curated order."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = pa.schema([("input_ids", INTS), ("labels", INTS), ("n_tokens", pa.int64())])
    counts = TokenCounts()
    for src in srcs:
        dest, writer, n_file, n = out / "tokens" / f"split={src.name}", None, 0, 0
        for f in sorted(src.glob("*.parquet")):
            for b in pq.ParquetFile(f).iter_batches(batch_size=rows_per_group, columns=schema.names):
                t = pa.Table.from_batches([b]).cast(schema)
                counts.tokens += pc.sum(t["n_tokens"]).as_py() or 0
                while len(t):
                    if writer is None or n_file == rows_per_file:
                        if writer is not None:
                            writer.close()
                        dest.mkdir(parents=True, exist_ok=True)
                        writer = pq.ParquetWriter(dest / f"part-{n // rows_per_file}.parquet", schema)
                        n_file = 0
                    head, t = t.slice(0, rows_per_file - n_file), t.slice(rows_per_file - n_file)
                    writer.write_table(head, row_group_size=rows_per_group)
                    n_file, n = n_file + len(head), n + len(head)
        if writer is not None:
            writer.close()
        counts.kept += n
        counts.reused += n
        counts.split[src.name] = counts.split.get(src.name, 0) + n
    return counts


def _account(work: Path, rejected: Path) -> TokenCounts:
    """Stream the tokenized rows' small columns: count kept rows, tokens and truncations, write refusals."""
    import pyarrow.dataset as pads

    counts = TokenCounts()
    rejected.parent.mkdir(parents=True, exist_ok=True)
    cols = _REJECTED + ["n_tokens", "truncated", "split", "n_rows", "reused"]
    batches = pads.dataset(str(work), format="parquet").to_batches(columns=cols, batch_size=65536) if work.exists() \
        else []
    with open(rejected, "a") as fh:
        for b in batches:
            for r in b.to_pylist():
                if r["reason"]:
                    counts.rejected += 1
                    counts.by_reason[r["reason"]] = counts.by_reason.get(r["reason"], 0) + 1
                    fh.write(json.dumps({k: r[k] for k in _REJECTED}) + "\n")
                else:
                    counts.kept += r["n_rows"]
                    counts.split[r["split"]] = counts.split.get(r["split"], 0) + r["n_rows"]
                    counts.tokens += r["n_tokens"]
                    counts.truncated += r["truncated"]
                counts.reused += r["reused"]
    if rejected.stat().st_size == 0:
        rejected.unlink()
    return counts


def _write_kept(work: Path, out: Path, packed: bool, n_kept: int) -> None:
    """Kept (and, when packed, already packed) rows → tokens/split=<name>/, by a streaming pyarrow
    scan-filter-write on the driver (one C++ pass), rows in curated order whatever the threads did."""
    import pyarrow.dataset as pads

    if not n_kept:
        return
    cols = ["split", "input_ids", "labels", "n_tokens"] + (["seq_lens"] if packed else [])
    scan = pads.dataset(str(work), format="parquet").scanner(columns=cols, filter=pads.field("reason") == "")
    pads.write_dataset(scan, str(out / "tokens"), format="parquet", partitioning=["split"],
                       partitioning_flavor="hive", existing_data_behavior="overwrite_or_ignore",
                       basename_template="part-{i}.parquet", max_rows_per_file=ROWS_PER_FILE,
                       max_rows_per_group=ROWS_PER_GROUP, preserve_order=True)


def _empty_split(dest: Path) -> None:
    """An empty split is still a readable Parquet folder."""
    import pyarrow.parquet as pq

    dest.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.schema([("input_ids", INTS), ("labels", INTS), ("n_tokens", pa.int64())]).empty_table(),
                   dest / "part-00000.parquet")
