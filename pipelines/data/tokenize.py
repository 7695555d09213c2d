"""Data stage: curate (pipelines.data.curate) then tokenize, both streaming on Ray Data.

    loraforge curate configs/curate-alpaca-gsm8k-cpu.yaml    # curation alone → <run>/curated/
    loraforge tokenize configs/quickstart-cpu.yaml       # curate + tokenize → <run>/data/; prints the folder last

Output folder of `run`: `curated/` (the curation stage's own artifact and report), `train/`, `validation/`,
`test/` (Parquet: input_ids, labels, n_tokens, and seq_lens when packed), `rejected/` (JSONL: reason, detail,
source, line, row — for curation and tokenization refusals), the curation report files, and `manifest.json`
(kind "tokenized_dataset"; counts that add up: rows_in = rows_kept + rows_rejected).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.artifacts.manifest import read_manifest, write_manifest
from pipelines.data import curate, local_pool, report
from pipelines.data.chat import load_tokenizer, tokenize_records, tokenizer_hash
from pipelines.data.config import (
    DataConfig,
)
from pipelines.data.curate_rows import cached
from pipelines.data.dedup import SPLITS
from pipelines.data.packing import pack_rows
from pipelines.data.rowformats import RowError
from pipelines.data.split_writer import TOKENS

TOKEN_COLUMNS = tuple(name for name, _ in TOKENS)


class _TokenizeRows:
    """Curated rows → tokens; one instance per worker process (the tokenizer is loaded once)."""

    def __init__(self, model_dir: str, cfg: DataConfig):
        self.tokenizer = load_tokenizer(model_dir)
        self.cfg = cfg

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


_INTS = pa.list_(pa.int64())
_TYPES = {"input_ids": _INTS, "labels": _INTS, "seq_lens": _INTS, "n_tokens": pa.int64(), "truncated": pa.int64(),
          "line": pa.int64(), "n_rows": pa.int64(), "reused": pa.int64()}
_COLUMNS = ("input_ids", "labels", "n_tokens", "truncated", "reason", "detail", "reused", "row", "source", "line",
            "split", "n_rows")


def _schema(packed: bool) -> pa.Schema:
    """The tokenize pass's output columns (the work files _account and _write_kept read)."""
    return pa.schema([(k, _TYPES.get(k, pa.string())) for k in _COLUMNS + (("seq_lens",) if packed else ())])


def _tokenize_slices(batch: dict[str, Any], model_dir: str, cfg: DataConfig, reuse: bool = False):
    """Ray Data task UDF: each input row names a slice (file, row groups) of a curated split; the slice is read
    with pyarrow and tokenized in one batched call (reuse: the token ids curation stored are taken where they
    fit). Yields Arrow tables of _schema. The tokenizer is loaded once per worker process (curate_rows.cached)."""
    import pyarrow.parquet as pq

    tok = cached(_TokenizeRows, model_dir, cfg)
    for path, split, first, last in zip(batch["path"], batch["split"], batch["first"], batch["last"]):
        pf = pq.ParquetFile(str(path))
        body = "messages" if "messages" in pf.schema_arrow.names else "text"
        carried = reuse and "input_ids" in pf.schema_arrow.names
        tab = pf.read_row_groups(list(range(int(first), int(last))),
                                 columns=[body, "source", "line"] + (list(TOKEN_COLUMNS) if carried else []))
        if carried and not cfg.packing.enabled:
            yield _carried(tab, tok, body, str(split), cfg)
            continue
        out = tok(tab.to_pylist(), body, str(split))
        out = _packed(out, cfg) if cfg.packing.enabled else {**out, "n_rows": [0 if r else 1 for r in out["reason"]]}
        yield pa.Table.from_pydict(out, schema=_schema(cfg.packing.enabled))


