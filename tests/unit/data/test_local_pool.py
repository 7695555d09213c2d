"""The local data engine's forked slices (pipelines.data.local_pool): every slice runs once, outputs land by slice
index, a slice's error reaches the caller, and a single slice runs in this process."""

from __future__ import annotations

import os

import pytest

from pipelines.data import local_pool


def test_slices_run_in_forked_processes_and_outputs_keep_slice_order(tmp_path):
    def one(i: int, item: str) -> None:
        (tmp_path / f"{i:03d}.txt").write_text(f"{item} {os.getpid()}")

    items = [f"slice{i}" for i in range(7)]
    used = local_pool.run_slices(one, items, workers=2)
    files = sorted(tmp_path.glob("*.txt"))
    assert [f.read_text().split()[0] for f in files] == items
    pids = {int(f.read_text().split()[1]) for f in files}
    if "fork" in __import__("multiprocessing").get_all_start_methods():
        assert used == 2 and os.getpid() not in pids and 1 <= len(pids) <= 2


def test_one_slice_runs_here_and_errors_reach_the_caller(tmp_path):
    seen = []
    assert local_pool.run_slices(lambda i, item: seen.append((i, item, os.getpid())), ["only"]) == 1
    assert seen == [(0, "only", os.getpid())]

    def bad(i: int, item: int) -> None:
        if item == 3:
            raise ValueError(f"slice {i} is broken")

    with pytest.raises(ValueError, match="slice 3 is broken"):
        local_pool.run_slices(bad, list(range(5)), workers=2)


def test_a_child_that_dies_fails_the_pass_and_never_hangs(tmp_path):
    """A forked child killed outright (as the OOM killer does) is a DataError saying so, not a wait forever."""
    import signal

    from pipelines.schema import DataError

    if "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("no fork on this platform: slices run in this process")

    def dies(i: int, item: int) -> None:
        if item == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(DataError, match="worker process of the local data engine died"):
        local_pool.run_slices(dies, list(range(6)), workers=2)
