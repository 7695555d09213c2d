"""The model registry: named adapters and models, immutable numbered versions, lineage, aliases, an audit log.

    loraforge registry list --root registry
    loraforge registry promote city 3 production --root registry
    Registry("registry").resolve("city@production").path   # what serve/ loads

A file registry (not MLflow's): serving must turn `name@alias` into a local safetensors folder in
microseconds, with no tracking server and no sqlite, and the artifact must be the folder vLLM loads as is.
Layout under root:

    index.json                 the truth: versions (lineage, kind, hash), aliases and their history
    audit.jsonl                append-only: who did what, when, with which reason, whether --force was used
    models/<name>/<version>/   the artifact (read-only files) + registry.json (its lineage)
    .staging/                  publishes in progress; anything here after a crash is garbage

Publishing copies into .staging, renames the folder into models/ (atomic), then replaces index.json
(atomic). A crash before the index is written leaves an orphan folder that no reader sees (readers go by the
index) and that the next writer deletes. A committed version is never changed or renumbered.

In an object store (s3://) writers on different machines share no lock, so every write is conditional
(pipelines.artifacts.store): a publish claims its version by creating `models/<name>/<v>/registry.json` with
`If-None-Match: *` (taken: the next number), uploads the folder, then writes index.json with `If-Match` on the
ETag it read (someone wrote in between: read again, apply the change again, bounded); the audit log is appended
the same way. Two machines publishing at once get two versions, and the index lists both.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import getpass
import json
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import Field

from pipelines.artifacts import storage
from pipelines.artifacts.manifest import MANIFEST, hash_path, read_manifest
from pipelines.artifacts.store import ObjectStore
from pipelines.schema import Section, UserError, redact

# The grammar of names and references, for the registry and for serving alike: a name is NAME_PATTERN (no "..");
# a reference is `name`, `name@<version>` or `name@<alias>`, its selector also NAME_PATTERN. Anchored with \A and
# \Z and matched whole: `$` also matches before a trailing newline, so "city\n" would pass as "city".
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
ALIAS_PATTERN = r"[a-z][a-z0-9_-]{0,31}"
NAME = re.compile(rf"\A{NAME_PATTERN}\Z")
ALIAS = re.compile(rf"\A{ALIAS_PATTERN}\Z")
KINDS = ("lora_adapter", "merged_model", "quantized_model")
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# What each kind must say about where it came from (the rest of Lineage is optional).
# A store write retried after another writer's (compare-and-swap), and version numbers tried for one publish.
CAS_TRIES = 30
CLAIM_TRIES = 100
REQUIRED_LINEAGE = {"lora_adapter": ("base_model", "base_model_hash", "dataset_hash", "config"),
                    "merged_model": ("base_model", "base_model_hash", "source"),
                    "quantized_model": ("source", "config")}


class RegistrySection(Section):
    """Where the registry lives and the name this run's adapter is registered under (the alias a passing gate
    moves is gate.alias)."""

    root: str = Field("registry", description=(
        "Registry folder (index.json, audit.jsonl, models/), or an object-store URI (s3://bucket/prefix) worked on "
        "through a local mirror."))
    name: str | None = Field(None, description="Registered name for this run's adapter; default: the run name.")


class RegistryError(UserError, ValueError):
    """A refused registry operation; the message says why."""


class RegistryCorrupt(RegistryError):
    """index.json cannot be read as a registry (invalid JSON, or not the shape writers make). Not the same as
    "no such name": serving answers it as its own failure (503), never as an unknown model (404)."""


@dataclass(frozen=True)
class ResolvedArtifact:
    name: str
    version: int
    path: Path
    kind: str
    manifest: dict[str, Any]


def check_name(name: str) -> str:
    """`name` if the whole string is NAME_PATTERN without '..' (a trailing newline included: refused), else
    RegistryError."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise RegistryError(f"name {name!r}: must match {NAME_PATTERN} (no '/', no '..')")
    return name


