"""Artifact manifests: what a stage wrote, from which inputs (by content hash), with which config.

Every stage leaves `manifest.json` in its output folder; the next stage reads it instead of guessing paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from pipelines.schema import DataError, MissingInput, redact

MANIFEST = "manifest.json"
# The stage command whose output folder holds an artifact of each kind (named in refusals).
MADE_BY = {"curated_dataset": "loraforge curate", "tokenized_dataset": "loraforge tokenize",
           "preference_dataset": "loraforge dpo", "lora_adapter": "loraforge sft",
           "eval_report": "loraforge evaluate", "merged_model": "loraforge merge",
           "quantized_model": "loraforge quantize"}


def hash_path(path: str | os.PathLike, *, skip: tuple[str, ...] = (MANIFEST,),
              keep: Callable[[Path], bool] | None = None) -> str:
    """sha256 over a file, or over a folder's files (relative names and bytes, sorted); `keep` narrows a folder's
    files further (e.g. a model folder's non-weight files)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.name not in skip
                                           and (keep is None or keep(f)))
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


def write_manifest(out_dir: str | os.PathLike, *, kind: str, inputs: dict[str, Any],
                   config: dict[str, Any], metrics: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write `manifest.json` into out_dir; `inputs` maps a role to a path, hashed here, or to {"path", "hash"}
    already hashed (e.g. a model folder's tokenizer files alone)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
        "inputs": {role: dict(p) if isinstance(p, dict) else {"path": str(p), "hash": hash_path(p)}
                   for role, p in inputs.items()},
        "config": config,
        "metrics": metrics or {},
        **(extra or {}),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(redact(doc), indent=2, default=str))
    os.replace(tmp, out / MANIFEST)  # atomic: a reader never sees half a manifest
    return out / MANIFEST


def staging_folder(out: str | os.PathLike) -> Path:
    """An empty sibling of `out` to build a folder in before `publish_folder` moves it into place: same
    filesystem (so the move is a rename), named per host and process (two writers never share one)."""
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def publish_folder(tmp: str | os.PathLike, out: str | os.PathLike, *, replace: bool = True) -> bool:
    """Move a finished folder into place atomically: a reader sees the old folder or the new one, never half of
    one, and a crash leaves only a staging folder behind. This is the one publish the stages (merge, quantize),
    the model cache and the 4-bit base cache use; the registry keeps its own (staging under its writer lock).

    replace=True: an existing `out` is replaced (a rerun of a stage). replace=False: an existing `out` wins (it was
    published first, e.g. by another node on a shared filesystem); `tmp`
    is discarded and False returned."""
    tmp, out = Path(tmp), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if replace and out.exists():
        old = out.with_name(f"{out.name}.old-{socket.gethostname()}-{os.getpid()}")
        os.replace(out, old)  # a rename cannot replace a non-empty folder: move the old one aside first
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return True
    try:
        os.rename(tmp, out)  # fails if out exists and is not empty (POSIX), so the first publisher wins
    except OSError:
        if not out.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


def read_manifest(folder: str | os.PathLike, *, kind: str | None = None) -> dict[str, Any]:
    """A stage's manifest. MissingInput when the folder has none, DataError when it is not JSON or, with `kind`,
    when the artifact is of another kind; each names the folder and the stage whose output is wanted."""
    path = Path(folder) / MANIFEST
    want = f"the output folder of `{MADE_BY[kind]}`" if kind in MADE_BY else "the output folder of a loraforge stage"
    if not path.is_file():
        raise MissingInput(f"{folder}: no {MANIFEST} here; give {want}")
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise DataError(f"{path}: not valid JSON ({e}); rerun the stage that wrote {folder}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: not a manifest (a JSON object); rerun the stage that wrote {folder}")
    if kind is not None and doc.get("kind") != kind:
        raise DataError(f"{path}: expected an artifact of kind {kind!r}, found {doc.get('kind')!r}; give {want}")
    return doc
