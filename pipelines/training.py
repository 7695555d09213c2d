"""What SFT and DPO share: the adapter, quantization and loop config sections, model setup, DeepSpeed config,
checkpoints, adapter health. Importing this module imports neither torch nor Ray; functions import what they use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.schema import Section

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]
DEEPSPEED_DIR = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"


class LoraSection(Section):
    """The adapter's shape."""

    r: int = Field(16, ge=1, le=256, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["attention", "all-linear"] | list[str] = Field(
        "all-linear", description="'attention', 'all-linear' or an explicit list of module names.")
    rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    dora: bool = Field(False, description="Weight-decomposed LoRA. Trains, but vLLM cannot serve it: serve refuses.")

    def modules(self) -> list[str]:
        if isinstance(self.target_modules, list):
            return self.target_modules
        return ATTENTION if self.target_modules == "attention" else ALL_LINEAR


class QuantSection(Section):
    """QLoRA: the frozen base in 4-bit NF4 through bitsandbytes (CPU backend here, CUDA on clusters)."""

    load_in_4bit: bool = Field(False, description="Load the frozen base in 4-bit (QLoRA).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Dtype of the 4-bit matmuls. bfloat16 on GPUs; float32 is faster on CPUs without bf16.")


class TrainSection(Section):
    """The optimisation loop and how many Ray Train workers run it."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(0.5, gt=0, description=(
        "CPUs reserved per worker. Fractional on small machines so Ray Data keeps room to feed them."))
    use_gpu: bool = Field(False, description="One GPU per worker.")
    max_steps: int = Field(60, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Rows per worker per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (cosine decay after warmup).")
    warmup_steps: int = Field(5, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="torch AdamW, or bitsandbytes 8-bit / paged 8-bit AdamW.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    deepspeed: Literal["none", "zero2", "zero3", "zero2-offload", "zero3-offload"] | str = Field(
        "none", description="DeepSpeed ZeRO config: a name from configs/deepspeed/ or a JSON path; 'none' = DDP.")
    eval_every: int = Field(0, ge=0, description="Validation loss every N steps (0: only at the end, if any).")
    eval_max_batches: int = Field(8, ge=1, description="Validation micro-batches per evaluation, per worker.")
    early_stopping_patience: int = Field(0, ge=0, description="Stop after N evaluations without improvement (0: off).")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (the best by validation loss among them).")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts Ray Train attempts, from the last checkpoint.")
    fail_once_at_step: int | None = Field(None, ge=1, description=(
        "Fault drill: raise once at this step (marker in the storage folder), to exercise recovery."))
    seed: int = Field(0, description="Seed for LoRA init and data order.")
    log_every: int = Field(5, ge=1, description="Print a progress line every N steps.")
    tracking_uri: str | None = Field(None, description=(
        "MLflow tracking URI; default a sqlite store in the stage's output folder. 'off' disables tracking."))

    @field_validator("tracking_uri", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @model_validator(mode="after")
    def _check(self) -> "TrainSection":
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("early_stopping_patience needs eval_every > 0")
        return self


def check_combination(quant: QuantSection, train: TrainSection) -> None:
    """Refuse what does not work, before any worker starts."""
    if quant.load_in_4bit and "zero3" in train.deepspeed:
        raise ValueError(
            "train.deepspeed=zero3 with quant.load_in_4bit: ZeRO-3 partitions every parameter, and bitsandbytes' "
            "packed 4-bit weights (with their per-block quantization state) cannot be sharded and re-gathered on "
            "this stack. Use zero2 for QLoRA (the 4-bit base is small enough to replicate), or zero3 with a "
            "16/32-bit base.")
    if quant.load_in_4bit and train.optimizer != "adamw" and train.deepspeed != "none":
        raise ValueError("bitsandbytes 8-bit optimizers cannot be combined with DeepSpeed ZeRO; use optimizer=adamw")


def deepspeed_config(train: TrainSection, dtype: str) -> dict[str, Any] | None:
    """Load a ZeRO JSON and fill its "auto" fields from the run config."""
    if train.deepspeed == "none":
        return None
    path = Path(train.deepspeed)
    if not path.suffix:
        path = DEEPSPEED_DIR / f"{train.deepspeed}.json"
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed={train.deepspeed!r}: no such file {path}")
    cfg = json.loads(path.read_text())
    fill = {"train_micro_batch_size_per_gpu": train.batch_size, "gradient_accumulation_steps": train.grad_accum,
            "gradient_clipping": train.max_grad_norm}
    for key, value in fill.items():
        if cfg.get(key) == "auto":
            cfg[key] = value
    cfg["train_batch_size"] = train.batch_size * train.grad_accum * train.num_workers
    for key, on in (("bf16", dtype == "bfloat16"), ("fp16", dtype == "float16")):
        if isinstance(cfg.get(key), dict) and cfg[key].get("enabled") == "auto":
            cfg[key]["enabled"] = on
    return cfg


def _from_pretrained(model_dir: str | os.PathLike, dtype: str, quant: QuantSection, quantize: bool = True):
    """The bare model, no training preparation. quantize=False loads a folder that is already 4-bit (its
    config.json carries the quantization config) in the same dtype and device as quantizing would have."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if quant.load_in_4bit:
        if quantize:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type, bnb_4bit_use_double_quant=quant.double_quant,
                bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype))
        kwargs["dtype"] = getattr(torch, quant.compute_dtype)
        if not torch.cuda.is_available():
            kwargs["device_map"] = {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)


