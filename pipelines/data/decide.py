"""Curation's decide pass: whole-dataset decisions over the small columns (ids, keys, signatures, categories) of
the parse pass's work files. It writes nothing; the write pass joins its Decisions back onto the rows.

Each valid row gets one code: the index of its split in SPLITS, or len(SPLITS) + the index of the curation
reason that drops it in DECISION_REASONS. In order: exact duplicates (the earliest row of a key is kept), near
duplicates (MinHash LSH candidates, confirmed by the exact Jaccard of their word-3-gram sets; action 'keep' keeps
them all but puts a cluster in one split), category caps, the mixing quota (both choosing the rows kept by a
seeded hash rank), then the seeded split of each row by its cluster representative's key (for preference and
unpaired rows, the key of the representative's prompt: every row of a prompt lands in one split).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.data.config import CURATION_REASONS, FAULT_REASONS, DataConfig
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
from pipelines.data.engine import work_batches
from pipelines.schema import DataError

DECISION_REASONS = list(CURATION_REASONS)
EXACT, NEAR, CAP, MIX = (len(SPLITS) + DECISION_REASONS.index(r) for r in CURATION_REASONS)
_COLUMNS = ("row_id", "reason", "exact_key", "split_key", "category", "origin", "kind", "sig", "n_tokens")


@dataclass(frozen=True)
class Decisions:
    """Per valid row (a row the parse pass did not refuse), in row-id order: its id, its code (split or curation
    reason) and the id of the row it duplicates (-1: none); the counts that add up; the rows' kind; the token
    lengths of the kept rows; and the duplicate clusters for the report."""

    ids: np.ndarray
    codes: np.ndarray
    dup_of: np.ndarray
    counts: dict[str, Any]
    kind: str
    lengths: np.ndarray
    dedup: dict[str, Any]


def decide(parsed: Path, cfg: DataConfig, section: str = "data") -> Decisions:
    """Whole-dataset decisions from the small columns: exact/near duplicates, balance, mix quota, split."""
    cols: dict[str, list] = {k: [] for k in _COLUMNS}
    for b in work_batches(parsed, list(cols)):
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

    def column(name: str) -> np.ndarray:
        return np.asarray(cols[name], dtype=object)[order][valid]

    keys, kinds = column("exact_key"), set(column("kind"))
    if len(kinds) > 1:
        raise DataError(f"{section}.train_path={cfg.train_path!r} mixes row kinds {sorted(kinds)}; curate them apart")
    codes = np.full(len(valid), -1, dtype=np.int16)  # per valid row: split index, or len(SPLITS)+reason index
    dup_of = np.full(len(valid), -1, dtype=np.int64)
    t0 = time.perf_counter()
    roots, info = _dedup(parsed, cfg, ids[valid], keys, codes, dup_of, _sig_matrix(cols["sig"], order, valid))
    info["lsh_cluster_seconds"] = round(time.perf_counter() - t0, 3)
    cats, origin = column("category"), column("origin")
    _balance_and_mix(cfg, keys, cats, origin, codes)
    groups = column("split_key")  # preference / unpaired rows: their prompt's key, so a prompt is in one split
    for i in np.flatnonzero(codes < 0):
        codes[i] = assign_split(groups[roots[i]] or keys[roots[i]], cfg.split.seed, cfg.split.fractions())
    ntok = np.asarray(cols["n_tokens"], dtype=np.int64)[order][valid]
    counts = _counts(codes, by_reason, len(ids), cats, origin)
    return Decisions(ids[valid], codes, dup_of, counts, (sorted(kinds) or ["sft"])[0], ntok[codes < len(SPLITS)],
                     info)


def _sig_matrix(chunks: list, order: np.ndarray, valid: np.ndarray) -> np.ndarray:
    col = pa.chunked_array(chunks) if chunks else pa.chunked_array([], pa.binary())
    raw = col.to_pylist()
    raw = [raw[i] for i in order[valid]]
    if not raw:
        return np.zeros((0, 1), dtype=np.uint32)
    return np.frombuffer(b"".join(raw), dtype=np.uint32).reshape(len(raw), -1)


def _dedup(parsed: Path, cfg: DataConfig, ids: np.ndarray, keys: np.ndarray, codes: np.ndarray,
           dup_of: np.ndarray, sig: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Mark exact then near duplicates in codes/dup_of; returns each row's cluster representative and the
    report's dedup section (near pairs, LSH bands, example clusters)."""
    n = len(ids)
    roots = np.arange(n)
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        j = first.setdefault(k, i)
        if j != i and cfg.dedup.exact:
            codes[i], dup_of[i], roots[i] = EXACT, ids[j], j
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
                    codes[i], dup_of[i] = NEAR, ids[comp[i]]
    return roots, {"near_pairs": int(len(pairs)), "lsh_bands": list(bands),
                   "examples": _examples(parsed, ids, roots, codes)}


