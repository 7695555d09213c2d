"""SFT stage: LoRA on a frozen base, trained by Ray Train `TorchTrainer` workers fed by Ray Data.

    loraforge sft configs/quickstart-cpu.yaml             # alone, on the data stage's output
    loraforge sft configs/quickstart-cpu.yaml train.max_steps=5 train.num_workers=1   # tiny CPU variant

Output folder: the PEFT adapter (adapter_config.json + adapter_model.safetensors), the tokenizer with its chat
template, `loss.png`, and `manifest.json` (config, input hashes, metrics incl. `loss_history`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines.schema import Section

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]


class LoraSection(Section):
    """The adapter's shape."""

    r: int = Field(16, ge=1, le=256, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["attention", "all-linear"] | list[str] = Field(
        "all-linear", description="'attention', 'all-linear' or an explicit list of module names.")

    def modules(self) -> list[str]:
        if isinstance(self.target_modules, list):
            return self.target_modules
        return ATTENTION if self.target_modules == "attention" else ALL_LINEAR


class TrainSection(Section):
    """The optimisation loop and how many Ray Train workers run it."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(0.5, gt=0, description=(
        "CPUs reserved per worker. Fractional on small machines so Ray Data keeps room to feed them."))
    use_gpu: bool = Field(False, description="One GPU per worker.")
    max_steps: int = Field(60, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Rows per worker per step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (cosine decay after warmup).")
    warmup_steps: int = Field(5, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seed for LoRA init and data order.")
    log_every: int = Field(5, ge=1, description="Print a progress line every N steps.")


def run(lora: LoraSection, train: TrainSection, model_dir: str, data_dir: str | os.PathLike,
        out_dir: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Train an adapter on the tokenized dataset in data_dir; write it with a manifest into out_dir."""
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.manifest import read_manifest, write_manifest

    data_manifest = read_manifest(data_dir, kind="tokenized_dataset")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # num_cpus=0 on the read: trainer workers hold the CPUs, and a read task waiting for a whole CPU would
    # deadlock the stream feeding them (STACK_NOTES). The work then overlaps the workers'.
    ds = ray.data.read_parquet(str(Path(data_dir) / data_manifest["outputs"]["train"]),
                               num_cpus=0)
    loop_config = {"model_dir": model_dir, "lora": lora.model_dump(), "train": train.model_dump(), "dtype": dtype}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker}),
        datasets={"train": ds},
        run_config=RunConfig(name="sft", storage_path=str(out / "ray_train")),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"SFT finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as ckpt:
        for f in Path(ckpt).iterdir():
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, out / f.name)
    metrics = json.loads((out / "train_metrics.json").read_text())
    _plot_loss(metrics["loss_history"], out / "loss.png")
    write_manifest(out, kind="lora_adapter", inputs={"data": str(data_dir), "base_model": model_dir},
                   config={"lora": lora.model_dump(), "train": train.model_dump(), "dtype": dtype},
                   metrics=metrics, extra={"base_model": model_dir,
                                           "data_hash": data_manifest["inputs"]["train"]["hash"]})
    return out


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The loop each Ray Train worker runs: PEFT LoRA on the frozen base, DDP across workers."""
    import ray.train
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from ray.train import Checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    lora, train = LoraSection(**config["lora"]), TrainSection(**config["train"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(round(train.cpus_per_worker * 2))))
    torch.manual_seed(train.seed)
    tokenizer = AutoTokenizer.from_pretrained(config["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(config["model_dir"], dtype=getattr(torch, config["dtype"]))
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.modules(), task_type="CAUSAL_LM"))
    frozen_before = _checksum(p for n, p in model.named_parameters() if not p.requires_grad)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in lora_before.values())
    model = ray.train.torch.prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, train.warmup_steps, train.max_steps)
    shard = ray.train.get_dataset_shard("train")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    losses: list[float] = []
    step, tokens = 0, 0
    model.train()
    while step < train.max_steps:
        for batch in shard.iter_torch_batches(batch_size=train.batch_size, collate_fn=_collate(pad_id)):
            out = model(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss = out.loss.detach()
            if dist.is_initialized():  # the logged loss is the mean over ranks, as the gradient is
                dist.all_reduce(loss)
                loss /= dist.get_world_size()
            losses.append(round(float(loss), 6))
            tokens += int((batch["labels"] != -100).sum())
            if rank == 0 and (step % train.log_every == 0 or step == 1 or step == train.max_steps):
                print(f"[sft] step {step}/{train.max_steps} loss {losses[-1]:.4f} lr {sched.get_last_lr()[0]:.2e}",
                      flush=True)
            if step >= train.max_steps:
                break

    peft_model = model.module if hasattr(model, "module") else model
    frozen_after = _checksum(p for n, p in peft_model.named_parameters() if not p.requires_grad)
    lora_delta = sum(float((p.detach() - lora_before[n]).norm()) for n, p in peft_model.named_parameters()
                     if p.requires_grad)
    metrics = {"steps": step, "loss_first": losses[0], "loss_last": losses[-1], "loss_history": losses,
               "trainable_params": n_trainable, "label_tokens_rank0": tokens,
               "frozen_checksum_before": frozen_before, "frozen_checksum_after": frozen_after,
               "lora_delta_norm": lora_delta}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:  # one copy of the adapter; the other ranks hold identical weights (DDP)
            peft_model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            Path(tmp, "train_metrics.json").write_text(json.dumps(metrics))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report({k: v for k, v in metrics.items() if k != "loss_history"}, checkpoint=checkpoint)


def _collate(pad_id: int):
    def collate(batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from pipelines.formatting import pad_batch

        padded = pad_batch([(list(i), list(l)) for i, l in zip(batch["input_ids"], batch["labels"])], pad_id)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in padded.items()}

    return collate


def _checksum(params) -> str:
    """sha256 of the exact bytes of frozen weights: equal before/after proves training left them alone."""
    import hashlib

    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def _plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over ranks)")
    ax.set_title("SFT loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
