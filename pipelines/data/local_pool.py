"""The local data engine's parallelism: the same per-slice functions the Ray Data passes run, over forked worker
processes of the driver (one per CPU), for inputs too small to pay Ray Data's worker start-up.

Forked, not spawned: a child starts in milliseconds with the parent's imports and its already loaded tokenizer
(what a spawned or Ray worker pays seconds for). Children only run pure Python, the Rust tokenizer and pyarrow
writes (no Ray calls), write their own numbered output files, and leave through `os._exit` (multiprocessing's fork
start), so nothing of the driver's Ray client runs in them. Where fork is unavailable, or there is one slice or one
CPU, the slices run in this process. A child that dies (the kernel's OOM killer, a segfault in a native library)
fails the pass with a DataError that says so: the pool never waits on a process that is gone.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from pipelines.schema import DataError

_JOB: tuple[Callable[[int, Any], None], list[Any]] | None = None  # set in the parent just before the fork


def cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _call(i: int) -> int:
    fn, items = _JOB  # inherited through the fork
    fn(i, items[i])
    return i


def _arrow_ready() -> None:
    """Build one Arrow array: pyarrow imports pandas (when installed) on the first one a process builds. Done
    here, before the fork, so the children inherit the import instead of each paying for it."""
    import pyarrow as pa

    pa.array([0])


def run_slices(fn: Callable[[int, Any], None], items: list[Any], workers: int | None = None) -> int:
    """fn(i, items[i]) for every slice, in up to `workers` (default: the CPUs) forked processes; returns how many
    processes ran them (1: here). fn writes its own output, named by i, so the order of the results is the
    order of the slices whatever process ran each."""
    global _JOB
    n = min(len(items), workers or cpus())
    if n <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for i, item in enumerate(items):
            fn(i, item)
        return 1
    _arrow_ready()
    _JOB = (fn, items)
    try:
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(_call, i) for i in range(len(items))]
            wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f.done() and f.exception() is not None:
                    for other in futures:
                        other.cancel()
                    raise f.exception()
    except BrokenProcessPool:
        raise DataError(f"a worker process of the local data engine died while running its slices (killed: out of "
                        f"memory?, or crashed in a native library); {len(items)} slices, {n} processes. Free memory, "
                        "or set data.engine=ray to run the pass on Ray Data") from None
    finally:
        _JOB = None
    return n