def _texts(parsed: Path, want: np.ndarray) -> dict[int, str]:
    if not len(want):
        return {}
    out: dict[int, str] = {}
    for b in work_batches(parsed, ["row_id", "dtext"], want):
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


def _balance_and_mix(cfg: DataConfig, keys: np.ndarray, cats: np.ndarray, origin: np.ndarray,
                     codes: np.ndarray) -> None:
    """Category caps / temperature, then the mixing quota; the rows kept are chosen by a seeded hash rank."""
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
            codes[rows[np.argsort(rank[rows], kind="stable")[q:]]] = CAP
    if cfg.mix.path:
        alive = np.flatnonzero(codes < 0)
        mix = alive[origin[alive] == "mix"]
        n_main = len(alive) - len(mix)
        quota = int(round(cfg.mix.share / (1 - cfg.mix.share) * n_main))
        codes[mix[np.argsort(rank[mix], kind="stable")[quota:]]] = MIX


def _counts(codes: np.ndarray, by_reason: dict[str, int], rows_in: int, cats: np.ndarray, origin: np.ndarray
            ) -> dict[str, Any]:
    """The counts of the report and the manifest; by_reason holds the parse pass's refusals."""
    by_reason = dict(by_reason)
    for c in range(len(SPLITS), len(SPLITS) + len(DECISION_REASONS)):
        n = int((codes == c).sum())
        if n:
            by_reason[DECISION_REASONS[c - len(SPLITS)]] = n
    kept = codes < len(SPLITS)
    per_split = {s: int((codes == i).sum()) for i, s in enumerate(SPLITS)}
    cat_counts: dict[str, int] = {}
    for c in cats[kept]:
        cat_counts[c] = cat_counts.get(c, 0) + 1
    return {"rows_in": rows_in, "rows_kept": int(kept.sum()), "rows_rejected": sum(by_reason.values()),
            "rejected_by_reason": dict(sorted(by_reason.items())), "split_rows": per_split,
            "rows_faulty": sum(v for k, v in by_reason.items() if k in FAULT_REASONS),
            "kept_by_category": dict(sorted(cat_counts.items())),
            "kept_from_mix": int((origin[kept] == "mix").sum())}


def check_accounting(counts: dict[str, Any], rows_rejected: int, rows_kept: int) -> None:
    """The promise of curation: no row vanishes. The decided counts add up, and the rows written (rows_rejected
    to rejected/, rows_kept to the splits) are the rows decided."""
    c = counts
    if c["rows_in"] != c["rows_kept"] + c["rows_rejected"] or c["rows_kept"] != sum(c["split_rows"].values()):
        raise RuntimeError(f"row accounting broke: in={c['rows_in']} kept={c['rows_kept']} "
                           f"rejected={c['rows_rejected']} splits={c['split_rows']}")
    if (rows_rejected, rows_kept) != (c["rows_rejected"], c["rows_kept"]):
        raise RuntimeError(f"row accounting broke: decided {c['rows_kept']} kept / {c['rows_rejected']} rejected, "
                           f"wrote {rows_kept} / {rows_rejected}")