def check_alias(alias: str) -> str:
    """`alias` if the whole string is ALIAS_PATTERN and not all digits (those are versions), else RegistryError."""
    if not isinstance(alias, str) or not ALIAS.fullmatch(alias) or alias.isdigit():
        raise RegistryError(f"alias {alias!r}: must match {ALIAS_PATTERN}")
    return alias


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'name' | 'name@3' | 'name@production' -> (name, selector or None); the selector matches NAME too, so a
    reference holds no '/', no '..' and one '@' at most."""
    name, at, sel = ref.partition("@")
    check_name(name)
    if at and not sel:
        raise RegistryError(f"reference {ref!r}: nothing after '@'")
    if sel and (not NAME.fullmatch(sel) or ".." in sel):
        raise RegistryError(f"reference {ref!r}: the part after '@' must match {NAME_PATTERN} (no '/', no '..')")
    return name, sel or None


def check_artifact(src: Path, kind: str) -> None:
    """Safetensors only: a pickle checkpoint runs code when loaded, so a folder holding one is refused."""
    if kind not in KINDS:
        raise RegistryError(f"kind {kind!r}: expected one of {KINDS}")
    if not src.is_dir():
        raise RegistryError(f"{src}: not a folder")
    files = [p for p in src.rglob("*") if not _not_copied(p.relative_to(src))]
    pickles = [p.name for p in files if p.suffix in PICKLES]
    if pickles:
        raise RegistryError(f"{src}: pickle files {sorted(pickles)} refused; save with safe_serialization=True")
    if not any(p.suffix == ".safetensors" for p in files):
        raise RegistryError(f"{src}: no .safetensors file")
    if kind == "lora_adapter" and not (src / "adapter_config.json").is_file():
        raise RegistryError(f"{src}: a lora_adapter needs adapter_config.json")
    if kind != "lora_adapter" and not (src / "config.json").is_file():
        raise RegistryError(f"{src}: a {kind} needs config.json (a Hugging Face model folder)")


# What a published folder leaves behind: temporary files, and the training run's own state (Ray Train's
# checkpoints, with torch optimizer/RNG state, kept beside the adapter for resuming; not part of the artifact).
NOT_COPIED = ("*.tmp*", "ray_train")


def _not_copied(rel: Path) -> bool:
    return any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in NOT_COPIED)


def _mirrors(path: Path, info: dict[str, Any]) -> bool:
    """Whether a mirror's version folder holds the version the index describes: its registry.json (written last,
    with the content hash) is there and records the index's hash."""
    try:
        return json.loads((path / "registry.json").read_text()).get("hash") == info.get("hash")
    except (OSError, ValueError):
        return False


def _set_aside(path: Path) -> None:
    """A mirror's folder out of the way: renamed (at once, so no reader sees it half removed), then removed."""
    aside = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.stale")
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


