"""Near-duplicate finding, splitting and balancing over the whole dataset. Pure: numpy + rensa, no Ray.

MinHash signatures come from `rensa` (Rust; computed per batch by the parse pass). The LSH is banding over the
signature matrix of *all* rows at once (equivalent to `datasketch.MinHashLSH` with the same bands and rows,
checked in tests/unit/data/test_curate.py), done with numpy sorts: a Python dict-of-sets index would hold an entry
per row per band, making peak memory grow with the dataset far faster than the signatures themselves.
Candidates are then confirmed by the signature estimate and finally by the exact Jaccard similarity of the
word-shingle sets, so a reported near-duplicate pair really has J ≥ threshold.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

SPLITS = ("train", "validation", "test")


def shingles(text: str, n: int = 3) -> set[str]:
    """Word n-grams of a de-duplication text (see filters.dedup_text); a text under n words is one shingle."""
    return set(shingle_list(text, n))


def shingle_list(text: str, n: int = 3) -> list[str]:
    """shingles() as a list, repeats included (a MinHash of the list is the MinHash of the set)."""
    words = text.split()
    if len(words) < n:
        return [" ".join(words)]
    return [" ".join(g) for g in zip(*(words[i:] for i in range(n)))]


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def signatures(texts: list[str], num_perm: int, seed: int = 1, n: int = 3) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures of the texts' word-3-gram sets, by rensa (Rust; the same
    permutations for a seed on every machine). One RMinHash per row, not rensa's batch call
    (digest_matrix_from_token_sets): that one runs on a Rust thread pool, and a process forked after using it
    (the local engine's parse processes) hangs in its next batch call. Checked against datasketch on the shared
    files (tests/unit/data/test_minhash.py: Jaccard estimates and the near-duplicate pairs found agree)."""
    from rensa import RMinHash

    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for i, t in enumerate(texts):
        m = RMinHash(num_perm=num_perm, seed=seed)
        m.update(shingle_list(t, n))
        out[i] = m.digest()
    return out


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.2, fn_weight: float = 0.8) -> tuple[int, int]:
    """(bands, rows) minimising weighted false-positive + false-negative area (datasketch's criterion);
    weighted towards few misses because every candidate is verified afterwards. Every (bands, rows) with
    bands x rows <= num_perm at once, as one array; ties go to the first in (bands, rows) order."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
    b, r = pairs[:, :1], pairs[:, 1:]
    xs_lo, xs_hi = np.linspace(0, threshold, 200), np.linspace(threshold, 1, 200)
    fp = np.trapezoid(1 - (1 - xs_lo ** r) ** b, xs_lo, axis=1)
    fn = np.trapezoid(1 - (1 - (1 - xs_hi ** r) ** b), xs_hi, axis=1)
    best = int(np.argmin(fp_weight * fp + fn_weight * fn))
    return int(pairs[best, 0]), int(pairs[best, 1])


def candidate_pairs(sig: np.ndarray, bands: int, rows: int, max_bucket: int = 256) -> np.ndarray:
    """(k, 2) int64 index pairs (i < j) that share at least one band: the LSH candidates, without repeats.

    A bucket larger than max_bucket (templated data) contributes each member's next max_bucket neighbours in
    signature order instead of all k^2/2 pairs, which keeps memory bounded; near-twins sort next to each other.
    """
    n = len(sig)
    found: list[np.ndarray] = []
    for b in range(bands):
        band = np.ascontiguousarray(sig[:, b * rows:(b + 1) * rows])
        keys = _row_hash(band)
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
        ends = np.r_[starts[1:], n]
        for s, e in zip(starts, ends):
            if e - s < 2:
                continue
            members = np.sort(order[s:e])
            found.append(_pairs(members, max_bucket))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0)


def _row_hash(band: np.ndarray) -> np.ndarray:
    """One uint64 per row of a band (a polynomial hash of its values; collisions only add candidates)."""
    h = np.zeros(len(band), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in band.T:
            h = h * np.uint64(1_000_003) ^ col.astype(np.uint64)
    return h


def _pairs(members: np.ndarray, max_bucket: int) -> np.ndarray:
    k = len(members)
    if k <= max_bucket:
        i, j = np.triu_indices(k, 1)
    else:
        i = np.repeat(np.arange(k), max_bucket)
        j = i + np.tile(np.arange(1, max_bucket + 1), k)
        keep = j < k
        i, j = i[keep], j[keep]
    return np.stack([members[i], members[j]], axis=1).astype(np.int64)


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray, chunk: int = 65536) -> np.ndarray:
    out = np.empty(len(pairs), dtype=np.float64)
    for s in range(0, len(pairs), chunk):
        p = pairs[s:s + chunk]
        out[s:s + chunk] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return out


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index (earlier row) stays the root: it is the one kept
            self.parent[max(ra, rb)] = min(ra, rb)


def clusters(n: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """Connected components: root[i] = smallest index of i's component."""
    uf = UnionFind(n)
    for a, b in pairs:
        uf.union(int(a), int(b))
    return np.array([uf.find(i) for i in range(n)], dtype=np.int64)


def unit_hash(key: str, seed: int, salt: str = "") -> float:
    """A deterministic number in [0, 1) from a key and a seed (the same on every machine and Python run)."""
    d = hashlib.blake2b(f"{seed}:{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "big") / 2 ** 64


def assign_split(key: str, seed: int, fractions: tuple[float, float, float]) -> int:
    """0 train / 1 validation / 2 test, from the hash of the key (a cluster's representative) and the seed."""
    u, acc = unit_hash(key, seed, "split"), 0.0
    for i, f in enumerate(fractions):
        acc += f
        if u < acc:
            return i
    return len(fractions) - 1


def category_quotas(counts: dict[str, int], cap: int | None, temperature: float | None) -> dict[str, int]:
    """Rows to keep per category: at most `cap`; with a temperature T, shares ∝ n_c^(1/T) (T=1 keeps all,
    larger T flattens) scaled to the largest total no category runs short of."""
    quotas = dict(counts)
    if temperature is not None and temperature != 1.0 and counts:
        w = {c: n ** (1.0 / temperature) for c, n in counts.items() if n}
        total = sum(w.values())
        scale = min(counts[c] / (w[c] / total) for c in w)
        quotas = {c: min(counts[c], int(round(scale * w[c] / total))) if c in w else 0 for c in counts}
    if cap is not None:
        quotas = {c: min(q, cap) for c, q in quotas.items()}
    return quotas
