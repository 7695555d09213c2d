"""A checkpoint's pickled files are unpickled on resume only when this machine's key sealed them.

What a resume unpickles, and what confines it:
- our own optimizer/scheduler state (`optimizer.pt`) and RNG state (`rng<rank>.pt`): `torch.load(weights_only=
  True)`, whose unpickler builds tensors and plain containers only;
- DeepSpeed's checkpoint (`ds/*.pt`: module and ZeRO optimizer states): `engine.load_checkpoint` unpickles them
  with `weights_only=False` (its states hold DeepSpeed's own classes), which runs whatever the file says;
- the adapter (`adapter_model.safetensors`) and the loop state (`train_state.json`) are not pickles.
Ray Tune's own experiment state (`tuner.pkl`, the searcher's state), which `Tuner.restore` unpickles, is not a
checkpoint of this loop and is not covered here.

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
from pathlib import Path

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
        try:
            doc = json.loads(s.read_text())
            files, mac = dict(doc["files"]), str(doc["mac"])
        except (ValueError, KeyError, TypeError):
            raise UnsealedState(f"{s}: not a checkpoint seal; refusing to resume from {folder}") from None
        if not hmac.compare_digest(mac, _mac(key, files)):
            raise UnsealedState(f"{s}: this seal was not made with this machine's key ({KEY_ENV} or "
                                f"{cache_root() / 'state.key'}), so the pickled state in {folder} was not written by "
                                f"this run; refusing to unpickle it. Resume on the machine that wrote it (or set "
                                f"{KEY_ENV} to its key), or start the stage over without resuming")
        sealed.update(files)
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or not p.name.endswith(PICKLED):
            continue
        rel = p.relative_to(folder).as_posix()
        if rel not in sealed:
            raise UnsealedState(f"{p}: pickled state that this run did not write (no seal of this machine's key "
                                f"names it); refusing to unpickle it. Remove it, or start the stage over without "
                                f"resuming")
        if _digest(p) != sealed[rel]:
            raise UnsealedState(f"{p}: changed since this run wrote it (its SHA-256 is not the sealed one); refusing "
                                f"to unpickle it. Start the stage over without resuming")
