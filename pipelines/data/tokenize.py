"""Data stage: curate (pipelines.data.curate) then tokenize, both streaming on the engine data.engine picks.

    loraforge curate configs/curate-alpaca-gsm8k-cpu.yaml    # curation alone → <run>/curated/
    loraforge tokenize configs/quickstart-cpu.yaml       # curate + tokenize → <run>/data/; prints the folder last

Output folder of `run`: `curated/` (the curation stage's own artifact and report), `tokens/split=<name>/`
(Parquet: input_ids, labels, n_tokens, and seq_lens when packed; written by token_writer), `rejected/` (JSONL:
reason, detail, source, line, row — for curation and tokenization refusals), the curation report files, and
`manifest.json` (kind "tokenized_dataset"; counts that add up: rows_in = rows_kept + rows_rejected).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from pipelines.artifacts.manifest import read_manifest, write_manifest
from pipelines.data import curate, report
from pipelines.data.chat import tokenizer_hash
from pipelines.data.config import DataConfig
from pipelines.data.dedup import SPLITS
from pipelines.data.engine import Clock, Pass, cached, run_pass, task_compute
from pipelines.data.token_writer import TokenCounts, carried_fit, write_tokens
from pipelines.data.tokenize_rows import TokenizeJob, TokenizeRows, slices, tokenize_slices
from pipelines.schema import DataError


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
    """Tokenize a curated_dataset folder's splits into out_dir (tokens/split=<name>/ + manifest)."""
    curated, out = Path(curated_dir), Path(out_dir).resolve()
    cm = read_manifest(curated, kind="curated_dataset")
    if cm["data_kind"] in ("preference", "unpaired"):
        what = "preference pairs" if cm["data_kind"] == "preference" else "unpaired feedback rows (KTO)"
        raise DataError(f"{curated / 'manifest.json'}: the curated rows are {what}, which the DPO stage "
                        "tokenizes itself: give them to it (dpo.train_path, then `loraforge dpo`), or curate them "
                        "alone with `loraforge curate`")
    engine = cfg.engine if cfg.engine != "auto" else cm.get("engine", "ray")  # auto: as curation decided
    job = TokenizeJob(model_dir, cfg,
                      reuse=cm.get("token_columns", {}).get("tokenizer_hash") == tokenizer_hash(model_dir))
    clock = Clock()
    counts, procs = _tokens(job, [curated / cm["outputs"][s] for s in SPLITS], out, engine, clock)
    metrics = _metrics(cm["metrics"], counts, clock, engine, procs)
    write_manifest(out, kind="tokenized_dataset",
                   inputs={"train": str(curated / cm["outputs"]["train"]),
                           "tokenizer": {"path": model_dir, "hash": tokenizer_hash(model_dir)}},
                   config=cfg.model_dump(), metrics=metrics,
                   extra={"outputs": {s: f"tokens/split={s}" for s in SPLITS}, "packed": cfg.packing.enabled,
                          "curated": str(curated), "content_hash": cm["content_hash"]})
    return out


def _tokens(job: TokenizeJob, srcs: list[Path], out: Path, engine: str, clock: Clock
            ) -> tuple[TokenCounts, int | None]:
    """Every curated split → out/tokens/split=<name>/ (token_writer). When every row carries token ids curation
    computed with this tokenizer and they fit (no packing), they are written as they are; otherwise the tokenize
    pass (Ray Data tasks, or forked local processes) tokenizes, packs if configured and refuses over row-group
    slices, and its work files are written. Returns the counts and the local processes that ran the pass."""
    cfg = job.cfg
    with clock.phase("check_carried"):
        carried = job.reuse and not cfg.packing.enabled and carried_fit(srcs, cfg.max_length)
    if carried:
        return write_tokens(out, clock, carried=srcs), None
    work, procs = out / "_work" / "tokens", None
    with clock.phase("tokenize"):
        items = slices(srcs)
        if items:
            procs = run_pass(engine, _tokenize_pass(job), items, work)
    counts = write_tokens(out, clock, work=work, packed=cfg.packing.enabled)
    shutil.rmtree(out / "_work", ignore_errors=True)
    return counts, procs


def _tokenize_pass(job: TokenizeJob) -> Pass:
    """tokenize_slices over the slices: per slice, or as one Ray Data stage."""

    def ray_map(ds):
        return ds.map_batches(tokenize_slices, fn_args=(job,), batch_size=1, batch_format="numpy",
                              num_cpus=job.cfg.task_cpus, compute=task_compute(job.cfg))

    return Pass(lambda item: tokenize_slices({k: [v] for k, v in item.items()}, job), ray_map,
                warm=lambda: cached(TokenizeRows, job))


def _metrics(m: dict[str, Any], counts: TokenCounts, clock: Clock, engine: str, procs: int | None
             ) -> dict[str, Any]:
    """The tokenized dataset's metrics: the curated dataset's (m) with the tokenize pass's added; the rows still
    add up (rows_in = rows_kept + rows_rejected)."""
    by_reason = dict(m["rejected_by_reason"])
    for k, v in counts.by_reason.items():
        by_reason[k] = by_reason.get(k, 0) + v
    metrics = {"rows_in": m["rows_in"], "rows_kept": counts.kept, "rows_rejected": m["rows_rejected"] + counts.rejected,
               "rejected_by_reason": dict(sorted(by_reason.items())), "tokens": counts.tokens,
               "truncated": counts.truncated, "curated_rows": m["rows_kept"],
               "split_rows": {s: counts.split.get(s, 0) for s in SPLITS}, "phase_seconds": clock.seconds,
               "engine": engine, "rows_token_ids_reused": counts.reused,
               **({"local_processes": procs} if procs is not None else {})}
    if metrics["rows_in"] != metrics["rows_kept"] + metrics["rows_rejected"]:
        raise RuntimeError(f"row accounting broke: {metrics}")
    return metrics
