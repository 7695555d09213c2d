"""Curation stage: raw files → validated, normalised, filtered, de-duplicated, balanced, mixed, split rows.

    loraforge curate configs/curate-alpaca-gsm8k-cpu.yaml       # alone; prints its output folder last

Three passes, each streaming: (1) the parse pass (curate_rows, on the engine data.engine picks: Ray Data tasks or
forked local processes) reads every file and parses, validates, normalises, filters and MinHash-signs each row,
writing all rows (refused ones with their reason) to `_work/parsed/`; (2) the decide pass (decide) scans only
the small columns (ids, keys, signatures, categories) of that on the driver, and decides duplicates, category
caps, mixing and splits over the whole dataset at once; (3) the write pass (split_writer) joins the decisions
back on, writes `rejected/` (JSONL: reason, detail, source, line, row) and the kept rows, sorted by row id, into
`train/ validation/ test/` (Parquet). Output: also `curation_report.{json,md}`, plots, and `manifest.json`
(kind "curated_dataset").
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from pipelines.artifacts.manifest import hash_path, write_manifest
from pipelines.data import local_pool, report
from pipelines.data.chat import tokenizer_hash
from pipelines.data.config import FAULT_REASONS, DataConfig
from pipelines.data.curate_rows import ParseJob, ParseRows, parse_batch, read_files
from pipelines.data.decide import Decisions, check_accounting, decide
from pipelines.data.dedup import SPLITS
from pipelines.data.engine import Clock, Pass, cached, pick_engine, run_pass, task_compute, work_batches
from pipelines.data.readers import expand_paths, file_kind, iter_records, jsonl_ranges
from pipelines.data.rowformats import RowError, apply_columns, detect_format, format_hint, parse_raw
from pipelines.data.split_writer import write_outputs
from pipelines.schema import DataError

PARSE_BATCH = 512  # rows per parse_batch call, on either engine


def run(cfg: DataConfig, out_dir: str | os.PathLike, model_dir: str | None = None, wait_plots: bool = True,
        section: str = "data") -> Path:
    """Curate cfg.train_path (+ cfg.mix.path) into out_dir; returns out_dir. model_dir: the tokenizer that counts
    tokens (and encodes conversations, whose ids the curated splits then carry); None: characters / 4.
    wait_plots=False: the report's PNG plots may still be drawing on return (report.wait_plots() joins them).
    section: the config section whose rows these are (data; dpo for the align stage's preference rows), named
    in refusals and errors."""
    out = Path(out_dir).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    work = out / "_work"
    parsed = work / "parsed"
    main_files = cfg.train_files()
    mix_files = expand_paths(cfg.mix.path) if cfg.mix.path else []
    files = main_files + [f for f in mix_files if f not in main_files]
    formats = file_formats(files, cfg)  # data.format=auto: decided once per file, before any Ray work
    job = ParseJob.of(cfg, [formats[f] for f in files], len(main_files), model_dir, section)
    clock = Clock()
    engine = pick_engine(cfg, files)
    report.start_plotter()  # imports matplotlib on CPU time the passes leave idle
    try:
        with clock.phase("read_parse_sign"):
            procs = run_pass(engine, _parse_pass(cfg, job), read_items(files, _cpus(engine)), parsed)
        dec = _decide(cfg, parsed, out, len(files), clock, section)
        with clock.phase("split_write"):
            n_rejected, n_kept = write_outputs(parsed, out, dec, tokens=_carries_tokens(dec, model_dir))
    except BaseException:
        report.cancel_plotter()  # (none left to cancel once _decide gave the plot process its job)
        raise
    phases = {"engine": engine, "wall_seconds": clock.seconds, "task_seconds": task_seconds(parsed),
              **({"local_processes": procs} if engine == "local" else {})}
    check_accounting(dec.counts, n_rejected, n_kept)
    _check_ceiling(cfg, dec.counts, out, section)
    if not os.environ.get("LORAFORGE_KEEP_WORK"):
        shutil.rmtree(work, ignore_errors=True)
    return _finish(cfg, out, files, dec, {"formats": formats, "phases": phases}, model_dir, wait_plots)


def _parse_pass(cfg: DataConfig, job: ParseJob) -> Pass:
    """read_files then parse_batch, over file slices (read_items): per slice, or as two Ray Data stages."""

    def tables(item: dict[str, Any]):
        for raw in read_files({k: [v] for k, v in item.items()}):
            for s in range(0, len(raw["raw"]), PARSE_BATCH):
                yield parse_batch({k: v[s:s + PARSE_BATCH] for k, v in raw.items()}, job)

    def ray_map(ds):
        ds = ds.map_batches(read_files, batch_size=1, batch_format="numpy", num_cpus=cfg.task_cpus)
        return ds.map_batches(parse_batch, fn_args=(job,), batch_size=PARSE_BATCH, batch_format="numpy",
                              num_cpus=cfg.task_cpus, compute=task_compute(cfg))

    return Pass(tables, ray_map, warm=lambda: cached(ParseRows, job), blocks=cfg.num_blocks)


def _cpus(engine: str) -> float:
    """The CPUs a pass's slices are spread over: this machine's (local), or the Ray cluster's."""
    if engine == "local":
        return local_pool.cpus()
    import ray

    return ray.cluster_resources().get("CPU", 1)


def _decide(cfg: DataConfig, parsed: Path, out: Path, n_files: int, clock: Clock, section: str = "data"
            ) -> Decisions:
    """The decide pass over the parse pass's files; the report's plots are then drawn while the splits are
    written."""
    if not any(parsed.glob("*.parquet")):  # every file was empty (or held only blank lines)
        raise DataError(f"{section}.train_path={cfg.train_path!r}: no rows read from {n_files} file(s); point it "
                        "at a file with data")
    with clock.phase("decide"):
        dec = decide(parsed, cfg, section)
    report.plot(out, dec.lengths, cfg.max_length, dec.counts["kept_by_category"])
    check_accounting(dec.counts, dec.counts["rows_rejected"], dec.counts["rows_kept"])
    return dec


def task_seconds(parsed: Path) -> dict[str, float]:
    """Worker seconds per phase of the parse pass, summed over its tasks (each row carries its batch's share)."""
    import pyarrow.compute as pc

    cols = {"t_parse": "parse", "t_count": "count_tokens", "t_filter": "normalise_filter", "t_sign": "minhash"}
    sums = dict.fromkeys(cols.values(), 0.0)
    for b in work_batches(parsed, list(cols)):
        for c, name in cols.items():
            sums[name] += pc.sum(b.column(c)).as_py() or 0.0
    return {k: round(v, 3) for k, v in sums.items()}


def read_items(files: list[str], cpus: float, min_bytes: int = 256 << 10, max_bytes: int = 64 << 20) -> list[dict]:
    """One read task per file, except plain local JSONL files, cut into slices of equal size (2 per CPU, within
    256 KiB-64 MiB), so one big file (the usual case: a single training file) is parsed by every CPU at once and
    the processes finish together."""
    items = []
    total = sum(os.path.getsize(f) for f in files if _sliceable(f))
    target = int(min(max(total / max(2 * cpus, 1), min_bytes), max_bytes))
    for fid, path in enumerate(files):
        ranges = jsonl_ranges(path, target) if _sliceable(path) else [(-1, -1, -1)]
        items += [{"path": path, "fid": fid, "start": a, "end": b, "first_line": n} for a, b, n in ranges]
    return items


def _sliceable(path: str) -> bool:
    return "://" not in path and path.lower().endswith(".jsonl") and os.path.isfile(path)


def _check_ceiling(cfg: DataConfig, counts: dict[str, Any], out: Path, section: str = "data") -> None:
    """Stop the run (DataError) when no row was read, or more than data.max_rejected_fraction of the rows are
    broken or fail quality filters; the message names the reasons, rejected/ and, for rows of a shape we did not
    read, the data.columns line to write."""
    if counts["rows_in"] == 0:
        raise DataError(f"{section}.train_path={cfg.train_path!r}: no rows read")
    faulty = counts["rows_faulty"]
    if faulty / counts["rows_in"] > cfg.max_rejected_fraction:
        faults = {k: v for k, v in counts["rejected_by_reason"].items() if k in FAULT_REASONS}
        shape = sum(faults.get(k, 0) for k in ("missing_field", "unsupported_format"))
        hint = f"; {_format_hint(cfg)}" if shape > faulty / 2 else ""  # mostly rows of a shape we did not read
        raise DataError(f"{section}.train_path={cfg.train_path!r}: {faulty}/{counts['rows_in']} rows are broken "
                         f"or fail quality filters (> {section}.max_rejected_fraction={cfg.max_rejected_fraction}); "
                         f"reasons {faults}; see {out / 'rejected'} (duplicates, caps and mixing do not count)"
                         f"{hint}")


def _first_rows(path: str, first: int = 20) -> list[dict[str, Any]]:
    """The first `first` JSON objects of a file (rows that do not parse are skipped)."""
    rows = []
    for rec in itertools.islice(iter_records(path), first):
        try:
            rows.append(parse_raw(rec.raw or ""))
        except RowError:
            continue
    return rows


def _format_hint(cfg: DataConfig, first: int = 20) -> str:
    """The fields of the first rows of the first file, the formats tried and a data.columns line."""
    return format_hint(_first_rows(cfg.train_files()[0], first), cfg.format, cfg.columns)


def file_formats(files: list[str], cfg: DataConfig, first: int = 20) -> dict[str, str]:
    """data.format per file. auto: the format most of the file's first rows have (after data.columns), decided
    once, so one odd row cannot switch a file's meaning; a file none of whose first rows fits any format stops
    the run here, before any row is processed, with the fields seen and the data.columns line to write."""
    out = {}
    for path in files:
        file_kind(path)  # a file type we do not read stops the run here (DataError)
        if cfg.format != "auto":
            out[path] = cfg.format
            continue
        rows, seen, refusals = _first_rows(path, first), [], []
        for row in rows:
            try:
                seen.append(detect_format(apply_columns(row, cfg.columns)))
            except RowError as e:
                refusals.append(e)
        if rows and not seen:
            why = next((e.detail for e in refusals if e.reason == "unsupported_format"), "no known format fits")
            raise DataError(f"{path}: none of its first {len(rows)} rows fits a supported format ({why}); "
                            f"{format_hint(rows, cfg.format, cfg.columns)}")
        out[path] = Counter(seen).most_common(1)[0][0] if seen else "auto"  # (an empty or unreadable head)
    return out


def label_counts(out: Path) -> dict[str, dict[str, int]]:
    """{split: {desirable, undesirable}} of curated unpaired rows (their label column)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    counts = {}
    for split in SPLITS:
        folder = out / split
        labels = pads.dataset(str(folder), format="parquet").to_table(columns=["label"])["label"] \
            if folder.is_dir() and any(folder.glob("*.parquet")) else None
        good = int(pc.sum(labels).as_py() or 0) if labels is not None else 0
        total = len(labels) if labels is not None else 0
        counts[split] = {"desirable": good, "undesirable": total - good}
    return counts


def _carries_tokens(dec: Decisions, model_dir: str | None) -> bool:
    """Conversations curated with a tokenizer keep their token ids and labels in the curated splits."""
    return bool(model_dir) and dec.kind == "sft"


def _finish(cfg: DataConfig, out: Path, files: list[str], dec: Decisions, extra: dict[str, Any],
            model_dir: str | None, wait_plots: bool = True) -> Path:
    """The report (extra: its formats and phases) and the manifest."""
    counts = dec.counts
    if dec.kind == "unpaired":  # KTO's rows: desirable / undesirable per split
        counts = {**counts, "labels": label_counts(out)}
    content = {s: hash_path(out / s) for s in SPLITS}
    rep = {**counts, "kind": dec.kind, "dedup": dec.dedup, "inputs": files, "content_hash": content, **extra}
    report.write_report(out, rep, dec.lengths)
    if wait_plots:
        report.wait_plots()
    local = [f for f in files if "://" not in f]
    inputs = {"train": local[0]} if len(local) == 1 else {f"input_{i}": f for i, f in enumerate(local)}
    metrics = {k: counts[k] for k in ("rows_in", "rows_kept", "rows_rejected", "rejected_by_reason",
                                      "split_rows", "rows_faulty", "kept_by_category", "kept_from_mix")}
    if "labels" in counts:
        metrics["labels"] = counts["labels"]
    write_manifest(out, kind="curated_dataset", inputs=inputs, config=cfg.model_dump(), metrics=metrics,
                   extra={"data_kind": dec.kind, "content_hash": content, "source_files": files,
                          "engine": extra["phases"]["engine"],
                          **({"token_columns": {"tokenizer_hash": tokenizer_hash(model_dir)}}
                             if _carries_tokens(dec, model_dir) else {}),
                          "outputs": {**{s: s for s in SPLITS}, "rejected": "rejected"}})
    return out