def prepare_base(model, quant: QuantSection, gradient_checkpointing: bool):
    """Freeze and prepare a loaded base for LoRA training (k-bit preparation under QLoRA)."""
    if quant.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def load_base(model_dir: str, dtype: str, quant: QuantSection, gradient_checkpointing: bool):
    """The frozen base: full precision, or NF4 through bitsandbytes (prepared for k-bit training)."""
    return prepare_base(_from_pretrained(model_dir, dtype, quant), quant, gradient_checkpointing)


def base_cache_key(model_dir: str | os.PathLike, quant: QuantSection) -> str:
    """Identity of a quantized base: the model folder's config.json bytes, each weight file's name, size and
    mtime (hashing the weights themselves would read the whole model on every start), the quant settings and
    the transformers/bitsandbytes versions (their serialization format)."""
    import hashlib
    from importlib.metadata import version

    folder = Path(model_dir)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(quant.model_dump_json().encode())
    h.update(f"transformers=={version('transformers')};bitsandbytes=={version('bitsandbytes')}".encode())
    return h.hexdigest()[:20]


def load_quantized_shared(model_dir: str, quant: QuantSection, cache_dir: str | os.PathLike, *, local_rank: int,
                          barrier) -> tuple[Any, str, Path]:
    """A 4-bit base that one process per node quantizes and the others load already packed.

    Local rank 0 quantizes (unless the cache holds this base already) and saves the packed 4-bit model
    (bitsandbytes serialization, safetensors) under cache_dir/<name>-<key>; every rank then meets at `barrier`
    (called exactly once on every rank, so no rank can skip it), and the other ranks load that folder: its
    linear weights are uint8 on disk, so they never materialise them in full precision. The folder is
    published by an atomic rename, so a crash or a second node on a shared filesystem never leaves half a model.
    Returns (unprepared model, "quantized-here" | "prequantized-cache", folder)."""
    import shutil
    import socket

    folder = Path(cache_dir) / f"{Path(model_dir).name}-{base_cache_key(model_dir, quant)}"
    model, source = None, "prequantized-cache"
    if local_rank == 0 and not folder.is_dir():
        model, source = _from_pretrained(model_dir, quant.compute_dtype, quant), "quantized-here"
        tmp = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another node sharing this filesystem published the same base first
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    if model is None:
        model = _from_pretrained(folder, quant.compute_dtype, quant, quantize=False)
    return model, source, folder


def load_worker_base(config: dict[str, Any], gradient_checkpointing: bool) -> tuple[Any, dict[str, Any]]:
    """The frozen base inside a Ray Train worker, holding as few full-precision copies per node as the setup allows:

    - QLoRA: quantized once per node (`load_quantized_shared`), cache folder `config["base_cache"]`, default
      $LORAFORGE_CACHE/quantized-bases (else ~/.cache/loraforge/quantized-bases), resolved on each node;
    - ZeRO-3 with a 16/32-bit base: built inside `deepspeed.zero.Init` (transformers does that while an
      `HfDeepSpeedConfig` is alive), so each rank only ever holds its partition of the weights;
    - DDP or ZeRO-2 with a 16/32-bit base: every worker holds a full replica; that is logged.

    Returns the prepared model and {"base_load", "base_params_total", "base_params_local"}."""
    import ray.train
    import torch.distributed as dist

    quant, train = QuantSection(**config["quant"]), TrainSection(**config["train"])
    ctx = ray.train.get_context()
    ds = deepspeed_config(train, config["dtype"])
    if quant.load_in_4bit:
        from pipelines.models import cache_root

        cache = Path(config.get("base_cache") or cache_root() / "quantized-bases")
        cache.mkdir(parents=True, exist_ok=True)
        model, source, _ = load_quantized_shared(
            config["model_dir"], quant, cache, local_rank=ctx.get_local_rank(),
            barrier=dist.barrier if dist.is_initialized() else (lambda: None))
        model = prepare_base(model, quant, gradient_checkpointing)
    elif ds is not None and ds["zero_optimization"]["stage"] == 3:
        import copy

        from transformers.integrations import HfDeepSpeedConfig

        from pipelines.loop import init_deepspeed

        init_deepspeed(train)
        keep = HfDeepSpeedConfig(copy.deepcopy(ds))  # transformers holds only a weak reference to it
        model = load_base(config["model_dir"], config["dtype"], quant, gradient_checkpointing)
        model.hf_deepspeed_config = keep  # alive as long as the model: later ZeRO-3 checks see it too
        source = "zero3-partitioned"
    else:
        model, source = load_base(config["model_dir"], config["dtype"], quant, gradient_checkpointing), "full"
        if ctx.get_world_rank() == 0 and ctx.get_world_size() > 1:
            print(f"[base] each of the {ctx.get_world_size()} workers holds a full-precision replica of the base "
                  f"({'DDP' if ds is None else 'ZeRO-' + str(ds['zero_optimization']['stage'])} replicates "
                  "parameters); train.deepspeed=zero3 partitions it, quant.load_in_4bit=true stores it in 4 bits",
                  flush=True)
    params = list(model.parameters())
    return model, {"base_load": source, "base_params_total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
                   "base_params_local": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                            for p in params)}


