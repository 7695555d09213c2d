"""Curation stage: raw files → validated, normalised, filtered, de-duplicated, balanced, mixed, split rows.

    loraforge curate configs/curate-alpaca-gsm8k-cpu.yaml       # alone; prints its output folder last

Three passes, each streaming: (1) Ray Data reads every file and parses, validates, normalises, filters and
MinHash-signs each row, writing all rows (refused ones with their reason) to `_work/parsed/`; (2) the driver scans
only the small columns (ids, keys, signatures, categories) of that, and decides duplicates, category caps, mixing
and splits over the whole dataset at once; (3) Ray Data joins the decisions back on, writes `rejected/` (JSONL:
reason, detail, source, line, row) and the kept rows, sorted by row id, into `train/ validation/ test/`
(Parquet). Output: also `curation_report.{json,md}`, plots, and `manifest.json` (kind "curated_dataset").
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.artifacts.manifest import hash_path, write_manifest
from pipelines.data import local_pool, report
from pipelines.data.chat import tokenizer_hash
from pipelines.data.config import CURATION_REASONS, FAULT_REASONS
from pipelines.data.curate_rows import ParseRows, cached, parse_batch, read_files
from pipelines.data.dedup import (
    SPLITS,
    assign_split,
    candidate_pairs,
    category_quotas,
    clusters,
    estimated_jaccard,
    jaccard,
    optimal_bands,
    shingles,
    unit_hash,
)
from pipelines.data.readers import expand_paths, iter_records, jsonl_ranges
from pipelines.data.rowformats import RowError, apply_columns, detect_format, format_hint, parse_raw
from pipelines.data.split_writer import SplitWriter
from pipelines.schema import DataError

DECISION_REASONS = list(CURATION_REASONS)


def run(cfg, out_dir: str | os.PathLike, model_dir: str | None = None, wait_plots: bool = True) -> Path:
    """Curate cfg.train_path (+ cfg.mix.path) into out_dir; returns out_dir. cfg is a pipelines.data.config.DataConfig.
    wait_plots=False: the report's PNG plots may still be drawing on return (report.wait_plots() joins them)."""

    out = Path(out_dir).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    work = out / "_work"
    main_files = cfg.train_files()
    mix_files = expand_paths(cfg.mix.path) if cfg.mix.path else []
    files = main_files + [f for f in mix_files if f not in main_files]
    mix_fids = list(range(len(main_files), len(files)))
    formats = file_formats(files, cfg)  # data.format=auto: decided once per file, before any Ray work
    parse_args = (cfg.format, cfg.system_prompt, cfg.filters, cfg.dedup.num_perm, cfg.category_field,
                  mix_fids, model_dir, cfg.max_length if cfg.truncation == "reject" else None, cfg.columns,
                  {i: formats[f] for i, f in enumerate(files)})
    phases: dict[str, float] = {}
    engine = pick_engine(cfg, files)
    report.start_plotter()  # imports matplotlib on CPU time the passes leave idle
    try:
        with timed(phases, "read_parse_sign"):
            procs = (_parse_local if engine == "local" else _parse_pass)(files, parse_args, work / "parsed", cfg)
        return _decide_and_write(cfg, out, work, files, formats, engine, phases, procs, model_dir, wait_plots)
    except BaseException:
        report.cancel_plotter()
        raise


def _decide_and_write(cfg, out: Path, work: Path, files: list[str], formats: dict[str, str], engine: str,
                      phases: dict[str, float], procs: int | None, model_dir: str | None, wait_plots: bool) -> Path:
    """Passes (2) and (3) and the report, over the parse pass's files in work/parsed."""
    if not any((work / "parsed").glob("*.parquet")):  # every file was empty (or held only blank lines)
        raise DataError(f"data.train_path={cfg.train_path!r}: no rows read from {len(files)} file(s); point it at "
                        "a file with data")
    with timed(phases, "decide"):
        dec = decide(work / "parsed", cfg)
    counts = dec["counts"]
    report.plot(out, dec["lengths"], cfg.max_length, counts["kept_by_category"])  # drawn while the splits are written
    _check_accounting(counts, counts)
    with timed(phases, "split_write"):
        n_rejected, n_kept = write_outputs(work / "parsed", out, dec, tokens=_carries_tokens(dec, model_dir))
    dec["formats"] = formats
    dec["phases"] = {"engine": engine, "wall_seconds": phases, "task_seconds": task_seconds(work / "parsed"),
                     **({"local_processes": procs} if engine == "local" else {})}
    _check_accounting(counts, {"rows_rejected": n_rejected, "rows_kept": n_kept})
    _check_ceiling(cfg, counts, out)
    if not os.environ.get("LORAFORGE_KEEP_WORK"):
        shutil.rmtree(work, ignore_errors=True)
    return _finish(cfg, out, files, dec, model_dir, wait_plots)


