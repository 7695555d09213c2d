"""One interface over DDP and DeepSpeed ZeRO (forward, backward, step, save, load), the optimizer, and
DeepSpeed's process group. Used by the loop on every worker; torch/DeepSpeed load inside functions.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from pipelines.train import worker
from pipelines.train.config import TrainSection, zero_dtype


def accelerator_for(device) -> str:
    """DeepSpeed's accelerator for a worker: cuda when its device is a GPU, else cpu."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


def select_accelerator() -> str:
    """Set DS_ACCELERATOR for this worker process from the device it holds (Ray Train's, or the local run's),
    before DeepSpeed is imported: it reads the variable once, at import. A value set by the user wins."""
    if os.environ.get("DS_ACCELERATOR"):
        return os.environ["DS_ACCELERATOR"]
    os.environ["DS_ACCELERATOR"] = accelerator_for(worker.current().device)
    return os.environ["DS_ACCELERATOR"]


def set_matmul_precision(device, tf32: bool) -> None:
    """TF32 for float32 matmuls and convolutions on GPUs when train.tf32 (what HF Trainer's tf32=True sets)."""
    import torch

    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"


def autocast_dtype(device, compute_dtype: str, ds_config: dict | None) -> str | None:
    """The dtype the forward and loss run under autocast, or None: a 16-bit compute dtype on a GPU, as HF
    Trainer's bf16=True/fp16=True. Not on CPUs (bf16 is emulated and slower than float32 there) and not when
    DeepSpeed already casts the module to bf16/fp16 itself."""
    if not str(device).startswith("cuda") or compute_dtype not in ("bfloat16", "float16"):
        return None
    return None if zero_dtype(ds_config) else compute_dtype


def make_optimizer(params, train: TrainSection):
    import torch

    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if train.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=train.lr, weight_decay=train.weight_decay)


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over all ranks, on the device the process group's backend reduces (NCCL: the GPU)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return [float(v) for v in values]
    device = worker.collective_device(dist.get_backend(), worker.current().device)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()



