"""A checkpoint's pickled files are unpickled on resume only when this machine's key sealed them.

What a resume unpickles, and what confines it:
- our own optimizer/scheduler state (`optimizer.pt`) and RNG state (`rng<rank>.pt`): `torch.load(weights_only=
  True)`, whose unpickler builds tensors and plain containers only;
- DeepSpeed's checkpoint (`ds/*.pt`: module and ZeRO optimizer states): `engine.load_checkpoint` unpickles them
  with `weights_only=False` (its states hold DeepSpeed's own classes), which runs whatever the file says;
- the adapter (`adapter_model.safetensors`) and the loop state (`train_state.json`) are not pickles.
Ray Tune's own experiment state, which `Tuner.restore` unpickles (`tuner.pkl`, the searcher's `searcher-state-*.pkl`,
`experiment_state-*.json`, whose trials are cloudpickled inside, a trial's `params.pkl` / `error.pkl`), gets the
same rule from tune.sweep: `seal_tune` after every fit of a sweep (finished, interrupted or failed), `verify_tune`
before `Tuner.restore` (TUNE_SEAL; an experiment in a store is read through its pyarrow filesystem).

So every rank seals the files it wrote into a checkpoint (`seal<rank>.json`: each file's SHA-256, with an
HMAC-SHA256 over them under this machine's key), and before anything is loaded on resume every pickle file in the
checkpoint must be named by a seal whose MAC verifies, with the same hash. A checkpoint in a store that someone
else wrote to (a planted `ds/x.pt`, a changed `optimizer.pt`, a seal forged without the key) is refused, naming the
file: a UserError, exit 2. The key is `$LORAFORGE_STATE_KEY`, else `$LORAFORGE_CACHE/state.key` (made once, mode
0600); a driver resuming a run that another machine wrote sets LORAFORGE_STATE_KEY to that machine's key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.artifacts.models import cache_root
from pipelines.schema import UserError

KEY_ENV = "LORAFORGE_STATE_KEY"
PICKLED = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


class UnsealedState(UserError):
    """A checkpoint file that would be unpickled on resume and that this run's key did not seal."""


def machine_key() -> str:
    """The key this machine seals checkpoints with: $LORAFORGE_STATE_KEY, else $LORAFORGE_CACHE/state.key (made
    on first use, readable by its owner only)."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    path = cache_root() / "state.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of this machine made it first
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
    return path.read_text().strip()


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mac(key: str, files: dict[str, str]) -> str:
    return hmac.new(key.encode(), json.dumps(files, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def _pickled(rel: str) -> bool:
    return rel.endswith(PICKLED)


def seal(folder: str | Path, rank: int, key: str) -> None:
    """Seal the files this rank wrote into `folder` (a checkpoint before it is reported)."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): _digest(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and not p.name.startswith("seal")}
    (folder / f"seal{rank}.json").write_text(json.dumps({"files": files, "mac": _mac(key, files)}, indent=1))


def verify(folder: str | Path, key: str) -> None:
    """UnsealedState naming the first pickle file of the checkpoint that no valid seal of `key` covers with its
    present content; nothing is loaded before this passes."""
    folder = Path(folder)
    sealed: dict[str, str] = {}
    for s in sorted(folder.glob("seal*.json")):
        sealed.update(_sealed_files(s.read_bytes(), s, folder, key))
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    _check(sealed, {rel: p for rel, p in files.items() if _pickled(rel)}, _digest, "start the stage over")


def _sealed_files(raw: bytes, where: Any, folder: Any, key: str) -> dict[str, str]:
    """The files a seal names (relative path -> SHA-256), once its MAC verifies under `key`."""
    try:
        doc = json.loads(raw)
        files, mac = dict(doc["files"]), str(doc["mac"])
    except (ValueError, KeyError, TypeError):
        raise UnsealedState(f"{where}: not a seal of loraforge's; refusing to resume from {folder}") from None
    if not hmac.compare_digest(mac, _mac(key, files)):
        raise UnsealedState(f"{where}: this seal was not made with this machine's key ({KEY_ENV} or "
                            f"{cache_root() / 'state.key'}), so the pickled state in {folder} was not written by "
                            f"this run; refusing to unpickle it. Resume on the machine that wrote it (or set "
                            f"{KEY_ENV} to its key), or start over without resuming")
    return files


