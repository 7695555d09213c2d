"""What the benchmarks share: peak RSS of a process tree, and where the shared data lies."""

from __future__ import annotations

import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "sft" / "alpaca_5000.json"


class _Sampler:
    """Calls self.sample(this process, psutil) every 0.2 s on a thread while the `with` block runs."""

    def __enter__(self):
        import psutil

        self._stop = threading.Event()

        def loop():
            me = psutil.Process()
            while not self._stop.is_set():
                self.sample(me, psutil)
                time.sleep(0.2)

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


class PeakRSS(_Sampler):
    """Peak resident memory of this process and all its children (Ray workers included) while active."""

    def __init__(self):
        self.peak = 0

    def sample(self, me, psutil) -> None:
        total = 0
        for p in [me] + me.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)


def vm_hwm(pid: int) -> int:
    """Peak resident bytes of one process so far (the kernel's VmHWM, what getrusage's ru_maxrss reports for
    itself); 0 when the process is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ProcessPeaks(_Sampler):
    """Per-process peak RSS (VmHWM) of this process's descendants whose command line contains `match` (e.g.
    Ray Train's `RayTrainWorker` actors), sampled every 0.2 s while active: `peaks` maps pid → bytes."""

    def __init__(self, match: str):
        self.match, self.peaks = match, {}

    def sample(self, me, psutil) -> None:
        for p in me.children(recursive=True):
            try:
                if self.match in " ".join(p.cmdline()):
                    self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), vm_hwm(p.pid))
            except psutil.Error:
                pass