class Engine:
    """One interface over DDP and DeepSpeed: forward model, backward, step, save, load."""

    def __init__(self, model, train, ds_config: dict | None, make_optimizer, make_scheduler,
                 compute_dtype: str = "float32"):
        here = worker.current()
        self.train, self.ds, self.device = train, ds_config is not None, here.device
        set_matmul_precision(self.device, train.tf32)
        self.autocast_dtype = autocast_dtype(self.device, compute_dtype, ds_config)
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        opt = make_optimizer(params)
        sched = make_scheduler(opt)
        if self.ds:
            import deepspeed

            init_deepspeed(train)
            self.model, self.opt, _, self.sched = deepspeed.initialize(
                model=model, optimizer=opt, lr_scheduler=sched, config=ds_config, model_parameters=params)
        else:
            self.model = here.prepare_model(model)
            self.opt, self.sched = opt, sched

    def forward(self, fn, *args):
        """fn(*args) under this engine's autocast (bf16/fp16 on GPUs), e.g. the loss function's forward."""
        import torch

        amp = self.autocast_dtype
        with torch.autocast("cuda", dtype=getattr(torch, amp)) if amp else contextlib.nullcontext():
            return fn(*args)

    @property
    def peft_model(self):
        return self.model.module if hasattr(self.model, "module") else self.model

    def describe(self) -> dict[str, Any]:
        """What the engine really is, read back from it (not from our config): ZeRO stage, where the optimizer
        state lives, which optimizer steps it."""
        if not self.ds:
            return {"engine": "ddp", "autocast": self.autocast_dtype, "zero_stage": 0,
                    "offload_optimizer_device": None, "optimizer_offloaded": False,
                    "optimizer": type(self.opt).__name__}
        offload = self.model.zero_offload_optimizer()
        device = getattr(offload, "device", None) if offload is not None else None
        return {"engine": "deepspeed", "autocast": self.autocast_dtype,
                "zero_stage": int(self.model.zero_optimization_stage()),
                "offload_optimizer_device": getattr(device, "value", device),
                # stage 1/2 call it cpu_offload, stage 3 offload_optimizer
                "optimizer_offloaded": bool(getattr(self.opt, "cpu_offload", getattr(self.opt, "offload_optimizer",
                                                                                    False))),
                "zero_optimizer": type(self.opt).__name__,
                "optimizer": type(getattr(self.opt, "optimizer", self.opt)).__name__}

    def optimizer_state_bytes(self) -> int | None:
        """Bytes of the optimizer's state tensors on this rank (AdamW: two fp32 moments per trainable value;
        8-bit AdamW: one byte each plus block scales); None under DeepSpeed, which keeps its own buffers."""
        import torch

        if self.ds:
            return None
        return sum(v.numel() * v.element_size() for st in self.opt.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))

    def backward(self, loss, last_micro: bool) -> None:
        if self.ds:
            self.model.backward(loss, scale_wrt_gas=False)  # our loss is already weighted over the whole step
            if not last_micro:
                # DeepSpeed counts micro-steps in step() and updates only at its accumulation boundary: every
                # micro-batch must pass through step(), or with grad_accum=N only every N-th optimizer step of
                # ours would update (and the schedule would run N times slower).
                self.model.step()
            return
        sync = contextlib.nullcontext() if last_micro or not hasattr(self.model, "no_sync") else self.model.no_sync()
        with sync:
            loss.backward()

    def step(self) -> None:
        import torch

        if self.ds:
            if not self.model.is_gradient_accumulation_boundary():
                raise RuntimeError("DeepSpeed's micro-step counter is out of step with the loop's accumulation")
            self.model.step()
            return
        torch.nn.utils.clip_grad_norm_(self.params, self.train.max_grad_norm)
        self.opt.step()
        self.sched.step()

    def zero_grad_share(self) -> float:
        """Share of LoRA parameters whose gradient is exactly zero (a 'dying adapter'), before zero_grad."""
        zero = total = 0
        for p in self.params:
            g = p.grad
            if self.ds:
                from deepspeed.utils import safe_get_full_grad

                g = safe_get_full_grad(p)
            if g is not None:
                zero += int((g == 0).sum())
                total += g.numel()
        return zero / total if total else float("nan")

    def zero_grad(self) -> None:
        if not self.ds:
            self.opt.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.sched.get_last_lr()[0])

    def lora_state(self) -> dict[str, Any]:
        """The adapter's weights, gathered from ZeRO-3 partitions where needed (collective: all ranks call)."""
        from peft import get_peft_model_state_dict

        model = self.peft_model
        if self.ds and self.model.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(self.params, modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}

    def save(self, folder: str, rank: int) -> None:
        import torch

        if self.ds:  # every rank writes its optimizer shard; frozen base weights are not copied
            self.model.save_checkpoint(folder, tag="ds", exclude_frozen_parameters=True)
        elif rank == 0:
            torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()},
                       Path(folder) / "optimizer.pt")

    def load(self, folder: str) -> None:
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.ds:
            self.model.load_checkpoint(folder, tag="ds", load_module_strict=False)
            return
        set_peft_model_state_dict(self.peft_model, load_file(str(Path(folder) / "adapter_model.safetensors")))
        # weights_only: our own optimizer state, but still never unpickle arbitrary objects
        state = torch.load(Path(folder) / "optimizer.pt", weights_only=True)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])


def init_deepspeed(train) -> None:
    """DeepSpeed's process group over the one the worker set up (NCCL on GPUs, gloo on CPUs); idempotent."""
    import deepspeed

    _skip_shm_build()
    cuda = accelerator_for(worker.current().device) == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")


def _skip_shm_build() -> None:
    """DeepSpeed's CPU all-reduce kernel is a C++ extension JIT-built on first use (~150 s on 2 cores).
    gloo does the same reduction; build it only when asked (LORAFORGE_DS_SHM=1)."""
    if os.environ.get("LORAFORGE_DS_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