def _carried(tab: pa.Table, tok: _TokenizeRows, body: str, split: str, cfg: DataConfig) -> pa.Table:
    """A slice whose rows carry their token ids: the ones that fit pass through as Arrow columns (no Python ints),
    the others are tokenized (_TokenizeRows); rows stay in the slice's order."""
    import numpy as np
    import pyarrow.compute as pc

    fits = pc.and_(pc.greater(tab["n_label_tokens"], 0),
                   pc.less_equal(pc.list_value_length(tab["input_ids"]), cfg.max_length))
    mask = pc.fill_null(fits, False).to_numpy(zero_copy_only=False)
    idx = np.arange(len(tab))
    ok, n = tab.take(idx[mask]), int(mask.sum())
    zeros, ones, blank = pa.array([0] * n, pa.int64()), pa.array([1] * n, pa.int64()), pa.array([""] * n)
    ready = pa.Table.from_pydict(
        {"input_ids": ok["input_ids"].cast(_INTS), "labels": ok["labels"].cast(_INTS),
         "n_tokens": pc.list_value_length(ok["input_ids"]).cast(pa.int64()), "truncated": zeros, "reason": blank,
         "detail": blank, "reused": ones, "row": blank, "source": ok["source"], "line": ok["line"],
         "split": pa.array([split] * n), "n_rows": ones}, schema=_schema(False))
    out = tok(tab.take(idx[~mask]).select([body, "source", "line"]).to_pylist(), body, split)
    rest = pa.Table.from_pydict({**out, "n_rows": [0 if r else 1 for r in out["reason"]]}, schema=_schema(False))
    order = np.argsort(np.concatenate([idx[mask], idx[~mask]]), kind="stable")
    return pa.concat_tables([ready, rest]).take(order)


def _tokenize_local(items: list[dict[str, Any]], model_dir: str, cfg: DataConfig, work: Path, reuse: bool) -> int:
    """The tokenize pass without Ray: _tokenize_slices over the slices in forked processes (local_pool)."""
    import pyarrow.parquet as pq

    work.mkdir(parents=True, exist_ok=True)

    def one(n: int, item: dict) -> None:
        for k, table in enumerate(_tokenize_slices({k: [v] for k, v in item.items()}, model_dir, cfg, reuse)):
            pq.write_table(table, work / f"part-{n:06d}-{k:03d}.parquet")

    cached(_TokenizeRows, model_dir, cfg)  # loaded once, here: the forked processes inherit it
    return local_pool.run_slices(one, items)


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


def _slices(srcs: list[Path], rows_per_slice: int = 2048) -> list[dict[str, Any]]:
    """(file, row-group range) slices of about rows_per_slice rows over the curated split folders: the tokenize
    tasks (Ray Data's read_parquet made one block of all rows here, and spent ~3 s listing files)."""
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


def run(cfg: DataConfig, model_dir: str, out_dir: str | os.PathLike) -> Path:
    """Curate cfg.train_path then tokenize it with model_dir's tokenizer into out_dir; returns out_dir."""

    out = Path(out_dir).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    curated = curate.run(cfg, out / "curated", model_dir=model_dir, wait_plots=False)  # drawn during tokenize
    shutil.copytree(curated / "rejected", out / "rejected")
    tokenize(cfg, curated, model_dir, out)
    report.wait_plots()
    for f in curated.iterdir():  # the report sits at the top of the data folder too
        if f.name.startswith("curation_report") or f.suffix == ".png":
            shutil.copy2(f, out / f.name)
    return out


