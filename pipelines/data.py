"""Data stage: raw Alpaca-style JSONL → chat template → token ids with assistant-only labels, on Ray Data.

    loraforge tokenize configs/quickstart-cpu.yaml        # alone; prints its output folder last

Output folder: `train/` (Parquet: input_ids, labels, n_tokens), `rejected.jsonl` (each refused row with its
reason and source file), `manifest.json` (counts that add up: rows_in = rows_kept + rows_rejected).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines.schema import Section


class DataConfig(Section):
    """Where the training rows come from and how they become tokens."""

    train_path: str = Field("pipelines/demo_data/city_date.jsonl", description=(
        "Alpaca-style JSONL (instruction, input, output): a file, folder or glob; local or s3://."))
    format: Literal["alpaca"] = Field("alpaca", description="Row format of train_path.")
    system_prompt: str | None = Field(None, description="Optional system turn prepended to every conversation.")
    max_length: int = Field(512, ge=16, description="Longest conversation in tokens; longer rows are rejected.")
    max_rejected_fraction: float = Field(0.2, ge=0, le=1, description=(
        "Stop the run when more than this share of rows is rejected (the data is probably not what you think)."))
    num_blocks: int | None = Field(None, ge=1, description="Read parallelism; default lets Ray Data choose.")


class _TokenizeRows:
    """Ray Data callable class: loads the tokenizer once per actor, maps a batch of raw lines to tokens."""

    def __init__(self, model_dir: str, cfg: dict[str, Any]):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.cfg = DataConfig(**cfg)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from pipelines.formatting import RowError, alpaca_to_messages, tokenize_messages

        out: dict[str, list] = {"input_ids": [], "labels": [], "n_tokens": [], "reason": [], "raw": [], "path": []}
        for line, path in zip(batch["text"], batch["path"]):
            ids, labels, reason = [], [], ""
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise RowError("not_an_object", f"a JSON {type(row).__name__}, expected an object")
                messages = alpaca_to_messages(row, self.cfg.system_prompt)
                tok = tokenize_messages(self.tokenizer, messages, self.cfg.max_length)
                ids, labels = tok.input_ids, tok.labels
            except json.JSONDecodeError as e:
                reason = f"broken_json: {e.msg} at column {e.colno}"
            except RowError as e:
                reason = str(e)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["n_tokens"].append(len(ids))
            out["reason"].append(reason)
            out["raw"].append("" if not reason else line)
            out["path"].append(path)
        return out


def run(cfg: DataConfig, model_dir: str, out_dir: str | os.PathLike) -> Path:
    """Tokenize cfg.train_path with model_dir's tokenizer into out_dir; returns out_dir."""
    import ray

    from pipelines.manifest import write_manifest

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = _expand(cfg.train_path)
    ds = ray.data.read_text(paths, include_paths=True, override_num_blocks=cfg.num_blocks)
    ds = ds.map_batches(_TokenizeRows, fn_constructor_args=(model_dir, cfg.model_dump()),
                        concurrency=(1, 2), batch_size=256, batch_format="numpy")
    # Materialised once so that kept and rejected rows come from the same pass (the deep data pipeline
    # replaces this with a streaming split); the rows live in Ray's object store, not on the driver.
    ds = ds.materialize()
    rows_in = ds.count()
    kept = ds.filter(expr="reason == ''").select_columns(["input_ids", "labels", "n_tokens"])
    rejected = ds.filter(expr="reason != ''").select_columns(["reason", "path", "raw"]).take_all()
    rows_kept = kept.count()
    if rows_in != rows_kept + len(rejected):  # the promise of this stage: no row vanishes
        raise RuntimeError(f"row accounting broke: in={rows_in} kept={rows_kept} rejected={len(rejected)}")
    with open(out / "rejected.jsonl", "w") as fh:
        for r in rejected:
            fh.write(json.dumps({"reason": r["reason"], "source": r["path"], "row": r["raw"]}) + "\n")
    by_reason: dict[str, int] = {}
    for r in rejected:
        key = r["reason"].split(":")[0]
        by_reason[key] = by_reason.get(key, 0) + 1
    if rows_in == 0:
        raise ValueError(f"data.train_path={cfg.train_path!r}: no rows read")
    if len(rejected) / rows_in > cfg.max_rejected_fraction:
        raise ValueError(f"data.train_path={cfg.train_path!r}: {len(rejected)}/{rows_in} rows rejected "
                         f"(> max_rejected_fraction={cfg.max_rejected_fraction}); reasons {by_reason}; "
                         f"see {out / 'rejected.jsonl'}")
    train_dir = out / "train"
    kept.write_parquet(str(train_dir))
    n_tokens = int(kept.sum("n_tokens") or 0)
    metrics = {"rows_in": rows_in, "rows_kept": rows_kept, "rows_rejected": len(rejected),
               "rejected_by_reason": by_reason, "tokens": n_tokens}
    write_manifest(out, kind="tokenized_dataset", inputs={"train": paths[0] if len(paths) == 1 else cfg.train_path,
                                                            "tokenizer": model_dir},
                   config=cfg.model_dump(), metrics=metrics, extra={"outputs": {"train": "train"}})
    return out


def _expand(spec: str) -> list[str]:
    """A file, folder or glob → explicit paths (object-store URIs pass through to Ray Data's filesystems)."""
    if "://" in spec:
        return [spec]
    import glob

    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(str(f.resolve()) for f in p.iterdir() if f.suffix in (".jsonl", ".json"))
    else:
        files = sorted(str(Path(f).resolve()) for f in glob.glob(str(p)))
    if not files:
        raise FileNotFoundError(f"data.train_path={spec!r}: no such file, or no .jsonl files there")
    return files
