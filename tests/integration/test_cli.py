"""The stage commands end to end through the real CLI on the shared Ray instance and the tiny model:
curate (all rows rejected → exit 2 with the reasons, rows kept with their reasons), tokenize → sft → dpo (with its
own step count and learning rate) → merge → evaluate. Each command prints its output folder as its last line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo" / "city_date.jsonl"


@pytest.fixture(scope="module")
def cli(ray_session, tiny_model_dir, tmp_path_factory):
    from typer.testing import CliRunner

    from cluster.cli import app

    root = tmp_path_factory.mktemp("cli")
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:160]]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:120]))
    test = root / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[120:140]))
    pairs = root / "pairs.jsonl"  # chosen: the row's answer; rejected: another row's answer
    pairs.write_text("".join(json.dumps({"prompt": f"{r['instruction']}\n\n{r['input']}", "chosen": r["output"],
                                         "rejected": rows[(i + 7) % 40]["output"]}) + "\n"
                             for i, r in enumerate(rows[:40])))
    cfg = {"name": "cli", "output_dir": str(root / "runs"), "model": {"name": tiny_model_dir},
           "data": {"train_path": str(data), "max_length": 256},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
           "train": {"num_workers": 1, "cpus_per_worker": 1, "max_steps": 4, "batch_size": 8, "lr": 5e-3,
                     "warmup_steps": 0, "log_every": 2, "tracking_uri": "off"},
           "dpo": {"train_path": str(pairs), "max_steps": 2, "lr": 1e-3, "batch_size": 4, "max_length": 256},
           "eval": {"test_path": str(test), "max_samples": 8, "few_shot_k": 2, "backend": "hf",
                    "max_new_tokens": 8, "bertscore": False},
           "serve": {"max_lora_rank": 8}}
    path = root / "cli.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def invoke(*args: str):
        result = CliRunner().invoke(app, [args[0], str(path), *args[1:]])
        return result

    return {"invoke": invoke, "root": root, "runs": root / "runs" / "cli", "cfg": cfg}


def last_line(output: str) -> Path:
    return Path(output.strip().splitlines()[-1])


def test_curate_with_every_row_rejected_exits_2_with_reasons(cli):
    bad = cli["root"] / "all_bad.jsonl"
    bad.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(30)))
    result = cli["invoke"]("curate", f"data.train_path={bad}", "data.format=alpaca")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "30/30 rows" in result.output and "missing_field" in result.output, result.output
    # the rows' shape was not read: the message names their fields and the data.columns line to write
    assert "fields seen ['answer', 'prompt']" in result.output, result.output
    assert "data.columns: {prompt: prompt, completion: answer}" in result.output, result.output
    rejected = [json.loads(line) for f in (cli["runs"] / "curated" / "rejected").glob("*.jsonl")
                for line in f.read_text().splitlines()]
    assert len(rejected) == 30 and {r["reason"] for r in rejected} == {"missing_field"}  # nothing lost


def test_tokenize_sft_dpo_merge_evaluate(cli):
    out = cli["invoke"]("tokenize")
    assert out.exit_code == 0, out.output
    data = last_line(out.stdout)
    assert data == (cli["runs"] / "data").resolve()
    manifest = json.loads((data / "manifest.json").read_text())
    m = manifest["metrics"]
    assert m["rows_in"] == 120 == m["rows_kept"] + m["rows_rejected"]

    out = cli["invoke"]("sft")
    assert out.exit_code == 0, out.output
    sft = last_line(out.stdout)
    sft_manifest = json.loads((sft / "manifest.json").read_text())
    assert sft_manifest["metrics"]["steps"] == 4 and (sft / "adapter_model.safetensors").is_file()

    out = cli["invoke"]("dpo")
    assert out.exit_code == 0, out.output
    dpo = last_line(out.stdout)
    m = json.loads((dpo / "manifest.json").read_text())
    # DPO's own optimisation settings, not SFT's
    assert m["metrics"]["steps"] == 2 and m["config"]["train"]["lr"] == 1e-3 and m["config"]["train"]["batch_size"] == 4
    assert m["config"]["dpo"]["max_steps"] == 2
    assert m["lineage"]["parent_adapter"]["path"] == str(sft)
    assert "reward_accuracy_history" in m["metrics"] and "eval_extra_history" in m["metrics"]

    out = cli["invoke"]("merge")
    assert out.exit_code == 0, out.output
    merged = last_line(out.stdout)
    assert (merged / "config.json").is_file() and any(merged.glob("*.safetensors"))

    # on the rows curate held out of training (its Parquet test split), read as they were written (the few-shot
    # variant and the config's own test file are test_eval.py's)
    out = cli["invoke"]("evaluate", "--adapter", f"cli={sft}", "eval.test_path=curated", "eval.max_samples=4",
                        "eval.few_shot_k=0")
    assert out.exit_code == 0, out.output
    report = json.loads((last_line(out.stdout) / "eval.json").read_text())
    assert {"base", "cli"} <= set(report["variants"])
    assert report["n_test"] == 4 and report["rows_rejected"] == 0, report.get("rejected_by_reason")


def test_a_stage_command_shows_our_lines_and_logs_the_libraries(cli, ray_session):
    """`loraforge tokenize` in a terminal-like process (its own driver on this session's cluster): the terminal
    gets the log's path, the stage's summary and the output folder; Ray's and the libraries' lines go to the log."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "cluster", "tokenize", str(cli["root"] / "cli.yaml"), "name=quiet",
           f"ray.address={ray_session.get_runtime_context().gcs_address}"]
    out = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (out.stderr + out.stdout).strip().splitlines()
    assert lines[0].startswith("full log: ") and lines[-1] == str(cli["root"] / "runs" / "quiet" / "data"), lines
    assert any(line.startswith("data: 120 rows in") for line in lines), lines
    assert len(lines) <= 4, lines  # log path, model, data summary, folder: no library line
    log = Path(lines[0].removeprefix("full log: "))
    assert "Connecting to existing Ray cluster" in log.read_text() and "data: 120 rows in" in log.read_text()