@contextlib.contextmanager
def timed(phases: dict[str, float], name: str):
    """Add the block's wall seconds to phases[name] (the per-phase table of the report and the bench)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - t0, 3)


def task_seconds(parsed: Path) -> dict[str, float]:
    """Worker seconds per phase of the parse pass, summed over its tasks (each row carries its batch's share)."""
    import pyarrow.compute as pc

    cols = {"t_parse": "parse", "t_count": "count_tokens", "t_filter": "normalise_filter", "t_sign": "minhash"}
    sums = dict.fromkeys(cols.values(), 0.0)
    for b in _scan(parsed, list(cols)):
        for c, name in cols.items():
            sums[name] += pc.sum(b.column(c)).as_py() or 0.0
    return {k: round(v, 3) for k, v in sums.items()}


def pick_engine(cfg, files: list[str]) -> str:
    """data.engine, with 'auto' resolved: object-store inputs → ray; local files → local when they total at most
    data.local_max_mib or the Ray cluster is this one node (Ray Data tasks there would run on the same CPUs the
    forked processes use, after seconds of worker start-up), else ray (tasks spread over the nodes)."""
    if cfg.engine != "auto":
        return cfg.engine
    if any("://" in f for f in files):
        return "ray"
    if sum(os.path.getsize(f) for f in files) <= cfg.local_max_mib * 2 ** 20:
        return "local"
    return "local" if _one_node() else "ray"


def _one_node() -> bool:
    """No Ray cluster, or one whose only live node is this machine."""
    import ray

    if not ray.is_initialized():
        return True
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return len(alive) == 1 and alive[0].get("NodeID") == ray.get_runtime_context().get_node_id()


def _parse_local(files: list[str], parse_args: tuple, dest: Path, cfg) -> int:
    """The parse pass without Ray: the same read_files / parse_batch functions Ray Data runs, over the same file
    slices, in forked processes of this one (local_pool), written as the Parquet files the decide pass reads
    (named slice-major, so they list in row order)."""
    import pyarrow.parquet as pq

    def one(i: int, item: dict) -> None:
        n = 0
        for raw in read_files({k: [v] for k, v in item.items()}):
            for s in range(0, len(raw["raw"]), 512):  # the Ray pass's batch size
                out = parse_batch({k: v[s:s + 512] for k, v in raw.items()}, *parse_args)
                pq.write_table(out, dest / f"part-{i:05d}-{n:05d}.parquet")
                n += 1

    dest.mkdir(parents=True, exist_ok=True)
    cached(ParseRows, *parse_args)  # the tokenizer loaded once, here: the forked processes inherit it
    return local_pool.run_slices(one, read_items(files, cpus=local_pool.cpus()))


def _parse_pass(files: list[str], parse_args: tuple, dest: Path, cfg) -> None:
    import ray

    # Order preserved so the parsed files hold rows in (file, line) order: the split files can then be written
    # sorted by row id in one streaming pass, without a shuffle (checked while writing).
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    items = read_items(files, ray.cluster_resources().get("CPU", 1))
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), cfg.num_blocks or len(items)))
    ds = ds.map_batches(read_files, batch_size=1, batch_format="numpy", num_cpus=cfg.task_cpus)
    ds = ds.map_batches(parse_batch, fn_args=parse_args, batch_size=512, batch_format="numpy",
                        num_cpus=cfg.task_cpus, compute=parse_compute(cfg))
    ds.write_parquet(str(dest))