def full_tensors(params):
    """Each parameter as a full tensor, one at a time: ZeRO-3 keeps only a partition on each rank, and
    gathering one parameter at a time never rebuilds the whole model. Collective under ZeRO-3: all ranks
    must consume the generator in full."""
    for p in params:
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                yield p.detach()
        else:
            yield p.detach()


def attach_lora(model, lora: LoraSection, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.modules(), use_rslora=lora.rslora,
                                            use_dora=lora.dora, task_type="CAUSAL_LM"))


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the frozen base weights as loaded and in bf16, overall and for the 4-bit-quantized ones alone
    (embeddings and norms stay in full precision under QLoRA, and dominate a tiny model)."""
    out = {"base_bytes_loaded": 0, "base_bytes_bf16": 0, "quantized_bytes_loaded": 0, "quantized_bytes_bf16": 0}
    for _, p in model.named_parameters():
        if p.requires_grad:
            continue
        qs = getattr(p, "quant_state", None)
        full = getattr(p, "ds_numel", p.numel())  # ZeRO-3: the whole parameter, not this rank's partition
        n = int(qs.shape.numel()) if qs is not None else full
        out["base_bytes_loaded"] += full * p.element_size()
        out["base_bytes_bf16"] += n * 2
        if qs is not None:
            out["quantized_bytes_loaded"] += p.numel() * p.element_size()
            out["quantized_bytes_bf16"] += n * 2
    return out


def make_optimizer(params, train: TrainSection):
    import torch

    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if train.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=train.lr, weight_decay=train.weight_decay)


def checksum(tensors) -> str:
    """sha256 of the exact bytes: equal before/after proves training left the frozen weights alone."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def adapter_health(adapter_dir: str | os.PathLike, model_dir: str) -> dict[str, Any]:
    """Per-layer ||scale·B·A|| / ||W|| from the saved adapter and the base weights (safetensors only)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    conf = json.loads(Path(adapter_dir, "adapter_config.json").read_text())
    r, alpha = conf["r"], conf["lora_alpha"]
    scale = alpha / (r ** 0.5) if conf.get("use_rslora") else alpha / r
    lora = load_file(str(Path(adapter_dir, "adapter_model.safetensors")))
    wanted = {}
    for key, a in lora.items():
        if ".lora_A." in key:
            module = key.split("base_model.model.", 1)[-1].split(".lora_A.")[0]
            wanted[module + ".weight"] = (module, a, lora[key.replace(".lora_A.", ".lora_B.")])
    ratios = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for wkey in set(fh.keys()) & set(wanted):
                module, a, b = wanted[wkey]
                w = fh.get_tensor(wkey).float()
                ratios[module] = float((scale * (b.float() @ a.float())).norm() / (w.norm() + 1e-12))
    vals = list(ratios.values()) or [0.0]
    return {"delta_over_weight": ratios, "delta_over_weight_mean": sum(vals) / len(vals),
            "delta_over_weight_max": max(vals)}


def plot_curves(series: dict[str, list[float]], path: Path, title: str) -> None:
    """One PNG with one line per named series (x = step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in series.items():
        if ys:
            xs = [x for x, _ in ys] if isinstance(ys[0], (list, tuple)) else range(1, len(ys) + 1)
            ax.plot(list(xs), [y[1] if isinstance(y, (list, tuple)) else y for y in ys], label=name)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_to_mlflow(uri: str, experiment: str, params: dict[str, Any], history: dict[str, list],
                  artifacts: Path) -> str:
    """Params, per-step metrics (from the recorded history) and the adapter folder, as one MLflow run."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:  # artifacts beside the store, not in the CWD
        mlflow.create_experiment(experiment, artifact_location=str(artifacts.parent / "mlartifacts"))
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        for name, values in history.items():
            for i, v in enumerate(values):
                step, value = (v[0], v[1]) if isinstance(v, (list, tuple)) else (i + 1, v)
                mlflow.log_metric(name, float(value), step=int(step))
        mlflow.log_artifacts(str(artifacts), artifact_path="adapter")
        return run.info.run_id
