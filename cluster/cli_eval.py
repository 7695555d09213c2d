"""CLI commands of the eval area, added to the `loraforge` app by cluster.cli. Heavy imports stay inside commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app (none yet)."""