class Registry:
    """Reader and writer of one registry folder. Readers take no lock; writers serialise on `.lock`."""

    def __init__(self, root: str | os.PathLike):
        """root: a folder, or an object-store URI (s3://bucket/prefix), worked on through a local mirror: the
        index and audit log are pulled when read, a version folder when resolved. Writes go to the store
        conditionally (see the module's docstring): writers on different machines never overwrite each other."""
        self.remote = str(root) if storage.is_uri(root) else None
        self.root = storage.mirror(self.remote) if self.remote else Path(root).expanduser().resolve()

    # ------------------------------------------------------------------ reading
    def _index(self) -> dict[str, Any]:
        """The index (an empty one when the registry has none yet); RegistryCorrupt naming the file and what is
        wrong when it is not valid JSON or not shaped like one."""
        path = self.root / "index.json"
        if self.remote:
            # always read again: one unchanged-looking index (same size, same second) is another registry's
            if not storage.pull(f"{self.remote}/index.json", self.root, fresh=True):
                path.unlink(missing_ok=True)  # the store has none (now): a copy pulled earlier is not its index
        if not path.is_file():
            return self._no_index(path)
        return _parse_index(path.read_bytes(), path)

    def _no_index(self, where: Any) -> dict[str, Any]:
        """An empty index for a new registry; RegistryCorrupt when version folders exist without one."""
        held = self._version_folders()
        if held:  # the index was lost (a partial copy, a sync tool): an empty view would delete them all
            raise RegistryCorrupt(
                f"{where} is missing, but the registry holds {held} version folder(s) under "
                f"{self.remote or self.root}/models; restore index.json (audit.jsonl records every change) "
                "before any write: nothing was written or deleted")
        return {"format": 1, "models": {}}

    def _version_folders(self) -> int:
        """How many version folders (models/<name>/<version>) the registry holds, here or in its store."""
        if self.remote:
            return 1 if storage.exists(f"{self.remote}/models") else 0
        return sum(1 for f in (self.root / "models").glob("*/*") if f.is_dir())

    def list(self) -> list[dict[str, Any]]:
        """One row per name: kind of the latest version, versions, aliases."""
        rows = []
        for name, entry in sorted(self._index()["models"].items()):
            versions = sorted(int(v) for v in entry["versions"])
            rows.append({"name": name, "kind": entry["versions"][str(versions[-1])]["kind"],
                         "versions": versions, "latest": versions[-1], "aliases": dict(entry["aliases"])})
        return rows

    def show(self, name: str) -> dict[str, Any]:
        """Everything the index knows about a name, plus the variants derived from each version."""
        index = self._index()
        entry = index["models"].get(check_name(name))
        if entry is None:
            raise RegistryError(f"{name!r} is not registered")
        entry = json.loads(json.dumps(entry))
        for v, info in entry["versions"].items():
            info["variants"] = [f"{n}@{w}" for n, e in index["models"].items() for w, i in e["versions"].items()
                                if i["lineage"].get("source") == f"{name}@{v}"]
        return entry

    def resolve(self, ref: str) -> ResolvedArtifact:
        """'name' (latest), 'name@3' or 'name@alias' -> the version's folder. Raises RegistryError if unknown."""
        name, sel = parse_ref(ref)
        entry = self._index()["models"].get(name)
        if entry is None:
            raise RegistryError(f"{ref!r}: {name!r} is not registered")
        if sel is None:
            version = max(int(v) for v in entry["versions"])
        elif sel.isdigit():
            version = int(sel)
        elif sel in entry["aliases"]:
            version = int(entry["aliases"][sel])
        else:
            raise RegistryError(f"{ref!r}: no alias {sel!r} (aliases: {sorted(entry['aliases'])})")
        info = entry["versions"].get(str(version))
        if info is None:
            raise RegistryError(f"{ref!r}: no version {version} (versions: {sorted(map(int, entry['versions']))})")
        path = self.root / "models" / name / str(version)
        if self.remote and not _mirrors(path, info):
            self._pull_version(f"{self.remote}/models/{name}/{version}", path, info)
        manifest_path = path / MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        return ResolvedArtifact(name, version, path, info["kind"], manifest)

    @staticmethod
    def _pull_version(uri: str, path: Path, info: dict[str, Any]) -> None:
        """A version folder of the store into this machine's mirror whole or not at all: pulled beside it, then
        renamed in. Processes of one node share the mirror (an ingress and its engine replicas resolve the same
        version at once); pulled file by file into place, one saw another's registry.json before the weights
        and served a half-pulled folder (a 503 right after a publish). What the mirror held there before (half
        pulled, or another registry's version of that number: a store emptied and published into again, another
        store at the same bucket and prefix) is moved aside and removed, never served or topped up."""
        staging = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.pulling")
        try:
            storage.pull(uri, staging)
            if path.is_dir():
                if _mirrors(path, info):  # another process renamed its whole copy in meanwhile
                    return
                _set_aside(path)
            try:
                os.replace(staging, path)
            except OSError:  # another process renamed its whole copy in first
                if not _mirrors(path, info):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def verify(self, ref: str) -> bool:
        """Recompute a version's content hash and compare it with the one recorded at publish time."""
        art = self.resolve(ref)
        recorded = self._index()["models"][art.name]["versions"][str(art.version)]["hash"]
        return hash_path(art.path, skip=(MANIFEST, "registry.json")) == recorded

    def audit(self) -> list[dict[str, Any]]:
        path = self.root / "audit.jsonl"
        if self.remote:
            storage.pull(f"{self.remote}/audit.jsonl", self.root, fresh=True)
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        """The writer lock of this folder (of this machine's mirror, for a store: writers on other machines are
        kept apart by the store's conditional writes instead)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _commit(self, change: Callable[[dict[str, Any], list[dict[str, Any]]], None]) -> None:
        """Apply `change(index, audit records)` and commit it: the index first (atomically), then the audit
        records (an aborted change logs nothing). Locally under the writer lock, after cleaning up what crashed
        writers left; in a store by compare-and-swap on the index's ETag, `change` applied again to the index
        another writer wrote in between (so it must only edit the index it is given)."""
        if self.remote:
            self._commit_to_store(change)
            return
        index, records = self._index(), []
        self._collect_garbage(index)
        change(index, records)
        self._write_index(index)
        for record in records:
            self._log(**record)

    def _store(self) -> ObjectStore:
        if getattr(self, "_objects", None) is None:  # one boto3 client per registry object
            self._objects = ObjectStore(self.remote)
        return self._objects

    def _store_index(self, store: ObjectStore) -> tuple[dict[str, Any], str | None]:
        """(index, ETag) as the store holds it now; ETag None when there is no index yet."""
        raw, etag = store.get("index.json")
        if raw is None and self._version_folders():  # a first writer creates the index before its version, so
            raw, etag = store.get("index.json")  # read after seeing a version, it is there unless it was lost
        if raw is None:
            return self._no_index(f"{self.remote}/index.json"), None
        return _parse_index(raw, f"{self.remote}/index.json"), etag

    def _commit_to_store(self, change: Callable[[dict[str, Any], list[dict[str, Any]]], None]) -> None:
        store = self._store()
        for attempt in range(CAS_TRIES):
            index, etag = self._store_index(store)
            records: list[dict[str, Any]] = []
            change(index, records)
            body = json.dumps(index, indent=2, sort_keys=True).encode()
            if store.put("index.json", body, if_match=etag, create=etag is None):
                break
            time.sleep(random.uniform(0.02, 0.05 * 2 ** min(attempt, 5)))  # another writer won: read again
        else:
            raise RegistryError(f"{self.remote}/index.json: other writers changed it {CAS_TRIES} times while this "
                                "change was retried; nothing was written by this one: try again")
        self._drop_mirror("index.json")
        self._append_audit(store, records)

    def _append_audit(self, store: ObjectStore, records: list[dict[str, Any]]) -> None:
        """Append to the store's audit log, by compare-and-swap as the index is."""
        if not records:
            return
        lines = "".join(json.dumps(_audit_record(**r), default=str) + "\n" for r in records).encode()
        for attempt in range(CAS_TRIES):
            raw, etag = store.get("audit.jsonl")
            if store.put("audit.jsonl", (raw or b"") + lines, if_match=etag, create=etag is None):
                break
            time.sleep(random.uniform(0.02, 0.05 * 2 ** min(attempt, 5)))
        else:
            raise RegistryError(f"{self.remote}/audit.jsonl: other writers changed it {CAS_TRIES} times while "
                                f"this change was logged; the index holds the change, the log lacks: {records}")
        self._drop_mirror("audit.jsonl")

    def _drop_mirror(self, name: str) -> None:
        """Forget this mirror's copy of a file just written to the store: the next read pulls the store's."""
        with contextlib.suppress(FileNotFoundError):
            (self.root / name).unlink()

    def _write_index(self, index: dict[str, Any]) -> None:
        tmp = self.root / f"index.json.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(json.dumps(index, indent=2, sort_keys=True))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / "index.json")  # readers see the old index or the new one, never half

    def _collect_garbage(self, index: dict[str, Any]) -> None:
        shutil.rmtree(self.root / ".staging", ignore_errors=True)
        for folder in (self.root / "models").glob("*/*"):
            if folder.name not in index["models"].get(folder.parent.name, {}).get("versions", {}):
                _make_writable(folder)
                shutil.rmtree(folder, ignore_errors=True)  # a publish that crashed before its index write

    def _log(self, action: str, **fields: Any) -> None:
        with open(self.root / "audit.jsonl", "a") as fh:
            fh.write(json.dumps(_audit_record(action, **fields), default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def publish(self, name: str, src_folder: str | os.PathLike, kind: str, lineage: dict[str, Any],
                *, note: str = "") -> int:
        """Copy a safetensors folder in as the next version of `name`; returns the version number."""
        check_name(name)
        src = Path(src_folder).expanduser().resolve()
        check_artifact(src, kind)
        missing = [k for k in REQUIRED_LINEAGE[kind] if lineage.get(k) in (None, "", {})]
        if missing:
            raise RegistryError(f"publish {name!r}: lineage lacks {missing} (required for {kind})")
        record = {"name": name, "version": 0, "kind": kind, "lineage": redact(lineage), "hash": "",
                  "source_path": str(src)}
        claimed: list[tuple[int, Path]] = []  # a store publish: (version claimed, folder uploaded)

        def add(index: dict[str, Any], log: list[dict[str, Any]]) -> None:
            entry = index["models"].setdefault(name, {"versions": {}, "aliases": {}, "alias_history": {},
                                                      "next_version": 1})
            if entry["versions"] and entry["versions"][max(entry["versions"], key=int)]["kind"] != kind:
                raise RegistryError(f"publish {name!r}: registered as another kind; use another name")
            version = claimed[0][0] if claimed else self._place(entry["next_version"], src, record)
            entry["versions"][str(version)] = {k: v for k, v in record.items() if k not in ("name", "version")}
            entry["next_version"] = max(int(entry.get("next_version", 1)), version + 1)
            log.append(dict(action="publish", name=name, version=version, kind=kind, hash=record["hash"],
                            note=note))

        with self._writer():
            if self.remote:
                claimed.append(self._claim_and_upload(name, kind, src, record))
            self._commit(add)
            if self.remote:  # the folder uploaded; now in this machine's mirror too
                version, staging = claimed[0]
                dest = self.root / "models" / name / str(version)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.exists():  # what this mirror held under that number before (another registry's)
                    _set_aside(dest)
                os.replace(staging, dest)
        return record["version"]

    def _stage(self, src: Path, record: dict[str, Any]) -> Path:
        """Copy `src` into .staging, its content hash into `record`; the staged folder."""
        staging = self.root / ".staging" / uuid.uuid4().hex
        shutil.copytree(src, staging, ignore=shutil.ignore_patterns(*NOT_COPIED))
        record["hash"] = hash_path(staging, skip=(MANIFEST, "registry.json"))
        return staging

    def _place(self, version: int, src: Path, record: dict[str, Any]) -> int:
        """Local publish, under the writer lock: the folder staged, stamped and renamed into models/ whole."""
        staging = self._stage(src, record)
        record.update(version=version, created=_now())
        (staging / "registry.json").write_text(json.dumps(record, indent=2, default=str))
        _make_read_only(staging)
        dest = self.root / "models" / record["name"] / str(version)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, dest)  # the folder appears whole or not at all
        return version

    def _claim_and_upload(self, name: str, kind: str, src: Path, record: dict[str, Any]) -> tuple[int, Path]:
        """Store publish: claim the first free version number from the index's next_version on by creating its
        registry.json with If-None-Match (a number another writer claimed, committed or not, is skipped), then
        upload the folder's other files; the index names the version only after that (`_commit`). A registry's
        first writer creates an empty index first (If-None-Match), so that a version folder never exists in a
        store without an index: one missing beside version folders is a lost index (RegistryCorrupt)."""
        store = self._store()
        index, etag = self._store_index(store)
        if etag is None:
            store.put("index.json", json.dumps(index, indent=2, sort_keys=True).encode(), create=True)
        self._collect_garbage(index)
        entry = index["models"].get(name)
        if entry and entry["versions"] and entry["versions"][max(entry["versions"], key=int)]["kind"] != kind:
            raise RegistryError(f"publish {name!r}: registered as another kind; use another name")
        staging = self._stage(src, record)
        version = int(entry.get("next_version", 1)) if entry else 1
        for _ in range(CLAIM_TRIES):
            record.update(version=version, created=_now())
            body = json.dumps(record, indent=2, default=str)
            if store.put(f"models/{name}/{version}/registry.json", body.encode(), create=True):
                break
            version += 1
        else:
            raise RegistryError(f"publish {name!r}: versions {version - CLAIM_TRIES}..{version - 1} were all "
                                f"claimed by other writers under {self.remote}/models/{name}; try again")
        (staging / "registry.json").write_text(body)
        _make_read_only(staging)
        storage.push(staging, f"{self.remote}/models/{name}/{version}", skip=("registry.json",))
        return version, staging

    def promote(self, name: str, version: int, alias: str, *, reason: str = "", force: bool = False) -> None:
        """Point `alias` at `version` (remembering where it pointed, for rollback)."""
        check_alias(alias)

        def point(index: dict[str, Any], log: list[dict[str, Any]]) -> None:
            entry = self._entry(index, name)
            if str(int(version)) not in entry["versions"]:
                raise RegistryError(f"promote {name}@{version}: no such version")
            previous = entry["aliases"].get(alias)
            entry["alias_history"].setdefault(alias, []).append(int(version))
            entry["aliases"][alias] = int(version)
            log.append(dict(action="promote", name=name, version=int(version), alias=alias, previous=previous,
                            reason=reason, force=force))

        with self._writer():
            self._commit(point)

    def rollback(self, name: str, alias: str, *, reason: str = "") -> int:
        """Move `alias` back to the version it pointed at before the last promote; returns that version."""
        check_alias(alias)
        back: list[int] = []

        def undo(index: dict[str, Any], log: list[dict[str, Any]]) -> None:
            entry = self._entry(index, name)
            history = entry["alias_history"].get(alias, [])
            if len(history) < 2:
                raise RegistryError(f"rollback {name}@{alias}: no earlier version to roll back to")
            current = history.pop()
            entry["aliases"][alias] = history[-1]
            back[:] = [history[-1]]
            log.append(dict(action="rollback", name=name, alias=alias, version=history[-1], previous=current,
                            reason=reason))

        with self._writer():
            self._commit(undo)
        return back[0]

    def record(self, action: str, **fields: Any) -> None:
        """Append a decision that changed nothing (e.g. a refused gate) to the audit log."""
        with self._writer():
            if self.remote:
                self._append_audit(self._store(), [dict(action=action, **fields)])
            else:
                self._log(action=action, **fields)

    @staticmethod
    def _entry(index: dict[str, Any], name: str) -> dict[str, Any]:
        entry = index["models"].get(check_name(name))
        if entry is None:
            raise RegistryError(f"{name!r} is not registered")
        return entry


def _parse_index(raw: bytes, where: Any) -> dict[str, Any]:
    """index.json's bytes as an index; RegistryCorrupt naming `where` and what is wrong."""
    try:
        index = json.loads(raw.decode())
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise RegistryCorrupt(f"{where}: not valid JSON ({e}); fix or restore it (audit.jsonl records every "
                              "change)") from None
    problem = _index_problem(index)
    if problem:
        raise RegistryCorrupt(f"{where}: {problem}; fix or restore it (audit.jsonl records every change)")
    return index


def _audit_record(action: str, **fields: Any) -> dict[str, Any]:
    return {"time": _now(), "user": _user(), "action": action, **fields}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _index_problem(index: Any) -> str | None:
    """What keeps `index` from being a registry index (the shape `publish` writes), or None."""
    if not isinstance(index, dict):
        return f"the top level is a JSON {type(index).__name__}, expected an object"
    models = index.get("models")
    if not isinstance(models, dict):
        return "'models' is missing or not an object" if models is None else \
            f"'models' is a JSON {type(models).__name__}, expected an object"
    for name, entry in models.items():
        if not isinstance(entry, dict):
            return f"models[{name!r}] is a JSON {type(entry).__name__}, expected an object"
        versions, aliases = entry.get("versions"), entry.get("aliases")
        if not isinstance(versions, dict) or not versions:
            return f"models[{name!r}].versions is missing, empty or not an object"
        for v, info in versions.items():
            if not str(v).isdigit() or not isinstance(info, dict) or not isinstance(info.get("kind"), str):
                return f"models[{name!r}].versions[{v!r}] is not a version record (a number -> object with 'kind')"
        if not isinstance(aliases, dict):
            return f"models[{name!r}].aliases is missing or not an object"
        for alias, v in aliases.items():
            if not str(v).isdigit():
                return f"models[{name!r}].aliases[{alias!r}] is {v!r}, expected a version number"
        for key, kind in (("alias_history", dict), ("next_version", int)):
            if key in entry and not isinstance(entry[key], kind):
                return f"models[{name!r}].{key} is a JSON {type(entry[key]).__name__}, expected {kind.__name__}"
    return None


def lineage_from_manifest(folder: str | os.PathLike, **extra: Any) -> dict[str, Any]:
    """Lineage of a stage's output from its manifest.json: base model + hash, dataset hash, config, metrics."""

    m = read_manifest(folder)
    inputs = m.get("inputs", {})
    recorded = m.get("lineage") or {}  # what the SFT/DPO stages record themselves wins over what is derived here
    lineage = {
        "base_model": m.get("base_model") or inputs.get("base_model", {}).get("path"),
        "base_model_hash": inputs.get("base_model", {}).get("hash"),
        "dataset_hash": m.get("data_hash") or inputs.get("data", {}).get("hash"),
        "config": m.get("config"),
        "stage_kind": m.get("kind"),
        "code_version": m.get("code_version"),
        "source": m.get("source"),
        "parent": m.get("parent_adapter"),
        "eval_scores": {},
    }
    lineage.update({k: v for k, v in recorded.items() if v is not None})
    if recorded.get("data_hash") and not m.get("data_hash"):
        lineage["dataset_hash"] = recorded["data_hash"]
    lineage.update(extra)
    return lineage


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _make_read_only(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o444)


def _make_writable(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        with contextlib.suppress(OSError):
            p.chmod(0o755 if p.is_dir() else 0o644)
