"""What every `loraforge` command shares: its arguments, loading a config (validated, and its inputs checked,
before any Ray work), the one error path, and printing the output folder last.

A user error (`pipelines.schema.UserError`: a config key, a missing or empty input, too many rejected rows, an
artifact that fails its check) prints one message and exits 2; `LORAFORGE_DEBUG=1` shows its traceback too.
Anything else is a bug: its traceback is shown and the exit code is 1.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional

import typer

from cluster import session
from cluster.config import RunConfig, load_config, preflight
from pipelines.schema import UserError

CONFIG = typer.Argument(..., help="Run config YAML (see configs/).")
OVERRIDES = typer.Argument(None, help="dotted.key=value overrides, e.g. train.max_steps=20")
REGISTER = typer.Option(None, "--register", help="Publish the result under this name in registry.root.")


def load(config: Path, overrides: Optional[list[str]], stages: tuple[str, ...] = ()) -> RunConfig:
    """The validated run config, with the local inputs of `stages` checked (raises ConfigError / MissingInput)."""
    cfg = load_config(config, overrides or [])
    preflight(cfg, stages, source=str(config))
    return cfg


def fail(msg: str, code: int = 2) -> NoReturn:
    typer.secho(msg, fg="red", err=True)
    raise typer.Exit(code)


def done(path: Path | str) -> None:
    """Stop the Ray instance this command started, then print the output folder as the last line."""
    session.finish()
    sys.stderr.flush()
    print(Path(path).resolve(), flush=True)


def user_error(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`: itself, or what it wraps (a Ray task's cause, a chained exception, a Ray
    Train worker's failure)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), UserError) else e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
        failures = getattr(e, "worker_failures", None)  # ray.train.TrainingFailedError
        if isinstance(failures, dict):
            todo += list(failures.values())
    return None


def guarded(command: Callable) -> Callable:
    """The one error path, around every command (see the module docstring)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            err = user_error(e)
            if err is None:
                raise
            _user_exit(err)

    return wrapper


def _user_exit(err: UserError) -> NoReturn:
    session.finish()
    if os.environ.get("LORAFORGE_DEBUG") == "1":
        import traceback

        traceback.print_exception(err)
    fail(f"error: {err}")
