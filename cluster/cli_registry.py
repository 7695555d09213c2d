"""`loraforge registry …`: versioned adapters and models (list, show, promote, rollback).

    loraforge registry list --root registry
    loraforge registry promote city 3 production --reason "gate passed by hand" --root registry
"""

from __future__ import annotations

import json

import typer

from pipelines.artifacts.registry import Registry

registry_app = typer.Typer(add_completion=False, no_args_is_help=True,
                           help="Versioned adapters and models: list, show, promote, rollback.")
# A str, not a Path: Path("s3://bucket/reg") collapses to "s3:/bucket/reg", a local folder
ROOT = typer.Option("registry", "--root", help="Registry folder, or an object-store URI (s3://bucket/prefix).")


def registry_list(root: str = ROOT,
                  as_json: bool = typer.Option(False, "--json", help="One JSON list, last line.")) -> None:
    """Registered names with their versions and aliases."""
    rows = Registry(root).list()
    for r in rows:
        aliases = ", ".join(f"{a}→{v}" for a, v in sorted(r["aliases"].items())) or "-"
        typer.echo(f"{r['name']:<24} {r['kind']:<16} versions {r['versions']}  aliases {aliases}")
    if as_json:
        print(json.dumps(rows))


def registry_show(name: str = typer.Argument(..., help="Registered name."), root: str = ROOT) -> None:
    """Versions (lineage, hash, variants), aliases and alias history of one name, as JSON."""
    print(json.dumps(Registry(root).show(name), indent=2, default=str))


def registry_promote(name: str = typer.Argument(...), version: int = typer.Argument(...),
                     alias: str = typer.Argument(..., help="e.g. production, candidate"),
                     reason: str = typer.Option("", help="Recorded in the audit log."), root: str = ROOT) -> None:
    """Point an alias at a version (recorded in the audit log)."""
    Registry(root).promote(name, version, alias, reason=reason or "manual promote")
    typer.echo(f"{name}@{alias} -> {version}")


def registry_rollback(name: str = typer.Argument(...), alias: str = typer.Argument(...),
                      reason: str = typer.Option("", help="Recorded in the audit log."), root: str = ROOT) -> None:
    """Move an alias back to the version it pointed at before its last promote."""
    version = Registry(root).rollback(name, alias, reason=reason or "manual rollback")
    typer.echo(f"{name}@{alias} -> {version}")
