"""SFT stage: (Q)LoRA on a frozen base, trained by Ray Train `TorchTrainer` workers fed by Ray Data, with DDP or
DeepSpeed ZeRO, checkpoints that resume after a worker dies, validation and early stopping.

    loraforge sft configs/quickstart-cpu.yaml             # alone, on the data stage's output
    loraforge sft configs/quickstart-cpu.yaml train.max_steps=5 train.num_workers=1   # tiny CPU variant
    loraforge sft CONFIG quant.load_in_4bit=true train.deepspeed=zero2                 # QLoRA under ZeRO-2

Output folder: the PEFT adapter (adapter_config.json + adapter_model.safetensors), the tokenizer with its chat
template, `loss.png`, and `manifest.json` (lineage, config, metrics incl. `loss_history`; `ranks`: per worker, where
its base came from — `base_load` quantized-here / prequantized-cache / zero3-partitioned / full — its parameter
count held locally, and its frozen checksum; `engine`: ZeRO stage and optimizer offload as DeepSpeed reports them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipelines.training import LoraSection, QuantSection, TrainSection  # noqa: F401  (the stage's config)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "train_state.json", "README.md",
                 "probe_logits.safetensors")


def run(lora: LoraSection, train: TrainSection, model_dir: str, data_dir: str | os.PathLike,
        out_dir: str | os.PathLike, *, dtype: str = "float32", quant: QuantSection | None = None,
        model_id: str | None = None, base_cache: str | os.PathLike | None = None) -> Path:
    """Train an adapter on the tokenized dataset in data_dir; write it with a manifest into out_dir.
    base_cache: where each node keeps the 4-bit base it quantized once (QLoRA); see training.load_worker_base."""
    from pipelines.manifest import read_manifest

    quant = quant or QuantSection()
    data_manifest = read_manifest(data_dir, kind="tokenized_dataset")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    loop_config = {"model_dir": model_dir, "lora": lora.model_dump(), "quant": quant.model_dump(),
                   "train": train.model_dump(), "dtype": dtype, "storage": str(out / "ray_train"),
                   "base_cache": str(base_cache) if base_cache else None}
    result = fit_on_ray(train_loop_per_worker, loop_config, train, quant, data_dir, data_manifest, out, "sft")
    state = export_adapter(result, out)
    finish_stage(out, kind="lora_adapter", state=state, model_dir=model_dir, model_id=model_id,
                 data_dir=data_dir, data_manifest=data_manifest, title="SFT",
                 config={"lora": lora.model_dump(), "quant": quant.model_dump(), "train": train.model_dump(),
                         "dtype": dtype})
    return out


def fit_on_ray(loop, loop_config: dict, train: TrainSection, quant: QuantSection, data_dir, data_manifest: dict,
               out: Path, name: str):
    """Build the TorchTrainer over the data stage's splits and run it; shared by SFT and DPO."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.training import check_combination

    check_combination(quant, train)
    # A fresh stage run starts from scratch: Ray Train would otherwise resume an older run found under the same
    # storage path and name. Resumption after a worker dies happens inside this fit (FailureConfig).
    shutil.rmtree(loop_config["storage"], ignore_errors=True)
    Path(loop_config["storage"]).mkdir(parents=True, exist_ok=True)
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    datasets = {}
    for split in ("train", "validation"):
        rel = data_manifest.get("outputs", {}).get(split)
        if rel:
            # num_cpus=0: the trainer workers hold the CPUs, and a read task waiting for a whole one would
            # deadlock the stream feeding them (STACK_NOTES); the reads overlap the workers instead.
            datasets[split] = ray.data.read_parquet(str(Path(data_dir) / rel), num_cpus=0)
    has_val = "validation" in datasets
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker}),
        datasets=datasets,
        # preserve_order: the same data gives the same batches run after run (reproducible losses, exact resume)
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=name, storage_path=loop_config["storage"],
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=train.keep_checkpoints,
                checkpoint_score_attribute="eval_loss" if has_val else None,
                checkpoint_score_order="min")),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name} finished without a checkpoint: {result.error}")
    return result


def export_adapter(result, out: Path) -> dict[str, Any]:
    """Copy the best checkpoint's adapter (lowest validation loss, else the last) into out; return the last
    checkpoint's training state, which holds the whole history."""
    with result.checkpoint.as_directory() as last:
        state = json.loads((Path(last) / "train_state.json").read_text())
        state["static"] = json.loads((Path(last) / "static.json").read_text())
    best = result.checkpoint
    if result.best_checkpoints and any("eval_loss" in m for _, m in result.best_checkpoints):
        best = min(result.best_checkpoints, key=lambda cm: cm[1].get("eval_loss", float("inf")))[0]
    with best.as_directory() as d:
        best_state = json.loads((Path(d) / "train_state.json").read_text())
        for f in Path(d).iterdir():
            if f.name in ADAPTER_FILES or f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
                shutil.copy2(f, out / f.name)
    state["selected_step"] = best_state["step"]
    return state


