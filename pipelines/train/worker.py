"""Where the training loop runs: a Ray Train worker (`RayWorker`), or this one process on one device
(`LocalWorker`, `loraforge sft CONFIG --local`). The loop, the engine and the base loader ask `current()` for
rank, device, data shards, checkpoints and reports, never Ray directly, so both run the same code.

A local run does what Ray Train does for one worker: on a GPU `torch.cuda.set_device` and an NCCL process group
(one rank), on a CPU gloo; `prepare_model` moves the model to the device (no DDP wrapper at world size 1);
checkpoints are folders under the stage's storage, kept as Ray Train keeps them (the best `keep` by validation
loss, and the latest).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

_LOCAL: LocalWorker | None = None


def current():
    """The worker this process is: the local one while `LocalWorker.session` is open, Ray Train's inside a
    training function, else this plain process (rank 0 of 1, on its GPU when it has one)."""
    if _LOCAL is not None:
        return _LOCAL
    try:
        return RayWorker()
    except RuntimeError:  # ray.train.get_context outside a training function
        return ProcessWorker()


class ProcessWorker:
    """A process outside any training session (a driver, a Ray task): one rank, its own device."""

    world_rank, world_size = 0, 1

    @property
    def device(self):
        import torch

        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def node_id(self) -> str:
        return "local-" + socket.gethostname()


def collective_device(backend: str | None, device) -> str:
    """Where tensors handed to a collective must live: NCCL reduces CUDA tensors only (Ray Train's group on GPU
    workers is NCCL-only), gloo CPU tensors."""
    return str(device) if backend == "nccl" else "cpu"


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    """A collated batch's tensors on the worker's device (host-pinned copies overlap the transfer)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cpu":
        return batch
    return {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class RayWorker:
    """This process as a Ray Train worker."""

    def __init__(self):
        import ray.train

        self._ctx = ray.train.get_context()

    @property
    def world_rank(self) -> int:
        return self._ctx.get_world_rank()

    @property
    def world_size(self) -> int:
        return self._ctx.get_world_size()

    @property
    def device(self):
        import ray.train.torch

        return ray.train.torch.get_device()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def dataset_shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict[str, Any], folder: str) -> None:
        import ray.train
        from ray.train import Checkpoint

        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def storage(self) -> tuple[Any, str]:
        """(pyarrow filesystem, path) of this run's Ray Train storage."""
        st = self._ctx.get_storage()
        return st.storage_filesystem, st.storage_fs_path


class LocalShard:
    """A split's parquet files read in name order, batched like Ray Data's `iter_torch_batches` with a collate."""

    def __init__(self, folder: Path):
        self.files = sorted(Path(folder).rglob("*.parquet"))

    def iter_torch_batches(self, batch_size: int, collate_fn, drop_last: bool = False) -> Iterator[Any]:
        import pyarrow.parquet as pq

        rest: dict[str, list] | None = None
        for f in self.files:
            table = pq.read_table(f)
            cols = {name: table.column(name).to_pylist() for name in table.column_names}
            rest = cols if rest is None else {k: rest[k] + cols[k] for k in cols}
            while len(next(iter(rest.values()))) >= batch_size:
                yield collate_fn({k: v[:batch_size] for k, v in rest.items()})
                rest = {k: v[batch_size:] for k, v in rest.items()}
        if rest and not drop_last and len(next(iter(rest.values()))):
            yield collate_fn(rest)


@dataclass
class LocalCheckpoint:
    path: Path

    @contextlib.contextmanager
    def as_directory(self):
        yield str(self.path)


@dataclass
class LocalResult:
    """What `fit_local` returns, shaped as Ray Train's Result where the driver reads it."""

    checkpoint: LocalCheckpoint | None
    best_checkpoints: list[tuple[LocalCheckpoint, dict]] = field(default_factory=list)
    error: Exception | None = None


class LocalWorker:
    """This process as the one worker of a run, on `device` (default: cuda when there is one)."""

    def __init__(self, data: dict[str, Path], storage: Path, keep: int, device: str | None = None):
        import torch

        self.data, self.root, self.keep = data, Path(storage), keep
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.world_rank, self.world_size = 0, 1
        self.reports: list[tuple[LocalCheckpoint, dict]] = []

    def node_id(self) -> str:
        return "local-" + socket.gethostname()

    def checkpoint(self) -> LocalCheckpoint | None:
        found = sorted(self.root.glob("checkpoint_*"))
        return LocalCheckpoint(found[-1]) if found else None

    def dataset_shard(self, name: str) -> LocalShard:
        if name not in self.data:
            raise KeyError(name)
        return LocalShard(self.data[name])

    def report(self, metrics: dict[str, Any], folder: str) -> None:
        n = len(sorted(self.root.glob("checkpoint_*"))) + len(self.reports)
        dest = self.root / f"checkpoint_{n:06d}"
        shutil.copytree(folder, dest)
        (dest / "metrics.json").write_text(json.dumps(metrics))
        self.reports.append((LocalCheckpoint(dest), metrics))
        self._prune()

    def _prune(self) -> None:
        """Keep the latest checkpoint and the best `keep` by eval_loss (all of them: the latest `keep`)."""
        latest = self.reports[-1]
        ranked = sorted(self.reports, key=lambda cm: cm[1].get("eval_loss", float("inf"))) \
            if any("eval_loss" in m for _, m in self.reports) else self.reports[::-1]
        kept = {id(cm) for cm in ranked[: self.keep]} | {id(latest)}
        for cm in self.reports:
            if id(cm) not in kept:
                shutil.rmtree(cm[0].path, ignore_errors=True)
        self.reports = [cm for cm in self.reports if id(cm) in kept]

    def prepare_model(self, model):
        return model.to(self.device)

    def storage(self) -> tuple[Any, str]:
        import pyarrow.fs

        return pyarrow.fs.LocalFileSystem(), str(self.root)

    @contextlib.contextmanager
    def session(self):
        """This worker as `current()`, inside a one-rank process group (NCCL on a GPU, gloo on a CPU)."""
        import torch
        import torch.distributed as dist

        global _LOCAL
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device.index or 0)
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", rank=0, world_size=1)
        _LOCAL = self
        try:
            yield self
        finally:
            _LOCAL = None
            _end_process_group()
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    def result(self) -> LocalResult:
        return LocalResult(self.reports[-1][0] if self.reports else None, list(self.reports))


def _end_process_group() -> None:
    """Destroy this process's group, and DeepSpeed's handle on it when DeepSpeed joined it (it keeps the group
    in a module global, and a second local run in the process would find the first run's, destroyed)."""
    import sys

    import torch.distributed as dist

    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None and comm.cdb is not None:
        if comm.is_initialized():
            comm.destroy_process_group()
        comm.cdb = None
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
