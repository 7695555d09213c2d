"""What a long command shows on the terminal: our progress lines and each stage's one-line summary. Everything
else (Ray's and the libraries' logging, C++ glog lines, warnings, weight-loading bars, worker output that is not
ours) goes to a log file in the run folder, whose path is printed first.

Libraries write to the process's file descriptors 1 and 2 as well as to Python's sys.stdout/sys.stderr, and Ray
forwards its workers' output to the driver's sys.stdout/sys.stderr. `quiet(log)` points descriptors 1 and 2 at
the log file for the length of the command and puts a line filter in sys.stdout/sys.stderr: every line goes to
the log; the lines of our own progress (`[sft] step 5/20 ...`, `[graph] sft: cached ...`) also go to the
terminal, without Ray's worker prefix and once (Ray Train forwards a worker's line twice). `cluster.stages`'
console (the summaries, the answers table) writes to the terminal and to the log.

`LORAFORGE_VERBOSE=1` leaves the terminal as it is; so does a process whose stderr is not a file descriptor (a
test's CliRunner).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

OURS = re.compile(r"^\[(graph|sft|dpo|tune|base)\] ")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\]$")
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def _unprefixed(text: str) -> str:
    """Without Ray's worker prefix: "(RayTrainWorker pid=3735) ", "(MapWorker(MapBatches(Generator)) pid=9) "."""
    if not text.startswith("("):
        return text
    depth = 0
    for i, c in enumerate(text):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth == 0:
            return text[i + 1:].lstrip()
    return text


def ours(line: str) -> str | None:
    """The text of one of our progress lines (worker prefix, colours and Ray's repeat note removed), else None."""
    text = REPEATED.sub("", _unprefixed(ANSI.sub("", line)).rstrip())
    return text if OURS.match(text) else None


class _Lines(io.TextIOBase):
    """sys.stdout / sys.stderr while quiet: all to the log, our progress lines also to the terminal."""

    def __init__(self, fd: int, log: TextIO, terminal: TextIO, shown: list[str]):
        self._fd, self._log, self._terminal, self._shown, self._buf = fd, log, terminal, shown, ""

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:  # the descriptor, which points at the log
        return self._fd

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        self._log.write(s)
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            text = ours(line)
            if text is not None and text not in self._shown[-4:]:  # forwarded twice, or by two ranks
                self._shown.append(text)
                del self._shown[:-8]
                self._terminal.write(text + "\n")
                self._terminal.flush()
        return len(s)

    def flush(self) -> None:
        self._log.flush()
        self._terminal.flush()


class _Tee(io.TextIOBase):
    """The console's file while quiet: the terminal as it is, and a plain copy (no colours, no spinner) in the log."""

    def __init__(self, terminal: TextIO, log: TextIO):
        self._terminal, self._log = terminal, log

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._terminal.isatty()

    def fileno(self) -> int:
        return self._terminal.fileno()

    def write(self, s: str) -> int:
        self._terminal.write(s)
        plain = ANSI.sub("", s).split("\r")[-1]
        if plain.strip() and plain.lstrip()[0] not in SPINNER:
            self._log.write(plain)
        return len(s)

    def flush(self) -> None:
        self._terminal.flush()
        self._log.flush()


def log_path(run_dir: Path, command: str = "run") -> Path:
    return run_dir / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def _can_redirect() -> bool:
    if os.environ.get("LORAFORGE_VERBOSE") == "1":
        return False
    try:
        return sys.stderr.fileno() == 2 and sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def quiet(path: Path, console) -> Iterator[Path | None]:
    """For the length of the block: descriptors 1 and 2 and sys.stdout/stderr into `path`, our lines and
    `console` (a rich Console) on the terminal. Yields the log's path, or None when the terminal is left as is."""
    if not _can_redirect():
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    old = sys.stdout, sys.stderr, console.file if console._file is not None else None
    shown: list[str] = []
    console.file = _Tee(terminal, log)
    console.print(f"[dim]full log: {path}[/]", soft_wrap=True)
    for fd in (1, 2):
        os.dup2(log.fileno(), fd)
    sys.stdout, sys.stderr = _Lines(1, log, terminal, shown), _Lines(2, log, terminal, shown)
    try:
        yield path
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = old[0], old[1]
        console.file = old[2]
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        log.close()
        terminal.close()
