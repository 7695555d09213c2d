"""A folder a stage reads or writes: where it is on this machine, and, for a run whose output_dir is an object
store, the same folder in the store, which every node can read (the driver's folders exist on its machine only).

    data = Location("runs/x/data", "s3://bucket/runs/x/data")
    fs, root = data.reader()   # the store's filesystem and path, or (None, the local path)
    data.child("train")        # Location(runs/x/data/train, s3://bucket/runs/x/data/train)

Stages take their inputs and outputs as Locations instead of a local path and a URI passed side by side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipelines.artifacts import storage


@dataclass(frozen=True)
class Location:
    path: Path  # on this machine (the driver's), absolute
    uri: str | None = None  # the same folder in the object store, when the run is there

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).resolve())
        if self.uri is not None:
            if "://" not in self.uri:
                raise ValueError(f"Location.uri must be a store URI (scheme://...), got {self.uri!r}")
            object.__setattr__(self, "uri", self.uri.rstrip("/"))

    @classmethod
    def of(cls, where: Location | str | os.PathLike) -> Location:
        """A Location as given, or a local folder (no store copy) from a path."""
        return where if isinstance(where, Location) else cls(Path(where))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def child(self, name: str) -> Location:
        return Location(self.path / name, f"{self.uri}/{name}" if self.uri else None)

    def local(self) -> Location:
        """The same folder without its store copy (work that stays on this machine)."""
        return Location(self.path)

    @property
    def shared(self) -> str:
        """What a process on any node reads or writes: the store URI when there is one, else the local path."""
        return self.uri or str(self.path)

    def reader(self, store_fs=None):
        """(pyarrow filesystem, root path) to read the folder from any node: the store's (store_fs, when given,
        built where the credentials are) when there is one, else (None, the local path)."""
        if not self.uri:
            return None, str(self.path)
        fs, root = storage.filesystem(self.uri)
        return store_fs or fs, root

    def on_node(self, store_fs=None) -> Path:
        """The folder as this node can read it: the store copy pulled to this node when there is one, else the
        driver's path (a single machine)."""
        if not self.uri:
            return self.path
        return storage.local_copy(self.uri, store_fs)
