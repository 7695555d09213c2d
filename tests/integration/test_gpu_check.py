"""The GPU check's dry run (issue 33): `bench/gpu_check.sh --dry-run` runs every phase of the check a lent GPU
runs, at tiny shapes on CPU, so the script cannot rot between the GPUs that are lent for it (~35 s on 2 CPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


def test_gpu_check_dry_run_runs_every_phase(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert records[0]["phase"] == "env" and records[0]["dry_run"] is True
    by_num = {r["phase"]: r for r in records[1:]}
    assert sorted(by_num) == [p.num for p in gpu_check.PHASES]
    for r in by_num.values():
        assert r["status"] in ("ok", "skipped"), r
        assert r["prediction"]
        if r["status"] == "skipped":
            assert r["reason"], r  # an explicit reason, never a silent gap
    # the lean loss is the plain loss on the same batch, and the QLoRA run's frozen 4-bit base is untouched
    assert by_num[2]["checks"]["lean_loss_rel_diff_le_1e-3"] and by_num[2]["checks"]["lean_grad_cosine_gt_0.999"]
    assert by_num[1]["checks"]["frozen_checksum_unchanged"]
    # the table comes last on stdout (before --json's line) and in $OUT/gpu_check.md, one row per phase
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| # | phase | status |" in table
    for p in gpu_check.PHASES:
        assert f"\n| {p.num} | {p.title} |" in table
    lines = proc.stdout.rstrip().splitlines()
    assert json.loads(lines[-1])[0]["phase"] == "env"
    assert table.strip().splitlines()[-1] in proc.stdout


def test_table_is_rendered_from_a_cut_short_jsonl(tmp_path):
    """A call killed mid-phase: gpu_check.sh renders the table from the lines already written."""
    jsonl = tmp_path / "gpu_check.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"phase": "env", "dry_run": False, "gpu": "NVIDIA H100 80GB HBM3, 81559 MiB, 580.0", "commit": "abc",
         "versions": {"torch": "2.11.0+cu130"}},
        {"phase": 0, "name": "gemm", "title": "GEMM ceilings", "prediction": "p | q", "status": "ok", "seconds": 9,
         "headline": "bf16 790.0", "checks": {"tf32_faster_than_fp32": True}},
        {"phase": 1, "name": "qlora", "title": "QLoRA", "prediction": "p", "status": "timeout", "seconds": 110,
         "error": "killed at its budget of 110 s"}]) + "\n")
    assert gpu_check.main(["--table", str(jsonl)]) == 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "NVIDIA H100" in md and "torch 2.11.0+cu130" in md
    assert "| 0 | GEMM ceilings | ok | 9 | bf16 790.0 | p \\| q | tf32_faster_than_fp32 ✓ |" in md
    assert "| 1 | QLoRA | timeout | 110 | killed at its budget of 110 s |" in md
