"""What the benchmarks share: peak RSS of a process tree, and where the shared data lies."""

from __future__ import annotations

import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "sft" / "alpaca_5000.json"


class PeakRSS:
    """Peak resident memory of this process and all its children (Ray workers included) while active."""

    def __enter__(self):
        import psutil

        self.peak, self._stop = 0, threading.Event()

        def sample():
            me = psutil.Process()
            while not self._stop.is_set():
                total = 0
                for p in [me] + me.children(recursive=True):
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
                time.sleep(0.2)

        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
