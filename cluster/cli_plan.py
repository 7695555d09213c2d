"""`loraforge plan`: what a config needs per device (memory), per step (time) and per run (cost), before any of it
runs; and the check `run` and `sft` make first, refusing a config that cannot fit what it asks for.

    loraforge plan configs/quickstart-cpu.yaml                       # memory breakdown, step time, cost, GPUs
    loraforge plan configs/quickstart-cpu.yaml --lora                # trainable parameters per target module
    loraforge plan configs/sft-qwen2.5-7b-qlora-1n8g-zero2.yaml train.batch_size=8 --json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import typer

from cluster import plan_render
from cluster.cli_common import CONFIG, OVERRIDES
from cluster.config import load_config
from cluster.plan import GIB, TrainingPlan, plan_training
from cluster.plan_shape import config_of, shape_of
from pipelines.schema import UserError


def plan(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
         lora: bool = typer.Option(False, "--lora", help="Trainable parameters per target module, and in total."),
         as_json: bool = typer.Option(False, "--json", help="The plan as one JSON object.")) -> None:
    """Per-device memory (weights, LoRA, grads, optimizer, activations, logits), step time at a stated MFU, cost
    from the GPU table (cluster/gpus.json), the smallest GPU type × count that fits, and serving memory."""
    cfg = load_config(config, overrides or [])
    if lora:  # any family: the model's own linear layers, listed on the meta device from its config.json
        typer.echo(plan_render.render_lora_config(cfg.model.name, config_of(cfg.model.name, cfg.model.cache_dir),
                                                  cfg.lora.r, cfg.lora.target_modules, cfg.lora.dora))
        return
    p = plan_training(cfg, shape_of(cfg.model.name, cfg.model.cache_dir))
    typer.echo(json.dumps(plan_render.as_json(p, cfg.serve), indent=2) if as_json
               else plan_render.render_training(p, cfg.serve))


def capacity(cfg) -> tuple[float, str] | None:
    """Bytes one device of this run can hold, and what they are; None when that cannot be known here (a remote
    cluster, or GPUs this machine does not have). GPU memory comes from nvidia-smi, which, unlike torch.cuda,
    holds no CUDA context in the driver process."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):  # the workers run elsewhere
        return None
    if cfg.train.use_gpu:
        if not shutil.which("nvidia-smi"):
            return None
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            mib = min(float(v) for v in out.split())
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
        return mib * 2**20, "per GPU (nvidia-smi)"
    import psutil

    return psutil.virtual_memory().total / cfg.train.num_workers, (
        f"of this machine's {psutil.virtual_memory().total / GIB:.1f} GiB RAM per worker (each CPU worker holds "
        "its own copy of the base)")


def check_fits(cfg, source: str = "<config>", echo=None) -> TrainingPlan | None:
    """Print the plan's one-line summary (to stderr, or through `echo`: a command's console while its library
    noise goes to the log); raise UserError with the breakdown when a device cannot hold it. A model whose shape
    is unknown here is not checked (the stage itself will say what is wrong)."""
    try:
        p = plan_training(cfg, shape_of(cfg.model.name, cfg.model.cache_dir))
    except UserError:
        return None
    if echo is None:
        typer.secho(plan_render.summary(p), err=True, fg="cyan")
    else:
        echo(plan_render.summary(p))
    cap = capacity(cfg)
    if cap is not None and p.device_bytes > cap[0]:
        raise UserError("\n".join([
            f"{source}: this run does not fit: {plan_render.size(p.device_bytes)} per "
            f"{'GPU' if cfg.train.use_gpu else 'worker'} > {plan_render.size(cap[0])} {cap[1]}",
            *plan_render.breakdown(p),
            "lower train.batch_size or data.max_length, set train.gradient_checkpointing=true, "
            "quant.load_in_4bit=true, train.deepspeed=zero3, or fewer train.num_workers (CPU)"]))
    return p