def _check(sealed: dict[str, str], pickles: dict[str, Any], digest: Callable[[Any], str], fresh: str) -> None:
    """UnsealedState naming the first of `pickles` (relative path -> its location) a seal does not cover as is."""
    for rel, where in sorted(pickles.items()):
        if rel not in sealed:
            raise UnsealedState(f"{where}: pickled state that this run did not write (no seal of this machine's key "
                                f"names it); refusing to unpickle it. Remove it, or {fresh} without resuming")
        if digest(where) != sealed[rel]:
            raise UnsealedState(f"{where}: changed since this run wrote it (its SHA-256 is not the sealed one); "
                                f"refusing to unpickle it. {fresh[0].upper()}{fresh[1:]} without resuming")


# ---------------------------------------------------------------- Ray Tune's experiment state

TUNE_SEAL = "seal-tune.json"


def _tune_pickled(rel: str) -> bool:
    """What Tuner.restore may unpickle: the experiment folder's own .json and .pkl files (Tune downloads and
    reads them all; experiment_state-*.json holds cloudpickled trials) and any pickle in a trial's folder."""
    return rel.endswith(PICKLED) or ("/" not in rel and rel.endswith(".json") and rel != TUNE_SEAL)


def _tune_files(path: str, fs: Any) -> dict[str, Any]:
    """relative path -> (fs, full path) of every file under an experiment folder (local when fs is None)."""
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path):].lstrip("/"): (fs, i.path) for i in infos if i.type == pafs.FileType.File}


def _fs_digest(where: tuple[Any, str]) -> str:
    fs, path = where
    h = hashlib.sha256()
    with fs.open_input_stream(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Shown(tuple):
    """(fs, path) that prints as the path (a store's as its URI, s3://...): the messages name the file."""

    def __str__(self) -> str:
        return _uri(self[0], self[1])


def _uri(fs: Any, path: str) -> str:
    scheme = getattr(fs, "type_name", "local")
    return path if scheme == "local" else f"{scheme}://{path}"


def seal_tune(path: str, key: str, fs: Any = None) -> None:
    """Seal what Tune wrote into the experiment folder `path` (inside `fs`, a pyarrow filesystem; None: local)."""
    listing = _tune_files(path, fs)
    if not listing:  # the fit failed before Tune wrote anything: nothing to restore, nothing to seal
        return
    files = {rel: _fs_digest(w) for rel, w in listing.items() if _tune_pickled(rel)}
    doc = json.dumps({"files": files, "mac": _mac(key, files)}, indent=1).encode()
    if fs is None:
        (Path(path) / TUNE_SEAL).write_bytes(doc)
        return
    with fs.open_output_stream(f"{path}/{TUNE_SEAL}") as fh:
        fh.write(doc)


def verify_tune(path: str, key: str, fs: Any = None) -> None:
    """UnsealedState naming the first file Tuner.restore would unpickle from `path` that this machine's key did
    not seal as it is now; nothing of the experiment is unpickled before this passes."""
    files = {rel: _Shown(w) for rel, w in _tune_files(path, fs).items()}
    seal_at = files.pop(TUNE_SEAL, None)
    sealed = {}
    if seal_at is not None:
        with seal_at[0].open_input_stream(seal_at[1]) as fh:
            sealed = _sealed_files(fh.read(), seal_at, path, key)
    _check(sealed, {rel: w for rel, w in files.items() if _tune_pickled(rel)}, _fs_digest,
           f"start the sweep over (remove {_uri(fs, path)})")
