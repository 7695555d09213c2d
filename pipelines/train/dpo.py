"""DPO stage: preference pairs → the SFT adapter, trained further by Ray Train workers against itself frozen.

    loraforge dpo CONFIG                                   # on this run's SFT adapter and dpo.train_path
    loraforge dpo CONFIG dpo.loss_type=ipo dpo.beta=0.5

Reference model = the SFT model (base + SFT adapter), frozen. Its log-probs are computed ONCE, in a Ray Data pass
before training (`prepare`), and stored beside the tokens: the workers then hold only the policy (half the
memory of a second model or adapter), the reference costs one forward per pair instead of one per pair per
epoch, and it provably cannot drift during training (it is data). The policy starts from the SFT adapter.

Output folder: the DPO adapter, `loss.png` (loss and reward accuracy), `manifest.json` with lineage (parent adapter)
and `metrics.reward_accuracy_history`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipelines.artifacts.location import Location
from pipelines.artifacts.manifest import hash_path, read_manifest, write_manifest
from pipelines.artifacts.models import on_this_node
from pipelines.data.chat import pad_batch, tokenize_messages
from pipelines.data.readers import expand_paths, record_batches
from pipelines.data.rowformats import RowError, apply_columns, parse_raw, to_canonical
from pipelines.schema import MissingInput, actor_gpus, cluster_gpus, torch_device
from pipelines.train import worker
from pipelines.train.base import load_base, start_worker
from pipelines.train.config import DPOSection, TrainSetup, WorkerJob
from pipelines.train.driver import run_stage
from pipelines.train.engine import select_accelerator
from pipelines.train.loop import run_loop
from pipelines.train.losses import LEAN_CHUNK_TOKENS, dpo_loss, hidden_and_head, lean_sequence_logps, sequence_logps


class _PrepareBatch:
    """Ray Data callable class: tokenize pairs and score them under the frozen reference (base + SFT adapter)."""

    def __init__(self, cfg: DPOSection, setup: TrainSetup, sft: Location, device: str = "cpu", store_fs=None):
        import torch
        from peft import PeftModel
        from transformers import AutoTokenizer

        # this actor's node may not have the driver's folders: the base resolved again, the adapter from the store
        model_dir = on_this_node(setup.model_dir, setup.model_name)
        sft_dir = str(sft.on_node(store_fs))
        torch.set_num_threads(1)
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.device = device
        self.model = PeftModel.from_pretrained(load_base(model_dir, setup.dtype, setup.quant, False),
                                               sft_dir).eval()
        if not setup.quant.load_in_4bit:  # a 4-bit base is placed by bitsandbytes where it loads
            self.model.to(device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        out: dict[str, list] = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                                "rejected_labels", "ref_chosen", "ref_rejected", "reason",
                                                "split", "raw")}
        out["source"], out["line"] = list(batch["source"]), list(batch["line"])
        for line, error in zip(batch["raw"], batch["error"]):
            reason, pair = "", None
            try:
                if error:
                    raise RowError(*error.partition(": ")[::2])
                pair = _parse_pair(line, self.cfg.columns)
                prompt = pair["prompt"]
                ch = tokenize_messages(self.tokenizer, prompt + [{"role": "assistant", "content": pair["chosen"]}],
                                       self.cfg.max_length)
                rj = tokenize_messages(self.tokenizer, prompt + [{"role": "assistant", "content": pair["rejected"]}],
                                       self.cfg.max_length)
            except RowError as e:
                reason = str(e)
            out["reason"].append(reason)
            out["raw"].append(line if reason else "")
            if reason:
                for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
                    out[k].append([])
                out["ref_chosen"].append(0.0)
                out["ref_rejected"].append(0.0)
                out["split"].append("")
                continue
            with torch.no_grad():  # the lean form: no [tokens, vocab] logits for the whole sequence
                logps = [float(policy_logps(self.model, {
                    "input_ids": torch.tensor([t.input_ids], device=self.model.device),
                    "labels": torch.tensor([t.labels], device=self.model.device)})[0][0]) for t in (ch, rj)]
            out["chosen_input_ids"].append(ch.input_ids)
            out["chosen_labels"].append(ch.labels)
            out["rejected_input_ids"].append(rj.input_ids)
            out["rejected_labels"].append(rj.labels)
            out["ref_chosen"].append(logps[0])
            out["ref_rejected"].append(logps[1])
            key = json.dumps(pair["prompt"], sort_keys=True).encode()  # pairs of one prompt share a split
            bucket = int(hashlib.sha256(key).hexdigest()[:8], 16) / 0xFFFFFFFF
            out["split"].append("validation" if bucket < self.cfg.validation_fraction else "train")
        return out


def reference_options(cfg: DPOSection, available: float) -> dict[str, float]:
    """What each reference-scoring actor asks Ray for: dpo.reference_num_gpus, else one GPU on a GPU cluster."""
    return {"num_gpus": actor_gpus(cfg.reference_num_gpus, available)}


def _parse_pair(line: str, columns: dict[str, str] | None = None) -> dict[str, Any]:
    """A preference row (prompt/chosen/rejected, or a dialogue pair), its fields mapped by dpo.columns, in its
    normalised form; RowError if not."""
    kind, pair = to_canonical(apply_columns(parse_raw(line), columns or {}, "dpo.columns"), "auto")
    if kind != "preference":
        raise RowError("not_a_pair", f"a {kind} row, expected prompt/chosen/rejected")
    if pair["chosen"].strip() == pair["rejected"].strip():
        raise RowError("identical_pair", "chosen and rejected are the same text")
    return pair


def read_pairs(spec: str, chunk: int = 256):
    """A Ray dataset of the raw records of dpo.train_path (raw, error, source, line) through the data stage's
    readers: any file type it reads (JSONL, JSON arrays, Parquet, CSV, compressed), a file, folder, glob, s3:// or
    a Hugging Face dataset; blocks of `chunk` records so the reference actors share the work."""
    import pyarrow as pa
    import ray

    paths = expand_paths(spec)
    if not paths:
        raise MissingInput(f"dpo.train_path={spec!r} matches no file")
    tables = [pa.table({k: b[k] for k in ("raw", "error", "source", "line")})
              for b in record_batches(paths, list(range(len(paths))), chunk=chunk)]
    if not tables:
        raise MissingInput(f"dpo.train_path={spec!r}: no rows in {', '.join(paths[:3])}")
    return ray.data.from_arrow(tables)


def prepare(cfg: DPOSection, setup: TrainSetup, sft: Location | str | os.PathLike,
            out_dir: str | os.PathLike) -> Path:
    """Tokenize preference pairs and precompute reference log-probs (Ray Data); counts add up, rejects kept.
    The reference actors read the SFT adapter from the store when `sft` has a URI (any node can), and resolve
    model.name again on a node without the driver's model folder (models.on_this_node)."""
    from ray.data.expressions import col

    if not cfg.train_path:
        raise MissingInput("dpo.train_path is not set: point it at a preference JSONL (prompt, chosen, rejected)")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ds = read_pairs(cfg.train_path)
    if cfg.max_pairs:
        ds = ds.limit(cfg.max_pairs)
    options = reference_options(cfg, cluster_gpus())
    sft = Location.of(sft)
    store_fs = sft.reader()[0]  # built here, where the credentials are
    ds = ds.map_batches(_PrepareBatch, fn_constructor_args=(cfg, setup, sft, torch_device(options["num_gpus"]),
                                                            store_fs),
                        concurrency=(1, 2), batch_size=32, batch_format="numpy", **options).materialize()
    rows_in = ds.count()
    rejected = ds.filter(expr=col("reason") != "").select_columns(["reason", "source", "line", "raw"]).take_all()
    cols = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "ref_chosen",
            "ref_rejected"]
    counts = {}
    for split in ("train", "validation"):
        part = ds.filter(expr=col("split") == split).select_columns(cols)
        counts[split] = part.count()
        if counts[split]:
            part.write_parquet(str(out / split))
    if rows_in != counts["train"] + counts["validation"] + len(rejected):
        raise RuntimeError(f"row accounting broke: in={rows_in} kept={counts} rejected={len(rejected)}")
    with open(out / "rejected.jsonl", "w") as fh:
        for r in rejected:
            fh.write(json.dumps({"reason": r["reason"], "source": r["source"], "line": int(r["line"]),
                                 "row": r["raw"]}) + "\n")
    by_reason: dict[str, int] = {}
    for r in rejected:
        by_reason[r["reason"].split(":")[0]] = by_reason.get(r["reason"].split(":")[0], 0) + 1
    write_manifest(out, kind="preference_dataset", inputs={"reference_adapter": str(sft.path)}, config=cfg.model_dump(),
                   metrics={"rows_in": rows_in, "rows_kept": counts["train"] + counts["validation"],
                            "rows_rejected": len(rejected), "rejected_by_reason": by_reason, **counts},
                   extra={"outputs": {s: s for s in counts if counts[s]},
                          "source": {"path": cfg.train_path, "hash": hash_path(cfg.train_path)
                                     if Path(cfg.train_path).is_file() else None}})
    return out