def tokenize(cfg: DataConfig, curated_dir: str | os.PathLike, model_dir: str, out_dir: str | os.PathLike) -> Path:
    """Tokenize a curated_dataset folder's splits into out_dir (train/ validation/ test/ + manifest)."""

    curated, out = Path(curated_dir), Path(out_dir).resolve()
    cm = read_manifest(curated, kind="curated_dataset")
    if cm["data_kind"] == "preference":
        raise ValueError(f"{curated}: preference rows are tokenized by the DPO stage; use `loraforge curate` alone")
    stats = {"kept": 0, "rejected": 0, "tokens": 0, "truncated": 0, "reused": 0, "by_reason": {}, "split": {},
             "phases": {}}
    engine = cfg.engine if cfg.engine != "auto" else cm.get("engine", "ray")  # auto: as curation decided
    reuse = cm.get("token_columns", {}).get("tokenizer_hash") == tokenizer_hash(model_dir)
    _tokenize_splits(cfg, model_dir, [curated / cm["outputs"][s] for s in SPLITS], out, stats, engine, reuse)
    m = cm["metrics"]
    by_reason = dict(m["rejected_by_reason"])
    for k, v in stats["by_reason"].items():
        by_reason[k] = by_reason.get(k, 0) + v
    metrics = {"rows_in": m["rows_in"], "rows_kept": stats["kept"], "rows_rejected": m["rows_rejected"] + stats[
        "rejected"], "rejected_by_reason": dict(sorted(by_reason.items())), "tokens": stats["tokens"],
               "truncated": stats["truncated"], "curated_rows": m["rows_kept"], "split_rows": {s: stats["split"].get(s, 0) for s in SPLITS},
               "phase_seconds": stats["phases"], "engine": engine, "rows_token_ids_reused": stats["reused"],
               **({"local_processes": stats["local_processes"]} if "local_processes" in stats else {})}
    if metrics["rows_in"] != metrics["rows_kept"] + metrics["rows_rejected"]:
        raise RuntimeError(f"row accounting broke: {metrics}")
    write_manifest(out, kind="tokenized_dataset",
                   inputs={"train": str(curated / cm["outputs"]["train"]),
                           "tokenizer": {"path": model_dir, "hash": tokenizer_hash(model_dir)}},
                   config=cfg.model_dump(), metrics=metrics,
                   extra={"outputs": {s: f"tokens/split={s}" for s in SPLITS}, "packed": cfg.packing.enabled,
                          "curated": str(curated), "content_hash": cm["content_hash"]})
    return out


def _tokenize_splits(cfg: DataConfig, model_dir: str, srcs: list[Path], out: Path, stats: dict,
                     engine: str = "ray", reuse: bool = False) -> None:
    """Every split → out/tokens/split=<name>/. When every row carries token ids curation computed with this
    tokenizer and they fit (no packing), they are written as they are (_write_carried); otherwise tokenized (and
    packed, if configured) in one pass over row-group slices (_tokenize_pass)."""
    with curate.timed(stats["phases"], "check_carried"):
        carried = reuse and not cfg.packing.enabled and _all_carried_fit(srcs, cfg.max_length)
    if carried:
        with curate.timed(stats["phases"], "carried_write"):
            _write_carried(srcs, out, stats)
    else:
        _tokenize_pass(cfg, model_dir, srcs, out, stats, engine, reuse)
    for s in SPLITS:
        if not (out / "tokens" / f"split={s}").is_dir():
            _empty_split(out / "tokens" / f"split={s}")
    shutil.rmtree(out / "_work", ignore_errors=True)


def _tokenize_pass(cfg: DataConfig, model_dir: str, srcs: list[Path], out: Path, stats: dict, engine: str,
                   reuse: bool) -> None:
    """The tokenize pass: Ray Data tasks (or, engine local, forked processes) over row-group slices; then, on
    the driver, refused rows go to rejected/ and kept rows to out/tokens/split=<name>/ (two streaming scans)."""
    work = out / "_work" / "tokens"
    with curate.timed(stats["phases"], "tokenize"):
        items = _slices(srcs)
        if items and engine == "local":  # the same slice function, in forked processes of this one (data.engine)
            stats["local_processes"] = _tokenize_local(items, model_dir, cfg, work, reuse)
        elif items:
            import ray

            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds.map_batches(_tokenize_slices, fn_args=(model_dir, cfg, reuse), batch_size=1, batch_format="numpy",
                           num_cpus=cfg.task_cpus, compute=curate.parse_compute(cfg)).write_parquet(str(work))
    with curate.timed(stats["phases"], "account"):
        n_kept = _account(work, out / "rejected" / "tokenize.jsonl", stats)
    with curate.timed(stats["phases"], "write"):
        _write_kept(cfg, work, out, n_kept)


