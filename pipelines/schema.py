"""The base every config section derives from: unknown keys are errors, not silently ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: typed, described, and strict about unknown keys."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