def test_driver_killed_during_sft_then_run_again_skips_data_and_resumes_sft(cli, ray_session):
    """SIGKILL of `loraforge run` (a separate driver on this session's cluster) once SFT has checkpointed, with
    the default checkpoint cadence (auto: at step 10 of 20); the same command again finds the data stage cached
    and the SFT stage interrupted under the same key, and resumes it from that checkpoint, not step 0: the
    adapter's loss history covers every step once."""
    import signal
    import subprocess
    import sys
    import time

    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "cluster", "run", str(cli["root"] / "cli.yaml"), "--until", "sft", "name=killed",
           "train.max_steps=20", "train.log_every=1", "dpo.train_path=null",
           "eval.test_path=null", f"ray.address={address}"]
    run_dir = cli["root"] / "runs" / "killed"
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    # a checkpoint counts once Ray Train's snapshot names it (the folder alone may still be uploading)
    while not list((run_dir / "sft" / "ray_train").glob("*/checkpoint_manager_snapshot.json")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert json.loads((run_dir / "sft" / "stage.json").read_text())["status"] == "running"
    assert not (run_dir / "sft" / "manifest.json").exists()  # SFT had not finished

    again = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "[graph] data: cached" in out and "[graph] sft: resume" in out, out[-3000:]
    assert "[sft] resumed from step 10 " in out, out[-3000:]
    m = json.loads((run_dir / "sft" / "manifest.json").read_text())["metrics"]
    assert m["steps"] == 20 and len(m["loss_history"]) == 20
    assert json.loads((run_dir / "sft" / "stage.json").read_text())["status"] == "done"


def test_sft_local_runs_the_loop_in_the_command_without_ray_train(cli):
    """`loraforge sft CONFIG --local`: the same loop in the command's own process (one CPU rank here), on the data
    stage's output; the adapter, its manifest and the checkpoints land where a Ray Train run puts them."""
    out = cli["root"] / "local-runs"
    assert cli["invoke"]("tokenize", f"output_dir={out}").exit_code == 0
    result = cli["invoke"]("sft", f"output_dir={out}", "train.max_steps=2", "--local")
    assert result.exit_code == 0, result.output
    folder = last_line(result.output)
    assert folder == (out / "cli" / "sft").resolve()
    m = json.loads((folder / "manifest.json").read_text())["metrics"]
    assert m["steps"] == 2 and m["world_size"] == 1 and m["ranks"][0]["node_id"].startswith("local-")
    assert list((folder / "ray_train" / "sft").glob("checkpoint_*"))
