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

from pipelines.artifacts.manifest import read_manifest, write_manifest
from pipelines.data import curate
from pipelines.data.chat import tokenize_record
from pipelines.data.config import (
    DataConfig,
)
from pipelines.data.curate_rows import cached
from pipelines.data.dedup import SPLITS
from pipelines.data.packing import pack_rows
from pipelines.data.rowformats import RowError


class _TokenizeRows:
    """Curated rows → tokens; one instance per worker process (the tokenizer is loaded once)."""

    def __init__(self, model_dir: str, cfg: DataConfig):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.cfg = cfg

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "n_tokens", "truncated", "reason", "detail",
                                                "source", "line", "row", "split")}
        body = "messages" if "messages" in batch else "text"
        for i in range(len(batch[body])):
            rec = _plain(batch[body][i])
            ids, labels, cut, reason, detail = [], [], 0, "", ""
            try:
                ids, labels, cut = tokenize_record(self.tokenizer, body, rec, self.cfg.max_length,
                                                   self.cfg.truncation)
            except RowError as e:
                reason, detail = e.reason, e.detail
            for k, v in (("input_ids", ids), ("labels", labels), ("n_tokens", len(ids)), ("truncated", cut),
                         ("reason", reason), ("detail", detail), ("source", str(batch["source"][i])),
                         ("line", int(batch["line"][i])), ("row", json.dumps(rec) if reason else ""),
                         ("split", Path(str(batch["path"][i])).parent.name)):
                out[k].append(v)
        return out


def _tokenize_batch(batch: dict[str, Any], model_dir: str, cfg: DataConfig) -> dict[str, Any]:
    """Ray Data task UDF: the tokenizer is loaded once per worker process (see curate_rows.cached)."""

    return cached(_TokenizeRows, model_dir, cfg)(batch)


