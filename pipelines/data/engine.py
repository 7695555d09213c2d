"""What the data wing's two passes (curation's parse pass, the tokenize pass) share: the wall clock per phase, the
choice of engine (data.engine), the one dispatch that runs a pass's per-slice work over its slices on Ray Data
tasks or in forked processes of the driver (local_pool), the per-process worker cache, and the pass's work files.

A pass's output is a folder of Parquet work files whose name order is row order: the local engine names them by
slice and batch, Ray Data writes them in order (preserve_order). Whichever engine ran a pass, the files hold the
same rows in the same order, so everything written from them is identical.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from pipelines.data import local_pool
from pipelines.data.config import DataConfig


class Clock:
    """Wall seconds per named phase (the per-phase table of the reports and the bench), in first-timed order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the block's wall seconds to seconds[name]."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


def pick_engine(cfg: DataConfig, files: list[str]) -> str:
    """data.engine, with 'auto' resolved: object-store inputs → ray; local files → local when they total at most
    data.local_max_mib or the Ray cluster is this one node (Ray Data tasks there would run on the same CPUs the
    forked processes use, after the workers' start-up), else ray (tasks spread over the nodes)."""
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


_CACHE: dict[tuple, Any] = {}


def cached(cls: type, *args: Any) -> Any:
    """One instance of cls per process and arguments. Ray reuses task workers, and the local engine's forked
    processes inherit the driver's, so a pass's tokenizer (and the transformers import) is loaded once per
    process, not once per task."""
    key = (cls.__name__, repr(args))
    if key not in _CACHE:
        _CACHE[key] = cls(*args)
    return _CACHE[key]


def task_compute(cfg: DataConfig) -> Any:
    """The compute strategy of both passes' Ray Data tasks: at most data.parse_actors at once, or Ray Data's
    default (None) when that is unset."""
    import ray

    return ray.data.TaskPoolStrategy(size=cfg.parse_actors) if cfg.parse_actors else None


@dataclass(frozen=True)
class Pass:
    """One streaming pass over slices (dicts of plain values). `tables(item)`: the Arrow tables of one slice, in
    order (the local engine); `ray_map(ds)`: the same work as Ray Data stages over a dataset of the slices;
    `warm()`: what the work loads once per process (the tokenizer), called before the local engine forks so
    its processes inherit it; `blocks`: at most this many Ray Data blocks of slices (default one per slice)."""

    tables: Callable[[dict[str, Any]], Iterable[pa.Table]]
    ray_map: Callable[[Any], Any]
    warm: Callable[[], Any]
    blocks: int | None = None


def run_pass(engine: str, work: Pass, items: list[dict[str, Any]], dest: Path) -> int | None:
    """Run `work` over items into dest's Parquet work files, on Ray Data tasks (engine 'ray') or in forked
    processes of this one (engine 'local'); returns how many local processes ran it (None on Ray)."""
    if engine == "local":
        import pyarrow.parquet as pq

        dest.mkdir(parents=True, exist_ok=True)

        def one(i: int, item: dict[str, Any]) -> None:
            for k, table in enumerate(work.tables(item)):
                pq.write_table(table, dest / f"part-{i:06d}-{k:05d}.parquet")

        work.warm()
        return local_pool.run_slices(one, items)
    import ray

    # Order preserved, so the work files hold rows in slice order: what is written from them is written in one
    # streaming pass, without a shuffle.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), work.blocks or len(items)))
    work.ray_map(ds).write_parquet(str(dest))
    return None


def work_batches(folder: Path, columns: list[str], row_ids: np.ndarray | None = None) -> Iterator[pa.RecordBatch]:
    """A pass's rows, file by file in name order (= row order), as record batches of `columns`; row_ids: only
    those rows. Plain pyarrow.parquet, which does not import pandas as pyarrow.dataset does."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    want = pa.array(row_ids, pa.int64()) if row_ids is not None else None
    for f in sorted(folder.glob("*.parquet")):
        for b in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=columns):
            yield b if want is None else b.filter(pc.is_in(b.column("row_id"), value_set=want))
