"""The base every config section derives from (unknown keys are errors, not silently ignored), and the user-error
classes every stage raises for what a user can fix."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: typed, described, and strict about unknown keys."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class UserError(Exception):
    """Something a user gave us is wrong: a config key, an input file, its rows, an artifact that fails its
    check. The CLI prints the message (which names the file, row or key and what to do) and exits 2, without a
    traceback; anything else is a bug and keeps its traceback."""


class MissingInput(UserError, FileNotFoundError):
    """An input file, folder or glob that does not exist."""


class DataError(UserError, ValueError):
    """Input that exists but cannot be used: no rows, too many rejected rows, rows of mixed kinds."""