def _blocks(folder: Path, rows_per_block: int = 2048) -> int:
    """Read parallelism from the Parquet footers: ~rows_per_block rows a block (Ray Data otherwise made one
    block per row of these small-but-wide files here, and paid a task's overhead for each)."""
    import pyarrow.dataset as pads

    return max(1, -(-pads.dataset(str(folder), format="parquet").count_rows() // rows_per_block))


def _plain(v: Any) -> Any:
    """numpy/arrow values of a batch → plain Python (lists of dicts)."""
    if hasattr(v, "tolist") and not isinstance(v, str):
        v = v.tolist()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def run(cfg: DataConfig, model_dir: str, out_dir: str | os.PathLike) -> Path:
    """Curate cfg.train_path then tokenize it with model_dir's tokenizer into out_dir; returns out_dir."""

    out = Path(out_dir).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    curated = curate.run(cfg, out / "curated", model_dir=model_dir)
    for f in curated.iterdir():  # the report sits at the top of the data folder too
        if f.name.startswith("curation_report") or f.suffix == ".png":
            shutil.copy2(f, out / f.name)
    shutil.copytree(curated / "rejected", out / "rejected")
    return tokenize(cfg, curated, model_dir, out)


def tokenize(cfg: DataConfig, curated_dir: str | os.PathLike, model_dir: str, out_dir: str | os.PathLike) -> Path:
    """Tokenize a curated_dataset folder's splits into out_dir (train/ validation/ test/ + manifest)."""

    curated, out = Path(curated_dir), Path(out_dir).resolve()
    cm = read_manifest(curated, kind="curated_dataset")
    if cm["data_kind"] == "preference":
        raise ValueError(f"{curated}: preference rows are tokenized by the DPO stage; use `loraforge curate` alone")
    stats = {"kept": 0, "rejected": 0, "tokens": 0, "truncated": 0, "by_reason": {}, "split": {}}
    _tokenize_splits(cfg, model_dir, [curated / cm["outputs"][s] for s in SPLITS], out, stats)
    m = cm["metrics"]
    by_reason = dict(m["rejected_by_reason"])
    for k, v in stats["by_reason"].items():
        by_reason[k] = by_reason.get(k, 0) + v
    metrics = {"rows_in": m["rows_in"], "rows_kept": stats["kept"], "rows_rejected": m["rows_rejected"] + stats[
        "rejected"], "rejected_by_reason": dict(sorted(by_reason.items())), "tokens": stats["tokens"],
               "truncated": stats["truncated"], "curated_rows": m["rows_kept"], "split_rows": {s: stats["split"].get(s, 0) for s in SPLITS}}
    if metrics["rows_in"] != metrics["rows_kept"] + metrics["rows_rejected"]:
        raise RuntimeError(f"row accounting broke: {metrics}")
    write_manifest(out, kind="tokenized_dataset",
                   inputs={"train": str(curated / cm["outputs"]["train"]), "tokenizer": model_dir},
                   config=cfg.model_dump(), metrics=metrics,
                   extra={"outputs": {s: f"tokens/split={s}" for s in SPLITS}, "packed": cfg.packing.enabled,
                          "curated": str(curated), "content_hash": cm["content_hash"]})
    return out


def _tokenize_splits(cfg: DataConfig, model_dir: str, srcs: list[Path], out: Path, stats: dict) -> None:
    """Tokenize every split in one Ray Data pass; refused rows go to rejected/, kept rows (packed if configured)
    to out/tokens/split=<name>/ in a second pass. Two executions in all: each costs seconds of fixed overhead."""
    import ray

    work = out / "_work" / "tokens"
    ds = ray.data.read_parquet([str(s) for s in srcs], num_cpus=cfg.task_cpus, include_paths=True,
                               override_num_blocks=sum(_blocks(s) for s in srcs))
    ds.map_batches(_tokenize_batch, fn_args=(model_dir, cfg), batch_size=256, batch_format="numpy",
                   num_cpus=cfg.task_cpus, compute=curate.parse_compute(cfg)).write_parquet(str(work))
    n_kept = _account(work, out / "rejected" / "tokenize.jsonl", stats)
    if n_kept:
        kept = ray.data.read_parquet(str(work), num_cpus=cfg.task_cpus, override_num_blocks=_blocks(work))
        kept = kept.filter(expr="reason == ''").select_columns(["split", "input_ids", "labels", "n_tokens"])
        if cfg.packing.enabled:
            from functools import partial

            kept = kept.map_batches(partial(pack_rows, capacity=cfg.packing.block_size or cfg.max_length),
                                    batch_size=cfg.packing.window, batch_format="numpy", num_cpus=cfg.task_cpus)
        kept.write_parquet(str(out / "tokens"), partition_cols=["split"])
    for s in SPLITS:
        if not (out / "tokens" / f"split={s}").is_dir():
            _empty_split(out / "tokens" / f"split={s}")
    shutil.rmtree(out / "_work", ignore_errors=True)


def _account(work: Path, rejected: Path, stats: dict) -> int:
    """Stream the tokenized rows' small columns on the driver: count, sum tokens, write refusals. Returns kept."""
    import pyarrow.dataset as pads

    n_kept = 0
    rejected.parent.mkdir(parents=True, exist_ok=True)
    cols = ["reason", "detail", "source", "line", "row", "n_tokens", "truncated", "split"]
    with open(rejected, "a") as fh:
        for b in pads.dataset(str(work), format="parquet").to_batches(columns=cols, batch_size=65536):
            for r in b.to_pylist():
                if r["reason"]:
                    stats["rejected"] += 1
                    stats["by_reason"][r["reason"]] = stats["by_reason"].get(r["reason"], 0) + 1
                    fh.write(json.dumps({k: r[k] for k in cols[:5]}) + "\n")
                else:
                    n_kept += 1
                    stats["split"][r["split"]] = stats["split"].get(r["split"], 0) + 1
                    stats["tokens"] += r["n_tokens"]
                    stats["truncated"] += r["truncated"]
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
