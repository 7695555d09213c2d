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
    """Peak resident memory of this process and all its children (Ray workers included) while active: the sum of
    their RSS (`peak`: a page shared by forked processes counts in each; every 0.2 s), and with pss=True also the
    sum of their PSS (`peak_pss`: a shared page split among its sharers, what the tree really holds; Linux; every
    pss_every-th sample only: the kernel walks each process's page tables for it, ~55 ms of CPU per sample of a
    local Ray instance's ~20 processes, which on 2 cores slowed the measured data stage by ~10% at every 0.2 s)."""

    def __init__(self, pss: bool = False, pss_every: int = 5):
        self.peak = self.peak_pss = 0
        self.pss, self.pss_every, self.n = pss, pss_every, 0

    def sample(self, me, psutil) -> None:
        total = total_pss = 0
        with_pss = self.pss and self.n % self.pss_every == 0
        self.n += 1
        for p in [me] + me.children(recursive=True):
            try:
                total += p.memory_info().rss
                if with_pss:
                    total_pss += p.memory_full_info().pss
            except (psutil.Error, AttributeError):
                pass
        self.peak = max(self.peak, total)
        self.peak_pss = max(self.peak_pss, total_pss)


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
