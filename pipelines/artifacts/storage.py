"""Where runs and the registry live: a local folder, or an object-store URI (`s3://bucket/prefix`, any filesystem
pyarrow knows) that every node and the next driver can reach.

A URI is worked on through a local mirror, `$LORAFORGE_CACHE/mirror/<scheme>/<bucket>/<prefix>` (stages write
local files, as the libraries they call expect): `pull` fills the mirror from the store, `push` writes a finished
folder back. Ray Train writes its checkpoints to the store directly (a stage's `ray_train/`), so a driver on another
machine resumes from them. S3-compatible stores (MinIO, Ceph, moto) are reached through `AWS_ENDPOINT_URL`
(or `AWS_ENDPOINT_URL_S3`), the variable the AWS SDKs read; credentials come from the usual AWS variables.

    fs, path = filesystem("s3://bucket/runs")
    push(Path("runs/x/sft"), "s3://bucket/runs/x/sft"); pull("s3://bucket/runs/x", mirror("s3://bucket/runs/x"))
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

from pipelines.artifacts.models import cache_root
from pipelines.schema import UserError


class StorageError(UserError):
    """A store URI that cannot be reached or used: the message names it and what to set."""


def is_uri(path: str | os.PathLike | None) -> bool:
    return path is not None and "://" in str(path)


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI; s3 honours AWS_ENDPOINT_URL(_S3) and AWS_DEFAULT_REGION,
    and carries the credentials of this process's environment (Ray workers that get the filesystem object need
    no AWS variables of their own)."""
    import pyarrow.fs as pafs

    scheme, _, rest = str(uri).partition("://")
    if scheme == "s3":
        kwargs: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                          session_token=os.environ.get("AWS_SESSION_TOKEN"))
        return pafs.S3FileSystem(**kwargs), rest.rstrip("/")
    try:
        return pafs.FileSystem.from_uri(str(uri))
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for unknown schemes
        raise StorageError(f"{uri}: not a storage URI pyarrow can open ({e}); use a local path or s3://bucket/prefix")


def mirror(uri: str) -> Path:
    """The local mirror folder of a URI."""
    scheme, _, rest = str(uri).partition("://")
    parts = [p for p in rest.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StorageError(f"{uri}: '.' and '..' are not allowed in a storage URI")
    return cache_root() / "mirror" / scheme / Path(*parts)


def _files(fs, path: str):
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [info]
    return [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]


def pull(uri: str, local: Path, skip: tuple[str, ...] = (), fs=None, fresh: bool = False) -> int:
    """Copy what the store holds under `uri` into `local` (files missing here, or changed in the store since they
    were pulled: size or modification time differ); files and folders named in `skip`, at any depth, are left
    out. Returns the number of files copied; 0 when the store has nothing there. fs: the store's filesystem, built
    elsewhere (a Ray worker is given the driver's: its own environment may hold no endpoint or credentials).
    fresh: copy even files that look unchanged. Size and modification time (whole seconds in S3) miss a small
    file rewritten within the same second at the same size: a registry's index.json written again, say, after
    its store was emptied and published into anew (same name, same version number, another hash)."""
    import pyarrow.fs as pafs

    fs, root = (fs, filesystem(uri)[1]) if fs is not None else _checked(uri)
    copied = 0
    for info in _files(fs, root):
        rel = info.path[len(root):].lstrip("/") or Path(info.path).name
        if _skipped(rel, skip):
            continue
        dest = confined(Path(local), rel, f"{uri}: object {info.path!r}")
        mtime = info.mtime.timestamp() if info.mtime else None
        if not fresh and dest.is_file() and dest.stat().st_size == info.size and mtime is not None and \
                int(dest.stat().st_mtime) == int(mtime):
            continue  # pulled before and unchanged since
        dest.parent.mkdir(parents=True, exist_ok=True)
        # two processes of a node, or two threads of one (a server resolves adapters on a pool of threads), may
        # pull the same file at once: each into a name of its own, renamed into place whole
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.pulling")
        try:
            pafs.copy_files(info.path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            if mtime is not None:
                os.utime(tmp, (mtime, mtime))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        copied += 1
    return copied


def confined(root: Path, rel: str, what: str) -> Path:
    """root/rel, refused (StorageError naming `what`) when rel would land outside root: an object key with '..'
    or an absolute part, which a store accepts and a local path would follow out of the mirror."""
    parts = rel.replace("\\", "/").split("/")
    dest = (root / rel).resolve()
    if any(p in ("..", "") for p in parts) or rel.startswith("/") or not dest.is_relative_to(root.resolve()):
        raise StorageError(f"{what}: its key leaves the local mirror ({rel!r}); nothing was pulled from it. Remove "
                           "that object from the store (keys with '..' or empty parts are never written by loraforge)")
    return dest


def local_copy(uri: str, fs=None) -> Path:
    """A folder of the store (an adapter, say) as a folder on this node: pulled into $LORAFORGE_CACHE/fetched/
    (unchanged files are not copied again), for libraries that read local paths. fs: as for pull."""
    import hashlib

    dest = cache_root() / "fetched" / hashlib.sha256(str(uri).encode()).hexdigest()[:20]
    if not pull(uri, dest, fs=fs) and not dest.is_dir():
        raise StorageError(f"{uri}: the store holds nothing there")
    return dest


def push(local: Path, uri: str, skip: tuple[str, ...] = ()) -> int:
    """Copy a local file or folder to the store under `uri` (files and folders named in `skip`, at any depth, left
    out); returns the number of files written."""
    import pyarrow.fs as pafs

    fs, root = _checked(uri)
    local = Path(local)
    files = [local] if local.is_file() else [p for p in sorted(local.rglob("*")) if p.is_file()]
    written = 0
    for f in files:
        rel = f.name if f == local else f.relative_to(local).as_posix()
        if f != local and _skipped(rel, skip):
            continue
        dest = root if f == local else f"{root}/{rel}"
        pafs.copy_files(str(f), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        written += 1
    return written


def exists(uri: str) -> bool:
    """Whether the store holds a file or folder at `uri`."""
    import pyarrow.fs as pafs

    fs, root = _checked(uri)
    return fs.get_file_info(root).type != pafs.FileType.NotFound


def delete(uri: str) -> None:
    """Remove everything under `uri` (nothing there: nothing to do)."""
    import pyarrow.fs as pafs

    fs, root = _checked(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(root)
    elif info.type == pafs.FileType.File:
        fs.delete_file(root)


def _skipped(rel: str, skip: tuple[str, ...]) -> bool:
    return any(part in skip for part in rel.split("/"))


_ANSWERED: set[tuple[str, str]] = set()  # (endpoint, bucket) that answered once in this process


def _checked(uri: str):
    """filesystem(uri), with a store that does not answer turned into a StorageError naming it. The check costs
    a request, so it is made once per endpoint and bucket per process, not before every pull and push."""
    fs, root = filesystem(uri)
    key = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "", root.split("/")[0])
    if key in _ANSWERED:
        return fs, root
    try:
        fs.get_file_info(key[1])
    except OSError as e:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
        raise StorageError(f"{uri}: the store does not answer ({endpoint}: {str(e).splitlines()[0][:200]}); check "
                           "the bucket, AWS_ENDPOINT_URL and the AWS credentials") from None
    _ANSWERED.add(key)
    return fs, root