def read_items(files: list[str], cpus: float, min_bytes: int = 256 << 10, max_bytes: int = 64 << 20) -> list[dict]:
    """One read task per file, except plain local JSONL files, cut into slices (2 per CPU, of equal size within
    256 KiB-64 MiB) so one big file is parsed by every CPU instead of one task (the usual case: a single training
    file). Equal and 2 per CPU: with 1 MiB slices a 2.4 MiB file made 3, and one of 2 processes parsed two."""
    items = []
    total = sum(os.path.getsize(f) for f in files if _sliceable(f))
    target = int(min(max(total / max(2 * cpus, 1), min_bytes), max_bytes))
    for fid, path in enumerate(files):
        ranges = jsonl_ranges(path, target) if _sliceable(path) else [(-1, -1, -1)]
        items += [{"path": path, "fid": fid, "start": a, "end": b, "first_line": n} for a, b, n in ranges]
    return items


def _sliceable(path: str) -> bool:
    return "://" not in path and path.lower().endswith(".jsonl") and os.path.isfile(path)


def parse_compute(cfg):
    """The compute strategy of the parse and tokenize passes: at most data.parse_actors tasks, or Ray Data's
    default (None) when that is unset."""
    import ray

    return ray.data.TaskPoolStrategy(size=cfg.parse_actors) if cfg.parse_actors else None


