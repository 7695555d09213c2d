"""`loraforge submit` and `loraforge jobs …`: the job graph as a Ray job on a cluster, through Ray's Job
Submission API (what `ray job submit` uses).

    loraforge submit configs/quickstart-cpu.yaml --address http://HEAD:8265 [overrides] [--wait]
    loraforge jobs status ID | logs ID [--follow] | stop ID | list       (--address, or RAY_ADDRESS)

The config is validated here first (a bad key exits 2 before anything is uploaded). The job runs
`python -m cluster run CONFIG [overrides]` with this folder as its `working_dir` (`.gitignore`d files are not
uploaded; `.venv*`, `runs/`, `registry/` and caches are excluded in any case), so the config must lie inside it.
Ray 2.60 clusters started with `ray start` require a token (`~/.ray/auth_token` on the head): when this machine
has one (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`) and `RAY_AUTH_MODE` is unset, the client
is switched to token mode, which Ray's own `ray job` client does not do by itself.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from pathlib import Path
from typing import Optional

import typer

from cluster.cli_common import CONFIG, OVERRIDES, fail, load
from cluster.config import ConfigError

jobs_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Ray jobs on a cluster: status, logs, stop, list.")
ADDRESS = typer.Option(None, "--address", help="The cluster's dashboard, e.g. http://HEAD:8265 (default: "
                                               "RAY_ADDRESS, else http://127.0.0.1:8265).")
JOB_ID = typer.Argument(..., help="The submission id `loraforge submit` printed.")

EXCLUDES = [".venv*", "runs", "registry", "mlruns", ".cache", ".pytest_cache", "__pycache__", "*.egg-info",
            "build"]
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def submit(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES, address: Optional[str] = ADDRESS,
           dry_run: bool = typer.Option(False, "--dry-run", help="Submit `run --dry-run`: the cluster prints the "
                                                                 "graph's plan."),
           force: Optional[list[str]] = typer.Option(None, "--force", help="Passed to `run`; repeatable."),
           start: Optional[str] = typer.Option(None, "--from", help="Passed to `run`."),
           until: Optional[str] = typer.Option(None, "--until", help="Passed to `run`."),
           wait: bool = typer.Option(False, "--wait", help="Follow the job's logs until it ends; exit 0 when it "
                                                           "succeeded, 1 when it failed, 130 when stopped."),
           job_id: Optional[str] = typer.Option(None, "--job-id", help="Submission id (default: "
                                                                      "loraforge-<name>-<time>).")) -> None:
    """Submit `loraforge run CONFIG` as a Ray job; the last line printed is its submission id."""
    cfg = load(config, overrides)  # a bad config fails here, before an upload
    root = Path.cwd().resolve()
    try:
        rel = config.resolve().relative_to(root)
    except ValueError:
        raise ConfigError(f"{config}: the config must lie inside the folder uploaded as the job's working_dir "
                          f"({root}); run `loraforge submit` from the repository that holds it") from None
    args = ["python", "-m", "cluster", "run", str(rel), *(overrides or [])]
    args += ["--dry-run"] if dry_run else []
    args += [a for s in (force or []) for a in ("--force", s)]
    args += ["--from", start] if start else []
    args += ["--until", until] if until else []
    entrypoint = shlex.join(args)
    client = _client(address)
    sid = job_id or f"loraforge-{_slug(cfg.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    sid = _submit(client, entrypoint=entrypoint, submission_id=sid,
                  runtime_env={"working_dir": str(root), "excludes": EXCLUDES},
                  metadata={"loraforge_config": str(rel), "loraforge_run": cfg.name})
    typer.secho(f"submitted {sid}: {entrypoint}", err=True, fg="cyan")
    typer.secho(f"  loraforge jobs logs {sid} --follow   |   loraforge jobs status {sid}   |   "
                f"loraforge jobs stop {sid}", err=True)
    if wait:
        code = _follow(client, sid)
        print(sid, flush=True)
        raise typer.Exit(code)
    print(sid, flush=True)


def jobs_status(job_id: str = JOB_ID, address: Optional[str] = ADDRESS) -> None:
    """The job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and, once ended, why."""
    info = _client(address).get_job_info(job_id)
    line = f"{job_id}: {info.status.value}"
    if info.message and info.status.value in TERMINAL:
        line += f" ({info.message})"
    print(line, flush=True)


def jobs_logs(job_id: str = JOB_ID, address: Optional[str] = ADDRESS,
              follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends; exit as "
                                                                       "`submit --wait` does.")) -> None:
    """The job's driver output so far (or streamed with --follow)."""
    client = _client(address)
    if follow:
        raise typer.Exit(_follow(client, job_id))
    print(client.get_job_logs(job_id), end="", flush=True)


def jobs_stop(job_id: str = JOB_ID, address: Optional[str] = ADDRESS) -> None:
    """Ask the cluster to stop the job (its driver gets SIGTERM; `loraforge run` resumes it later)."""
    client = _client(address)
    client.stop_job(job_id)
    for _ in range(60):
        status = client.get_job_status(job_id).value
        if status in TERMINAL:
            break
        time.sleep(1)
    print(f"{job_id}: {status}", flush=True)


def jobs_list(address: Optional[str] = ADDRESS) -> None:
    """Every job the cluster knows: submission id, status, entrypoint."""
    for info in sorted(_client(address).list_jobs(), key=lambda j: j.start_time or 0):
        print(f"{info.submission_id or info.job_id:<40} {info.status.value:<10} {info.entrypoint}", flush=True)


def _submit(client, **job) -> str:
    """submit_job, retried while a just-started head has no job agent yet (HTTP 500 "No available agent")."""
    deadline = time.time() + 60
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def _follow(client, job_id: str) -> int:
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(job_id).value
    while status not in TERMINAL:  # the log stream can end a moment before the status does
        time.sleep(0.5)
        status = client.get_job_status(job_id).value
    typer.secho(f"{job_id}: {status}", err=True, fg="green" if status == "SUCCEEDED" else "red")
    return EXIT_CODES.get(status, 1)


def _client(address: str | None):
    import logging

    use_token_if_present()
    # Ray's packaging logs one INFO/WARNING line per ignored file and default exclude: noise for this command
    logging.getLogger("ray").setLevel(logging.ERROR)
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    if not address.startswith(("http://", "https://")):
        address = f"http://{address}"
    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        fail(f"error: no Ray dashboard answers at {address} ({e}); start the cluster (`ray up cluster.yaml` or "
             "`ray start --head`) or pass --address http://HEAD:8265")


def use_token_if_present() -> None:
    """RAY_AUTH_MODE=token when this machine holds a Ray token and the mode is not set (see the module docstring)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or path.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def _slug(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", name).strip("-") or "run"