def _all_carried_fit(srcs: list[Path], max_length: int) -> bool:
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


def _write_carried(srcs: list[Path], out: Path, stats: dict, rows_per_file: int = 50_000,
                   rows_per_group: int = 10_000) -> None:
    """Every row carries its token ids (_all_carried_fit): each curated split → tokens/split=<name>/ by one
    streaming read-cast-write (no tokenize tasks, no work files), laid out as _write_kept lays them out (part-<i>
    files of up to 50,000 rows), rows in curated order."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = pa.schema([("input_ids", _INTS), ("labels", _INTS), ("n_tokens", pa.int64())])
    for src in srcs:
        dest, writer, n_file, n = out / "tokens" / f"split={src.name}", None, 0, 0
        for f in sorted(src.glob("*.parquet")):
            for b in pq.ParquetFile(f).iter_batches(batch_size=rows_per_group, columns=schema.names):
                t = pa.Table.from_batches([b]).cast(schema)
                stats["tokens"] += pc.sum(t["n_tokens"]).as_py() or 0
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
        stats["kept"] += n
        stats["reused"] += n
        stats["split"][src.name] = stats["split"].get(src.name, 0) + n


def _write_kept(cfg: DataConfig, work: Path, out: Path, n_kept: int) -> None:
    """Kept (and, when configured, already packed) rows → tokens/split=<name>/, by a streaming pyarrow
    scan-filter-write on the driver: one C++ pass (a Ray Data pass cost ~4 s of fixed overhead for it here)."""
    import pyarrow.dataset as pads

    if not n_kept:
        return
    cols = ["split", "input_ids", "labels", "n_tokens"] + (["seq_lens"] if cfg.packing.enabled else [])
    scan = pads.dataset(str(work), format="parquet").scanner(columns=cols, filter=pads.field("reason") == "")
    pads.write_dataset(scan, str(out / "tokens"), format="parquet", partitioning=["split"],
                       partitioning_flavor="hive", existing_data_behavior="overwrite_or_ignore",
                       basename_template="part-{i}.parquet", max_rows_per_file=50_000, max_rows_per_group=10_000,
                       preserve_order=True)  # rows in curated order, whatever the threads did


def _account(work: Path, rejected: Path, stats: dict) -> int:
    """Stream the tokenized rows' small columns on the driver: count, sum tokens, write refusals. Returns kept."""
    import pyarrow.dataset as pads

    n_kept = 0
    rejected.parent.mkdir(parents=True, exist_ok=True)
    cols = ["reason", "detail", "source", "line", "row", "n_tokens", "truncated", "split", "n_rows", "reused"]
    batches = pads.dataset(str(work), format="parquet").to_batches(columns=cols, batch_size=65536) if work.exists() \
        else []
    with open(rejected, "a") as fh:
        for b in batches:
            for r in b.to_pylist():
                if r["reason"]:
                    stats["rejected"] += 1
                    stats["by_reason"][r["reason"]] = stats["by_reason"].get(r["reason"], 0) + 1
                    fh.write(json.dumps({k: r[k] for k in cols[:5]}) + "\n")
                else:
                    n_kept += r["n_rows"]
                    stats["split"][r["split"]] = stats["split"].get(r["split"], 0) + r["n_rows"]
                    stats["tokens"] += r["n_tokens"]
                    stats["truncated"] += r["truncated"]
                stats["reused"] += r["reused"]
    stats["kept"] += n_kept
    if rejected.stat().st_size == 0:
        rejected.unlink()
    return n_kept


def _empty_split(dest: Path) -> None:
    """An empty split is still a readable Parquet folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dest.mkdir(parents=True, exist_ok=True)
    ints = pa.list_(pa.int64())
    pq.write_table(pa.schema([("input_ids", ints), ("labels", ints), ("n_tokens", pa.int64())]).empty_table(),
                   dest / "part-00000.parquet")