def finish_stage(out: Path, *, kind: str, state: dict, model_dir: str, model_id: str | None, data_dir,
                 data_manifest: dict, title: str, config: dict, extra_series: dict | None = None) -> None:
    """Plot, health, MLflow, manifest: the same ending for SFT and DPO."""
    from pipelines.manifest import hash_path, write_manifest
    from pipelines.training import adapter_health, log_to_mlflow, plot_curves

    series = {"train loss": state["loss_history"], "validation loss": state["eval_history"]}
    plot_curves({**series, **(extra_series or {})}, out / "loss.png", f"{title} loss")
    metrics = {"steps": state["step"], "selected_step": state.get("selected_step"),
               "loss_first": state["loss_history"][0], "loss_last": state["loss_history"][-1],
               "loss_history": state["loss_history"], "eval_history": state["eval_history"],
               "best_eval_loss": None if state["best_eval"] == float("inf") else state["best_eval"],
               "stopped_early": state.get("stopped_early", False), "throughput": state.get("throughput"),
               "zero_grad_share": state.get("zero_grad_share"), "engine": state.get("engine"),
               **{f"{k}_history": v for k, v in state.get("extra_history", {}).items()},
               **state.get("static", {}), **adapter_health(out, model_dir)}
    uri = config["train"].get("tracking_uri") or f"sqlite:///{out.parent / 'mlflow.db'}"  # one store per run
    run_id = None
    if uri != "off":
        run_id = log_to_mlflow(uri, f"loraforge-{kind}", {**_flat(config)},
                               {"loss": state["loss_history"], "eval_loss": state["eval_history"],
                                **state.get("extra_history", {})}, out)
    write_manifest(out, kind=kind, inputs={"data": str(data_dir), "base_model": model_dir}, config=config,
                   metrics=metrics,
                   extra={"lineage": {"base_model": model_id or model_dir, "base_model_hash": hash_path(model_dir),
                                      "data_hash": data_manifest["inputs"]["train"]["hash"],
                                      "mlflow": {"tracking_uri": uri, "run_id": run_id}}})


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def setup_worker(config: dict[str, Any]):
    """Per-worker setup shared by SFT and DPO: threads, seed, tokenizer, (4-bit) base + LoRA, frozen checksum."""
    import torch
    from transformers import AutoTokenizer

    from pipelines.training import attach_lora, load_worker_base, weight_bytes

    lora, train = LoraSection(**config["lora"]), TrainSection(**config["train"])
    torch.set_num_threads(max(1, int(round(train.cpus_per_worker * 2))))
    tokenizer = AutoTokenizer.from_pretrained(config["model_dir"])
    model, base = load_worker_base(config, train.gradient_checkpointing)
    model = attach_lora(model, lora, train.seed)
    static = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              **weight_bytes(model), **per_rank(model, base)}
    return tokenizer, model, static


def per_rank(model, base: dict[str, Any]) -> dict[str, Any]:
    """Where each rank's base came from, and its frozen checksum, gathered to every rank (collective); rank 0
    writes them into the checkpoint's static.json and from there the manifest."""
    import ray.train
    import torch.distributed as dist

    from pipelines.training import checksum, full_tensors

    mine = {**base, "frozen_checksum": checksum(full_tensors([p for p in model.parameters() if not p.requires_grad]))}
    ranks = [mine]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    return {"world_size": ray.train.get_context().get_world_size(), "frozen_checksum_before": mine["frozen_checksum"],
            "base_load": mine["base_load"], "ranks": ranks}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs for SFT: token-weighted causal-LM loss on assistant tokens."""
    import ray.train

    from pipelines.loop import run_loop
    from pipelines.training import checksum, full_tensors

    tokenizer, model, static = setup_worker(config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if ray.train.get_context().get_world_rank() == 0:
        print(f"[sft] {static['trainable_params']:,} trainable LoRA parameters; base weights "
              f"{static['base_bytes_loaded'] / 2**20:.1f} MiB as loaded vs {static['base_bytes_bf16'] / 2**20:.1f}"
              f" MiB in bf16", flush=True)

    def save_extra(folder: str, rank: int) -> None:
        frozen = [p for p in model.parameters() if not p.requires_grad]
        static["frozen_checksum_after"] = checksum(full_tensors(frozen))
        logits = probe_logits(model, tokenizer)  # a forward on every rank: collective under ZeRO-3
        if rank == 0:
            from safetensors.torch import save_file

            tokenizer.save_pretrained(folder)
            Path(folder, "static.json").write_text(json.dumps(static))
            save_file({"logits": logits}, str(Path(folder, "probe_logits.safetensors")))

    run_loop(config, model, loss_fn=causal_lm_loss, collate=collate_fn(pad_id, config["dtype"]), count_items=count_label_tokens,
             save_extra=save_extra, tag="sft")


PROBE = "Extract the city and the date: Ana flies to Oslo on 4 June."


def probe_logits(model, tokenizer):
    """Logits of the trained model on a fixed prompt, saved with the adapter: a reload must reproduce them."""
    import torch

    ids = torch.tensor([tokenizer(PROBE)["input_ids"]])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits[0].float().cpu().contiguous()
    model.train(was_training)
    return out


def causal_lm_loss(model, batch):
    """Sum of next-token cross-entropy over label tokens, and their count (the loop divides)."""
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}
    logits = model(**inputs).logits[:, :-1].float()
    target = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total, int((target != -100).sum()), {}


def count_label_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def collate_fn(pad_id: int, dtype: str = "float32"):
    """Model inputs for padded or packed rows (pipelines.packing), plus `num_tokens`: the non-padding tokens,
    which the loop counts for throughput and the loss function drops before the forward."""

    def collate(batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from pipelines.packing import collate as pack_collate

        out = pack_collate(batch, pad_id, dtype=getattr(torch, dtype))
        out["num_tokens"] = torch.tensor(sum(len(x) for x in batch["input_ids"]) if "seq_lens" not in batch
                                         else sum(int(v) for lens in batch["seq_lens"] for v in lens))
        return out

    return collate
