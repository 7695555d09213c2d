"""The frozen base on a Ray Train worker: loading (full precision, NF4 once per node, ZeRO-3 partitioned),
LoRA attachment, frozen-weight checksums and where each rank's base came from. Torch/PEFT load inside functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipelines.artifacts.manifest import publish_folder, staging_folder
from pipelines.artifacts.models import cache_root
from pipelines.train import targets, worker
from pipelines.train.config import LoraSection, QuantSection, WorkerJob, deepspeed_config, zero_dtype
from pipelines.train.engine import init_deepspeed


def resolve_attention(requested: str, device, flash_installed: bool | None = None) -> str:
    """The attention kernel a worker loads the base with: as configured; auto, flash_attention_2 on a GPU where
    the flash-attn package is installed, else PyTorch's SDPA. flash_attention_2 on a CPU is refused."""
    import importlib.util

    gpu = str(device).startswith("cuda")
    if flash_installed is None:
        flash_installed = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if gpu and flash_installed else "sdpa"
    if requested == "flash_attention_2" and not gpu:
        raise ValueError("train.attn_implementation=flash_attention_2 needs a GPU worker (train.use_gpu=true); "
                         "use auto or sdpa on CPUs")
    return requested


def _from_pretrained(model_dir: str | os.PathLike, dtype: str, quant: QuantSection, quantize: bool = True,
                     attn: str = "sdpa", quant_storage: str | None = None):
    """The bare model, no training preparation. quantize=False loads a folder that is already 4-bit (its
    config.json carries the quantization config) in the same dtype and device as quantizing would have.
    A 4-bit base is placed on the current GPU, else the CPU; quant_storage: the dtype the packed 4-bit weights are
    stored in (ZeRO-3 partitions them as tensors of the compute dtype)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "attn_implementation": attn}
    if quant.load_in_4bit:
        if quantize:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type, bnb_4bit_use_double_quant=quant.double_quant,
                bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
                bnb_4bit_quant_storage=getattr(torch, quant_storage or "uint8"))
        kwargs["dtype"] = getattr(torch, quant.compute_dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if quant.load_in_4bit:
        standard_4bit_layout(model)
    return model


def standard_4bit_layout(model) -> int:
    """Keep every bitsandbytes 4-bit layer in its standard layout; returns how many layers were set.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight on its first inference forward (eval,
    no grad) into a CPU-specific layout and undoes that, lossily ("best-effort restore", re-quantizing absmax),
    when the model is saved. The frozen base then depended on the order of eval passes and saves: a 4-bit base
    saved once per node (`load_quantized_shared`) and every later eval differed from a fresh quantization by
    4e-3 in the logits (0.37 without double quantization), so an adapter's probe logits did not reproduce on
    reload. The standard layout computes the same on every machine, as on AVX2 CPUs and GPUs."""
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


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


def load_base(model_dir: str, dtype: str, quant: QuantSection, gradient_checkpointing: bool, attn: str = "sdpa"):
    """The frozen base: full precision, or NF4 through bitsandbytes (prepared for k-bit training)."""
    return prepare_base(_from_pretrained(model_dir, dtype, quant, attn=attn), quant, gradient_checkpointing)


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
                          barrier, attn: str = "sdpa") -> tuple[Any, str, Path]:
    """A 4-bit base that one process per node quantizes and the others load already packed.

    Local rank 0 quantizes (unless the cache holds this base already) and saves the packed 4-bit model
    (bitsandbytes serialization, safetensors) under cache_dir/<name>-<key>; every rank then meets at `barrier`
    (called exactly once on every rank, so no rank can skip it), and the other ranks load that folder: its
    linear weights are uint8 on disk, so they never materialise them in full precision. The folder is
    published by an atomic rename, so a crash or a second node on a shared filesystem never leaves half a model.
    Returns (unprepared model, "quantized-here" | "prequantized-cache", folder)."""

    folder = Path(cache_dir) / f"{Path(model_dir).name}-{base_cache_key(model_dir, quant)}"
    model, source = None, "prequantized-cache"
    if local_rank == 0 and not folder.is_dir():
        model, source = _from_pretrained(model_dir, quant.compute_dtype, quant, attn=attn), "quantized-here"
        tmp = staging_folder(folder)
        # transformers writes files only on torch.distributed rank 0 (should_save_on_this_rank), whatever
        # is_main_process says: the quantizing rank of a second node is rank >= 1, and got an empty folder
        model.should_save_on_this_rank = lambda is_main_process: True
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            del model.should_save_on_this_rank
        if not list(tmp.glob("*.safetensors")):
            raise RuntimeError(f"{tmp}: saving the 4-bit base wrote no weights")
        publish_folder(tmp, folder, replace=False)  # another node sharing this filesystem may have been first
    barrier()
    if model is None:
        model = _from_pretrained(folder, quant.compute_dtype, quant, quantize=False, attn=attn)
    return model, source, folder


def cache_leader(cache: Path) -> bool:
    """Whether this rank quantizes for its node: the lowest world rank among the ranks on the same Ray node with
    the same cache folder (collective when distributed). Ray Train's local rank groups workers by IP address,
    which two Ray nodes on one machine share; the node id and the folder are what decide who can see the file."""
    import torch.distributed as dist

    mine = (worker.current().node_id(), str(cache.resolve()))
    if not dist.is_initialized():
        return True
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone.index(mine) == dist.get_rank()


def load_worker_base(job: WorkerJob) -> tuple[Any, dict[str, Any]]:
    """The frozen base inside a worker, holding as few full-precision copies per node as the setup allows:

    - QLoRA: quantized once per node (`load_quantized_shared`), cache folder `job.base_cache`, default
      $LORAFORGE_CACHE/quantized-bases (else ~/.cache/loraforge/quantized-bases), resolved on each node;
    - QLoRA under ZeRO-3: the packed 4-bit weights stored as tensors of the compute dtype
      (`bnb_4bit_quant_storage`), which ZeRO-3 partitions over the ranks like any 16-bit parameter;
    - ZeRO-3 with a 16/32-bit base: built inside `deepspeed.zero.Init` (transformers does that while an
      `HfDeepSpeedConfig` is alive), so each rank only ever holds its partition of the weights;
    - DDP or ZeRO-2 with a 16/32-bit base: every worker holds a full replica; that is logged.

    Returns the prepared model and {"base_load", "base_params_total", "base_params_local", "attn_implementation"}."""
    import torch.distributed as dist

    quant, train, gradient_checkpointing = job.quant, job.train, job.train.gradient_checkpointing
    here = worker.current()
    attn = resolve_attention(train.attn_implementation, here.device)
    ds = deepspeed_config(train, job.dtype)
    zero3 = ds is not None and ds["zero_optimization"]["stage"] == 3
    if quant.load_in_4bit and zero3:
        init_deepspeed(train)
        model = _from_pretrained(job.model_dir, quant.compute_dtype, quant, attn=attn,
                                 quant_storage=quant.compute_dtype)
        model, source = prepare_base(model, quant, gradient_checkpointing), "zero3-4bit-partitioned"
    elif quant.load_in_4bit:
        cache = Path(job.base_cache or cache_root() / "quantized-bases")
        cache.mkdir(parents=True, exist_ok=True)
        model, source, _ = load_quantized_shared(
            job.model_dir, quant, cache, local_rank=0 if cache_leader(cache) else 1,
            barrier=dist.barrier if dist.is_initialized() else (lambda: None), attn=attn)
        model = prepare_base(model, quant, gradient_checkpointing)
    elif zero3:
        import copy

        from transformers.integrations import HfDeepSpeedConfig

        init_deepspeed(train)
        keep = HfDeepSpeedConfig(copy.deepcopy(ds))  # transformers holds only a weak reference to it
        model = load_base(job.model_dir, job.dtype, quant, gradient_checkpointing, attn=attn)
        model.hf_deepspeed_config = keep  # alive as long as the model: later ZeRO-3 checks see it too
        source = "zero3-partitioned"
    else:
        model, source = load_base(job.model_dir, job.dtype, quant, gradient_checkpointing, attn=attn), "full"
        if here.world_rank == 0 and here.world_size > 1:
            print(f"[base] each of the {here.world_size} workers holds a full-precision replica of the base "
                  f"({'DDP' if ds is None else 'ZeRO-' + str(ds['zero_optimization']['stage'])} replicates "
                  "parameters); train.deepspeed=zero3 partitions it, quant.load_in_4bit=true stores it in 4 bits",
                  flush=True)
    params = list(model.parameters())
    return model, {"base_load": source, "base_params_total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
                   "base_params_local": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                            for p in params), "attn_implementation": attn}


def start_worker(job: WorkerJob, adapter) -> tuple[Any, int, Any, dict[str, Any]]:
    """The preamble SFT and DPO share on each worker: threads, seed, tokenizer, the frozen base
    (load_worker_base) with `adapter(base)` attached, one dtype under ZeRO-3, and the rank's static facts
    (trainable parameters, where its base came from, its frozen checksum). Returns (tokenizer, pad id, model,
    static)."""
    import torch
    from transformers import AutoTokenizer

    train = job.train
    torch.set_num_threads(max(1, int(round(train.cpus_per_worker * 2))))
    torch.manual_seed(train.seed)
    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    base, info = load_worker_base(job)
    model = adapter(base)
    ds = deepspeed_config(train, job.dtype)
    align_for_zero3(model, ds)
    static = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "lora_target_modules": lora_target_modules(model),
              **per_rank(model, info, frozen_dtype(job))}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, pad_id, model, static


def frozen_dtype(job: WorkerJob) -> str | None:
    """The dtype the frozen weights' checksum reads floating values in: the one DeepSpeed's bf16/fp16 engine casts
    them to, else a QLoRA base's 16-bit compute dtype (bitsandbytes' 4-bit layers cast their frozen bias to the
    input's dtype in place on the first forward; PEFT's fp32 upcast of bf16 weights makes that cast lossless)."""
    ds = zero_dtype(deepspeed_config(job.train, job.dtype))
    if ds is None and job.quant.load_in_4bit and job.compute_dtype() != "float32":
        return job.compute_dtype()
    return ds


def align_for_zero3(model, ds_config: dict | None) -> int:
    """Under ZeRO-3 with bf16/fp16, every floating parameter (PEFT's fp32 adapters, QLoRA's fp32-upcast norms
    and embeddings) in that one dtype before `deepspeed.initialize`: ZeRO-3 gathers partitions in coalesced
    buffers of a single dtype. DeepSpeed keeps the fp32 master copy of the trainable ones in its optimizer.
    Packed 4-bit weights are left as they are. Returns how many parameters were cast."""
    import torch

    target = zero_dtype(ds_config)
    if target is None or ds_config["zero_optimization"]["stage"] != 3:
        return 0
    dtype, n = getattr(torch, target), 0
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and getattr(p, "quant_state", None) is None:
            p.data = p.data.to(dtype)
            n += 1
    return n


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
    """The base with a fresh LoRA adapter on lora.target_modules resolved against this model's own linear layers
    (pipelines.train.targets: all-linear / attention / mlp by structure, an explicit list checked by PEFT's
    matching rule). The resolved names are kept as `lora_target_modules` on the returned model (the manifest
    records them)."""
    import torch
    from peft import LoraConfig, get_peft_model

    names = targets.resolve(lora.target_modules, targets.list_linears(model))
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                  target_modules=list(names), use_rslora=lora.rslora,
                                                  use_dora=lora.dora, task_type="CAUSAL_LM"))
    peft_model.lora_target_modules = names
    return peft_model


def lora_target_modules(model) -> list[str] | None:
    """The target modules of the model's LoRA adapter: attach_lora's resolved list, else what the loaded
    adapter's config names (sorted; PEFT keeps a set); None without an adapter or for a regex."""
    names = getattr(model, "lora_target_modules", None)
    if names is not None:
        return list(names)
    conf = (getattr(model, "peft_config", None) or {}).get("default")
    found = getattr(conf, "target_modules", None)
    return None if found is None or isinstance(found, str) else sorted(found)


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


