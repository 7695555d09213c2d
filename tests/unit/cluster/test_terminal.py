"""cluster.terminal: while a command runs, the terminal gets our lines and the log file gets everything."""

import subprocess
import sys
from pathlib import Path

from cluster.terminal import ours

SCRIPT = r"""
import logging, os, sys
from pathlib import Path
from rich.console import Console
from cluster import terminal

console = Console(stderr=True)
log = Path(sys.argv[1])
with terminal.quiet(log, console):
    os.write(2, b"[2026-12-03 E 1 1] core_worker.cc:2465: a C++ line on descriptor 2\n")
    os.write(1, b"Loading weights: 100%|##########| 272/272\n")
    logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
    print("\x1b[36m(RayTrainWorker pid=3735)\x1b[0m [sft] step 5/20 loss 0.0413", flush=True)
    print("\x1b[36m(RayTrainWorker pid=3735)\x1b[0m [sft] step 5/20 loss 0.0413", flush=True)  # forwarded twice
    print("(PlacementGroupCleaner pid=3692) Failed to query Ray Train Controller actor state.", file=sys.stderr)
    print("(MapWorker(MapBatches(Generator)) pid=9) [tune] t1 step 4 eval_loss 1.2 [repeated 2x across cluster]")
    subprocess_out = os.system("echo a child process line")
    console.print("[bold]sft[/]: 20 steps, loss 0.677 -> 0.005")
print("after: stdout is the terminal again", flush=True)
"""


def test_quiet_sends_our_lines_to_the_terminal_and_everything_to_the_log(tmp_path):
    log = tmp_path / "logs" / "run.log"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.returncode == 0, out.stderr
    terminal = out.stderr.splitlines()
    assert terminal == [f"full log: {log}", "[sft] step 5/20 loss 0.0413", "[tune] t1 step 4 eval_loss 1.2",
                        "sft: 20 steps, loss 0.677 -> 0.005"], out.stderr
    assert out.stdout == "after: stdout is the terminal again\n"
    text = log.read_text()
    for line in ("core_worker.cc:2465", "Loading weights: 100%", "Failed to load _C_mxfp8.so",
                 "Failed to query Ray Train Controller", "a child process line", "sft: 20 steps",
                 "[sft] step 5/20"):
        assert line in text, (line, text)
    assert "after:" not in text


def test_verbose_leaves_the_terminal_alone(tmp_path):
    log = tmp_path / "run.log"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[3], env={**__import__("os").environ,
                                                                       "LORAFORGE_VERBOSE": "1"})
    assert out.returncode == 0, out.stderr
    assert "core_worker.cc:2465" in out.stderr and "Failed to query" in out.stderr and not log.exists()


def test_ours_strips_ray_prefixes_and_colours():
    assert ours("\x1b[36m(RayTrainWorker pid=1)\x1b[0m [dpo] step 2/4 loss 0.6") == "[dpo] step 2/4 loss 0.6"
    assert ours("[graph] sft: cached (key 1234)") == "[graph] sft: cached (key 1234)"
    assert ours("(ServeReplica:loraforge:LoRAServer:base pid=4992) INFO vllm [sft] step") is None
    assert ours("Failed to load /x/torchao/_C_mxfp8.so") is None