def run(cfg: DPOSection, setup: TrainSetup, sft: Location | str | os.PathLike, data: Location | str | os.PathLike,
        out: Location | str | os.PathLike) -> Path:
    """Train the DPO adapter from the SFT adapter `sft` on the preference dataset `prepare` wrote into `data`;
    write it with a manifest into out's folder. The loop runs with `cfg.optimisation(setup.train)`: train's
    settings, with DPO's own steps / lr / warmup / batch size where set. With store URIs, every worker reads the
    pairs and the adapter from the store, and Ray Train keeps the checkpoints in out/ray_train there. setup.local:
    the loop in this process on one device, without Ray Train (the reference pass still uses Ray Data)."""
    sft, data, out = Location.of(sft), Location.of(data), Location.of(out)
    sft_manifest = read_manifest(sft.path, kind="lora_adapter")
    loop = cfg.optimisation(setup.train)
    job = setup.job(out.child("ray_train").shared, data, train=loop, dpo=cfg, sft=sft)
    return run_stage(train_loop_per_worker, setup, job, out.path, name="dpo", title="DPO",
                     data_kind="preference_dataset",
                     config={"dpo": cfg.model_dump(), "quant": setup.quant.model_dump(), "train": loop.model_dump(),
                             "dtype": setup.dtype, "parent_adapter": str(sft.path)},
                     extra_series={"reward accuracy": "reward_accuracy"},
                     lineage={"parent_adapter": {"path": str(sft.path), "lineage": sft_manifest.get("lineage")}})


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What each worker runs for DPO: the policy is the SFT adapter, trainable; the reference is data."""
    select_accelerator()  # before anything below can import DeepSpeed
    from peft import PeftModel

    job: WorkerJob = config["job"].on_node()  # the base model as this node has it
    cfg, train = job.dpo, job.train
    sft_dir = str(job.sft.on_node(config.get("store_fs")))
    tokenizer, pad_id, model, static = start_worker(
        job, lambda base: PeftModel.from_pretrained(base, sft_dir, is_trainable=True))
    if worker.current().world_rank == 0:
        print(f"[dpo] policy = SFT adapter ({static['trainable_params']:,} trainable parameters), reference "
              "log-probs precomputed", flush=True)

    def loss_fn(m, batch):
        logps, ntok = policy_logps(m, batch, train.loss_chunk_tokens)
        b = batch["ref_chosen"].shape[0]
        out = dpo_loss(logps[:b], logps[b:], batch["ref_chosen"], batch["ref_rejected"], beta=cfg.beta,
                       loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                       chosen_tokens=ntok[:b], rejected_tokens=ntok[b:])
        extras = {"reward_accuracy": out["accuracy"].sum(), "rewards_chosen": out["chosen_rewards"].sum(),
                  "rewards_rejected": out["rejected_rewards"].sum(), "reward_margin": out["margins"].sum()}
        return out["losses"].sum(), b, extras

    def save_extra(folder: str, rank: int) -> None:
        if rank == 0:
            tokenizer.save_pretrained(folder)
            Path(folder, "static.json").write_text(json.dumps(static))

    run_loop(job, model, loss_fn=loss_fn, collate=_collate(pad_id), count_items=lambda b: b["ref_chosen"].shape[0],
             save_extra=save_extra, tag="dpo")


def policy_logps(model, batch: dict[str, Any], chunk_tokens: int = LEAN_CHUNK_TOKENS):
    """Per-sequence sum and count of label-token log-probs of rows (chosen then rejected): the lean loss
    (chunk_tokens > 0), or the plain full-logits `sequence_logps` (0)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    if chunk_tokens > 0:
        hidden, head = hidden_and_head(model, inputs)
        return lean_sequence_logps(hidden, head, batch["labels"], chunk_tokens)
    return sequence_logps(model(**inputs).logits, batch["labels"])


def _collate(pad_id: int):
    def collate(batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        rows = [(list(ids), list(lab)) for ids, lab in zip(batch["chosen_input_ids"], batch["chosen_labels"])]
        rows += [(list(ids), list(lab)) for ids, lab in zip(batch["rejected_input_ids"], batch["rejected_labels"])]
        padded = {k: torch.tensor(v, dtype=torch.long) for k, v in pad_batch(rows, pad_id).items()}
        padded["ref_chosen"] = torch.tensor(batch["ref_chosen"], dtype=torch.float32)
        padded["ref_rejected"] = torch.tensor(batch["ref_rejected"], dtype=torch.float32)
        return padded

    return collate
