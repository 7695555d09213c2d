"""Artifact manifests: what a stage wrote, from which inputs (by content hash), with which config.

Every stage leaves `manifest.json` in its output folder; the next stage reads it instead of guessing paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def hash_path(path: str | os.PathLike, *, skip: tuple[str, ...] = (MANIFEST,)) -> str:
    """sha256 over a file, or over a folder's files (relative names and bytes, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.name not in skip)
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def code_version() -> str:
    """The git commit of this checkout (with '+dirty' when it has changes), or 'unknown'."""
    here = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_manifest(out_dir: str | os.PathLike, *, kind: str, inputs: dict[str, str],
                   config: dict[str, Any], metrics: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write `manifest.json` into out_dir; `inputs` maps a role to a path, hashed here."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
        "inputs": {role: {"path": str(p), "hash": hash_path(p)} for role, p in inputs.items()},
        "config": config,
        "metrics": metrics or {},
        **(extra or {}),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, out / MANIFEST)  # atomic: a reader never sees half a manifest
    return out / MANIFEST


def read_manifest(folder: str | os.PathLike, *, kind: str | None = None) -> dict[str, Any]:
    """Read a stage's manifest; with `kind`, refuse an artifact of another kind."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST} here; is this the output folder of a loraforge stage?")
    doc = json.loads(path.read_text())
    if kind is not None and doc.get("kind") != kind:
        raise ValueError(f"{path}: expected an artifact of kind {kind!r}, found {doc.get('kind')!r}")
    return doc