def _scan(parsed: Path, columns: list[str], row_ids: np.ndarray | None = None):
    """The parse pass's rows, file by file in name order (= row order), as record batches of `columns`; row_ids:
    only those rows. Plain pyarrow.parquet: pyarrow.dataset would cost its import (pandas with it, ~0.3 s) here."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    want = pa.array(row_ids, pa.int64()) if row_ids is not None else None
    for f in sorted(parsed.glob("*.parquet")):
        for b in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=columns):
            yield b if want is None else b.filter(pc.is_in(b.column("row_id"), value_set=want))


def decide(parsed: Path, cfg) -> dict[str, Any]:
    """Whole-dataset decisions from the small columns: exact/near duplicates, balance, mix quota, split."""
    cols: dict[str, list] = {k: [] for k in ("row_id", "reason", "exact_key", "category", "origin", "kind", "sig",
                                             "n_tokens")}
    for b in _scan(parsed, list(cols)):
        for k in cols:
            cols[k].extend(b.column(k).to_pylist()) if k != "sig" else cols[k].append(b.column(k))
    ids = np.asarray(cols["row_id"], dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    reasons = np.asarray(cols["reason"], dtype=object)[order]
    ids = ids[order]
    by_reason: dict[str, int] = {}
    for r in reasons[reasons != ""]:
        by_reason[r] = by_reason.get(r, 0) + 1
    valid = np.flatnonzero(reasons == "")
    keys = np.asarray(cols["exact_key"], dtype=object)[order][valid]
    kinds = set(np.asarray(cols["kind"], dtype=object)[order][valid])
    if len(kinds) > 1:
        raise DataError(f"data.train_path={cfg.train_path!r} mixes row kinds {sorted(kinds)}; curate them apart")
    codes = np.full(len(valid), -1, dtype=np.int16)  # per valid row: split index, or len(SPLITS)+reason index
    dup_of = np.full(len(valid), -1, dtype=np.int64)
    t0 = time.perf_counter()
    info = _dedup(parsed, cfg, ids[valid], keys, codes, dup_of, _sig_matrix(cols["sig"], order, valid))
    info["lsh_cluster_seconds"] = round(time.perf_counter() - t0, 3)
    cats = np.asarray(cols["category"], dtype=object)[order][valid]
    origin = np.asarray(cols["origin"], dtype=object)[order][valid]
    _balance_and_mix(cfg, keys, cats, origin, codes)
    roots = info.pop("roots")
    for i in np.flatnonzero(codes < 0):
        codes[i] = _split_code(keys[roots[i]], cfg)
    ntok = np.asarray(cols["n_tokens"], dtype=np.int64)[order][valid]
    return _summarise(ids[valid], codes, dup_of, by_reason, len(ids), cats, origin, ntok, kinds, info)


def _sig_matrix(chunks: list, order: np.ndarray, valid: np.ndarray) -> np.ndarray:
    col = pa.chunked_array(chunks) if chunks else pa.chunked_array([], pa.binary())
    raw = col.to_pylist()
    raw = [raw[i] for i in order[valid]]
    if not raw:
        return np.zeros((0, 1), dtype=np.uint32)
    return np.frombuffer(b"".join(raw), dtype=np.uint32).reshape(len(raw), -1)


def _split_code(key: str, cfg) -> int:
    return assign_split(key, cfg.split.seed, cfg.split.fractions())


def _dedup(parsed: Path, cfg, ids: np.ndarray, keys: np.ndarray, codes: np.ndarray, dup_of: np.ndarray,
           sig: np.ndarray) -> dict[str, Any]:
    """Mark exact then near duplicates in codes/dup_of; returns roots (cluster representative per row) and
    example clusters for the report."""

    n, ex_code, nd_code = len(ids), len(SPLITS), len(SPLITS) + 1
    roots = np.arange(n)
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        j = first.setdefault(k, i)
        if j != i and cfg.dedup.exact:
            codes[i], dup_of[i], roots[i] = ex_code, ids[j], j
    alive = np.flatnonzero(codes < 0)
    pairs, bands = np.zeros((0, 2), dtype=np.int64), (0, 0)
    if cfg.dedup.near and len(alive) > 1:
        bands = optimal_bands(cfg.dedup.threshold, sig.shape[1])
        cand = alive[candidate_pairs(sig[alive], *bands)]
        cand = cand[estimated_jaccard(sig, cand) >= cfg.dedup.threshold - 0.15]
        texts = _texts(parsed, ids[np.unique(cand)])
        sh = {i: shingles(texts[i]) for i in ids[np.unique(cand)]}
        ok = [jaccard(sh[ids[a]], sh[ids[b]]) >= cfg.dedup.threshold for a, b in cand]
        pairs = cand[np.asarray(ok, dtype=bool)] if len(cand) else pairs
        comp = clusters(n, pairs)
        for i in alive:
            if comp[i] != i:
                roots[i] = comp[i]
                if cfg.dedup.action == "drop":
                    codes[i], dup_of[i] = nd_code, ids[comp[i]]
    return {"roots": roots, "near_pairs": int(len(pairs)), "lsh_bands": list(bands),
            "examples": _examples(parsed, ids, roots, codes)}


def _texts(parsed: Path, want: np.ndarray) -> dict[int, str]:
    if not len(want):
        return {}
    out: dict[int, str] = {}
    for b in _scan(parsed, ["row_id", "dtext"], want):
        out.update(zip(b.column("row_id").to_pylist(), b.column("dtext").to_pylist()))
    return out


def _examples(parsed: Path, ids: np.ndarray, roots: np.ndarray, codes: np.ndarray, k: int = 5) -> list[dict]:
    """The k largest duplicate clusters, with a snippet of each member, for the report."""
    dup = np.flatnonzero(roots != np.arange(len(roots)))
    if not len(dup):
        return []
    r, counts = np.unique(roots[dup], return_counts=True)
    top = r[np.argsort(-counts, kind="stable")[:k]]
    members = {int(t): [int(t)] + [int(i) for i in dup if roots[i] == t][:3] for t in top}
    texts = _texts(parsed, ids[[i for m in members.values() for i in m]])
    return [{"size": int(1 + (roots[dup] == t).sum()),
             "rows": [{"row_id": int(ids[i]), "kept": bool(i == t), "text": texts.get(int(ids[i]), "")[:160]}
                      for i in m]} for t, m in members.items()]


def _balance_and_mix(cfg, keys: np.ndarray, cats: np.ndarray, origin: np.ndarray, codes: np.ndarray) -> None:
    """Category caps / temperature, then the mixing quota; the rows kept are chosen by a seeded hash rank."""

    cap_code, mix_code = len(SPLITS) + 2, len(SPLITS) + 3
    rank = np.array([unit_hash(k, cfg.split.seed, "sample") for k in keys])
    alive = np.flatnonzero(codes < 0)
    if cfg.balance.max_per_category or cfg.balance.temperature:
        main = alive[origin[alive] == "main"]
        counts: dict[str, int] = {}
        for c in cats[main]:
            counts[c] = counts.get(c, 0) + 1
        quotas = category_quotas(counts, cfg.balance.max_per_category, cfg.balance.temperature)
        for c, q in quotas.items():
            rows = main[cats[main] == c]
            codes[rows[np.argsort(rank[rows], kind="stable")[q:]]] = cap_code
    if cfg.mix.path:
        alive = np.flatnonzero(codes < 0)
        mix = alive[origin[alive] == "mix"]
        n_main = len(alive) - len(mix)
        quota = int(round(cfg.mix.share / (1 - cfg.mix.share) * n_main))
        codes[mix[np.argsort(rank[mix], kind="stable")[quota:]]] = mix_code


def _summarise(ids, codes, dup_of, by_reason, rows_in, cats, origin, ntok, kinds, info) -> dict[str, Any]:
    for c in range(len(SPLITS), len(SPLITS) + len(DECISION_REASONS)):
        n = int((codes == c).sum())
        if n:
            by_reason[DECISION_REASONS[c - len(SPLITS)]] = n
    kept = codes < len(SPLITS)
    per_split = {s: int((codes == i).sum()) for i, s in enumerate(SPLITS)}
    cat_counts: dict[str, int] = {}
    for c in cats[kept]:
        cat_counts[c] = cat_counts.get(c, 0) + 1
    rows_rejected = sum(by_reason.values())
    counts = {"rows_in": rows_in, "rows_kept": int(kept.sum()), "rows_rejected": rows_rejected,
              "rejected_by_reason": dict(sorted(by_reason.items())), "split_rows": per_split,
              "rows_faulty": sum(v for k, v in by_reason.items() if k in FAULT_REASONS),
              "kept_by_category": dict(sorted(cat_counts.items())),
              "kept_from_mix": int((origin[kept] == "mix").sum())}
    counts["split_rows"] = per_split
    return {"ids": ids, "codes": codes, "dup_of": dup_of, "counts": counts, "kind": (sorted(kinds) or ["sft"])[0],
            "lengths": ntok[kept], "dedup": info}


def _check_accounting(counts: dict[str, Any], written: dict[str, Any]) -> None:
    """The promise of this stage: no row vanishes. Decided and written counts must both add up."""
    c = counts
    if c["rows_in"] != c["rows_kept"] + c["rows_rejected"] or c["rows_kept"] != sum(c["split_rows"].values()):
        raise RuntimeError(f"row accounting broke: in={c['rows_in']} kept={c['rows_kept']} "
                           f"rejected={c['rows_rejected']} splits={c['split_rows']}")
    if (written["rows_rejected"], written["rows_kept"]) != (c["rows_rejected"], c["rows_kept"]):
        raise RuntimeError(f"row accounting broke: decided {c['rows_kept']} kept / {c['rows_rejected']} rejected, "
                           f"wrote {written['rows_kept']} / {written['rows_rejected']}")


def _check_ceiling(cfg, counts: dict[str, Any], out: Path) -> None:
    if counts["rows_in"] == 0:
        raise DataError(f"data.train_path={cfg.train_path!r}: no rows read")
    faulty = counts["rows_faulty"]
    if faulty / counts["rows_in"] > cfg.max_rejected_fraction:
        faults = {k: v for k, v in counts["rejected_by_reason"].items() if k in FAULT_REASONS}
        shape = sum(faults.get(k, 0) for k in ("missing_field", "unsupported_format"))
        hint = f"; {_format_hint(cfg)}" if shape > faulty / 2 else ""  # mostly rows of a shape we did not read
        raise DataError(f"data.train_path={cfg.train_path!r}: {faulty}/{counts['rows_in']} rows are broken or "
                         f"fail quality filters (> data.max_rejected_fraction={cfg.max_rejected_fraction}); "
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


def _format_hint(cfg, first: int = 20) -> str:
    """The fields of the first rows of the first file, the formats tried and a data.columns line."""
    return format_hint(_first_rows(cfg.train_files()[0], first), cfg.format, cfg.columns)


def file_formats(files: list[str], cfg, first: int = 20) -> dict[str, str]:
    """data.format per file. auto: the format most of the file's first rows have (after data.columns), decided
    once, so one odd row cannot switch a file's meaning; a file none of whose first rows fits any format stops
    the run here, before any row is processed, with the fields seen and the data.columns line to write."""
    out = {}
    for path in files:
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


def write_outputs(parsed: Path, out: Path, dec: dict[str, Any], tokens: bool = False) -> tuple[int, int]:
    """Join the decisions onto the parsed rows in one streaming scan: refused rows → rejected/ (JSONL), kept rows
    → train/ validation/ test/ sorted by row id in deterministic files (same data + seed → identical bytes);
    tokens: with the token columns the parse pass computed. Kept rows stay Arrow (a row is turned into Python
    only to be written to rejected/)."""

    names = list(SPLITS) + DECISION_REASONS
    writer = SplitWriter(out, dec["kind"], rows_per_file=50_000, tokens=tokens)
    (out / "rejected").mkdir()
    n_rejected, last = 0, -1
    dec_ids, dec_codes = dec["ids"], dec["codes"]
    with open(out / "rejected" / "part-00000.jsonl", "w") as rej:
        for b in _scan(parsed, ["row_id", "source", "line", "origin", "category", "kind", "reason", "detail", "raw",
                                "record", "n_tokens"] + writer.columns):
            ids = b.column("row_id").to_numpy()
            if len(ids) and (ids[0] <= last or np.any(np.diff(ids) <= 0)):
                raise RuntimeError(f"{parsed}: rows are not in row-id order; the parse pass must preserve order")
            last = int(ids[-1]) if len(ids) else last
            pos = np.searchsorted(dec_ids, ids).clip(0, max(len(dec_ids) - 1, 0))
            codes = np.full(len(ids), -1, dtype=np.int64)  # -1: refused by the parse pass (or not decided)
            if len(dec_ids):
                ok = (b.column("reason").to_numpy(zero_copy_only=False) == "") & (dec_ids[pos] == ids)
                codes[ok] = dec_codes[pos[ok]]
            bad = np.flatnonzero((codes < 0) | (codes >= len(SPLITS)))
            rows = b.select(["reason", "detail", "source", "line", "raw", "record"]).take(pa.array(bad, pa.int64()))
            for r, code, p in zip(rows.to_pylist(), codes[bad], pos[bad]):
                dup = int(dec["dup_of"][p]) if code >= len(SPLITS) else -1
                rej.write(json.dumps({"reason": r["reason"] or names[code], "detail": r["detail"],
                                      "source": r["source"], "line": r["line"], "row": r["raw"] or r["record"],
                                      "dup_of": dup}, ensure_ascii=False) + "\n")
            n_rejected += len(bad)
            writer.add_table(b, codes)
    return n_rejected, writer.close()


def _carries_tokens(dec: dict[str, Any], model_dir: str | None) -> bool:
    """Conversations curated with a tokenizer keep their token ids and labels in the curated splits."""
    return bool(model_dir) and dec["kind"] == "sft"


def _finish(cfg, out: Path, files: list[str], dec: dict[str, Any], model_dir: str | None, wait_plots: bool = True
            ) -> Path:
    counts = dec["counts"]
    content = {s: hash_path(out / s) for s in SPLITS}
    rep = {**counts, "kind": dec["kind"], "dedup": dec["dedup"], "inputs": files, "content_hash": content,
              "formats": dec["formats"], "phases": dec["phases"]}
    report.write_report(out, rep, dec["lengths"])
    if wait_plots:
        report.wait_plots()
    local = [f for f in files if "://" not in f]
    inputs = {"train": local[0]} if len(local) == 1 else {f"input_{i}": f for i, f in enumerate(local)}
    metrics = {k: counts[k] for k in ("rows_in", "rows_kept", "rows_rejected", "rejected_by_reason",
                                      "split_rows", "rows_faulty", "kept_by_category", "kept_from_mix")}
    write_manifest(out, kind="curated_dataset", inputs=inputs, config=cfg.model_dump(), metrics=metrics,
                   extra={"data_kind": dec["kind"], "content_hash": content, "source_files": files,
                          "engine": dec["phases"]["engine"],
                          **({"token_columns": {"tokenizer_hash": tokenizer_hash(model_dir)}}
                             if _carries_tokens(dec, model_dir) else {}),
                          "outputs": {**{s: s for s in SPLITS}, "rejected": "rejected"}})
    return out
