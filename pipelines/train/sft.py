"""SFT stage: (Q)LoRA on a frozen base, trained by Ray Train `TorchTrainer` workers fed by Ray Data, with DDP or
DeepSpeed ZeRO, checkpoints that resume after a worker dies, validation and early stopping.

    loraforge sft configs/quickstart-cpu.yaml             # alone, on the data stage's output
    loraforge sft configs/quickstart-cpu.yaml train.max_steps=5 train.num_workers=1   # tiny CPU variant
    loraforge sft CONFIG quant.load_in_4bit=true train.deepspeed=zero2                 # QLoRA under ZeRO-2

Output folder: the PEFT adapter (adapter_config.json + adapter_model.safetensors), the tokenizer with its chat
template, `loss.png`, and `manifest.json` (lineage, config, metrics incl. `loss_history`; `ranks`: per worker, where
its base came from — `base_load` quantized-here / prequantized-cache / zero3-partitioned / full, and `node_id` — its
parameter count held locally, and its frozen checksum; `engine`: ZeRO stage and optimizer offload as DeepSpeed
reports them, and the autocast dtype).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from pipelines.artifacts.location import Location
from pipelines.data.packing import IGNORE_INDEX, attention_inputs
from pipelines.data.packing import collate as pack_collate
from pipelines.train import worker
from pipelines.train.base import attach_lora, checksum, frozen_dtype, full_tensors, start_worker, weight_bytes
from pipelines.train.config import LoraSection, TrainSetup, WorkerJob
from pipelines.train.driver import run_stage
from pipelines.train.engine import select_accelerator
from pipelines.train.loop import run_loop
from pipelines.train.losses import LEAN_CHUNK_TOKENS, hidden_and_head, lean_cross_entropy


def run(setup: TrainSetup, lora: LoraSection, data: Location | str | os.PathLike,
        out: Location | str | os.PathLike) -> Path:
    """Train an adapter on the tokenized dataset in `data` (read from the store by every worker when it has a
    URI); write it with a manifest into out's folder. Ray Train keeps the checkpoints in out/ray_train (in the
    store when out has a URI, where a driver elsewhere resumes from them)."""
    data, out = Location.of(data), Location.of(out)
    job = setup.job(out.child("ray_train").shared, data, lora=lora)
    return run_stage(train_loop_per_worker, setup, job, out.path, name="sft", title="SFT",
                     data_kind="tokenized_dataset",
                     config={"lora": lora.model_dump(), "quant": setup.quant.model_dump(),
                             "train": setup.train.model_dump(), "dtype": setup.dtype})


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What each worker runs for SFT: token-weighted causal-LM loss on assistant tokens."""
    select_accelerator()
    job: WorkerJob = config["job"].on_node()  # the base model as this node has it
    tokenizer, pad_id, model, static = start_worker(job, lambda base: attach_lora(base, job.lora, job.train.seed))
    static.update(weight_bytes(model))
    as_dtype = frozen_dtype(job)
    if worker.current().world_rank == 0:
        print(f"[sft] {static['trainable_params']:,} trainable LoRA parameters; base weights "
              f"{static['base_bytes_loaded'] / 2**20:.1f} MiB as loaded vs {static['base_bytes_bf16'] / 2**20:.1f}"
              f" MiB in bf16", flush=True)

    def save_extra(folder: str, rank: int) -> None:
        frozen = [p for p in model.parameters() if not p.requires_grad]
        static["frozen_checksum_after"] = checksum(full_tensors(frozen), as_dtype)
        logits = probe_logits(model, tokenizer, worker.current().device)  # every rank: collective under ZeRO-3
        if rank == 0:
            from safetensors.torch import save_file

            tokenizer.save_pretrained(folder)
            Path(folder, "static.json").write_text(json.dumps(static))
            save_file({"logits": logits}, str(Path(folder, "probe_logits.safetensors")))

    loss_fn = functools.partial(causal_lm_loss, chunk_tokens=job.train.loss_chunk_tokens,
                                attn=static["attn_implementation"])
    run_loop(job, model, loss_fn=loss_fn, collate=collate_fn(pad_id),
             count_items=count_label_tokens, save_extra=save_extra, tag="sft")


PROBE = "Extract the city and the date: Ana flies to Oslo on 4 June."


def probe_logits(model, tokenizer, device="cpu"):
    """Logits of the trained model on a fixed prompt, saved with the adapter: a reload must reproduce them.
    device: where the model's weights are (the worker's device)."""
    import torch

    ids = torch.tensor([tokenizer(PROBE)["input_ids"]], device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits[0].float().cpu().contiguous()
    model.train(was_training)
    return out


def causal_lm_loss(model, batch, chunk_tokens: int = LEAN_CHUNK_TOKENS, attn: str = "sdpa"):
    """Sum of next-token cross-entropy over label tokens, and their count (the loop divides).
    chunk_tokens > 0: the lean loss (losses.label_logps: label positions only, chunked, recomputed in backward);
    0: the plain loss over the full [tokens, vocab] float32 logits, its reference. attn: the attention kernel
    the model was loaded with, which decides the packed rows' mask (packing.attention_inputs)."""
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = attention_inputs(batch, attn)
    if chunk_tokens > 0:
        hidden, head = hidden_and_head(model, inputs)
        total, n = lean_cross_entropy(hidden, head, labels, chunk_tokens)
        return total, n, {}
    logits = model(**inputs).logits[:, :-1].float()
    target = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total, int((target != IGNORE_INDEX).sum()), {}


def count_label_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def collate_fn(pad_id: int):
    """Model inputs for padded or packed rows (pipelines.data.packing; packed rows carry segment ids, from which
    the loss function builds the mask on the device), plus `num_tokens`: the non-padding tokens, which the loop
    counts for throughput and the loss function drops before the forward."""

    def collate(batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        out = pack_collate(batch, pad_id, mask="segments")
        out["num_tokens"] = torch.tensor(sum(len(x) for x in batch["input_ids"]) if "seq_lens" not in batch
                                         else sum(int(v) for lens in batch["seq_lens"] for v in lens))
        return out

    return collate