def checksum(tensors, as_dtype: str | None = None) -> str:
    """sha256 of the exact bytes: equal before/after proves training left the frozen weights alone.
    as_dtype: floating tensors hashed as values of that dtype (DeepSpeed's bf16/fp16 engine casts the frozen
    weights after the first checksum; the same values then give the same bytes). Packed 4-bit weights and any
    other integer tensors are hashed as they are."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for t in tensors:
        packed = getattr(t, "quant_state", None) is not None
        t = t.detach()
        if as_dtype and t.is_floating_point() and not packed:
            t = t.to(getattr(torch, as_dtype))
        h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def per_rank(model, base: dict[str, Any], as_dtype: str | None = None) -> dict[str, Any]:
    """Where each rank's base came from, and its frozen checksum (floating weights as `as_dtype` values, see
    checksum), gathered to every rank (collective); rank 0 writes them into the checkpoint's static.json and
    from there the manifest."""
    import torch.distributed as dist

    here = worker.current()
    mine = {**base, "node_id": here.node_id(), "frozen_checksum": checksum(
        full_tensors([p for p in model.parameters() if not p.requires_grad]), as_dtype)}
    ranks = [mine]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    return {"world_size": here.world_size, "frozen_checksum_before": mine["frozen_checksum"],
            "base_load": mine["base_load"], "attn_implementation": mine.get("attn_implementation"), "ranks": ranks}
