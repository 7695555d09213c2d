"""DPO stage (the align stage): preference data → the SFT adapter, trained further by Ray Train workers with one
of the preference methods of dpo.method:

    dpo    sigmoid DPO / IPO / cDPO against the SFT model frozen                 (pairs)
    orpo   SFT loss + odds-ratio term, no reference model, may start from the base (pairs)
    simpo  length-normalised reward with a target margin, no reference model      (pairs)
    kto    unpaired desirable / undesirable rows against the frozen reference    (prompt/completion/label rows,
           or pairs, each giving one of each)

    loraforge dpo CONFIG                                   # on this run's SFT adapter and dpo.train_path
    loraforge dpo CONFIG dpo.loss_type=ipo dpo.beta=0.5
    loraforge dpo CONFIG dpo.method=orpo dpo.start=base    # a fresh LoRA adapter on the base, no SFT stage

Reference model (dpo, kto) = the start model (base + SFT adapter, or the base with dpo.start=base), frozen. Its
log-probs are computed ONCE, in a Ray Data pass before training (`prepare`), and stored beside the tokens: the
workers then hold only the policy (half the memory of a second model or adapter), the reference costs one forward
per row instead of one per row per epoch, and it provably cannot drift during training (it is data). KTO's
mismatched KL sequences are fixed and scored in the same pass. ORPO and SimPO have no reference: the pass only
tokenizes. The policy starts from the SFT adapter (dpo.start=sft) or a fresh one on the base.

Output folder: the aligned adapter, `loss.png` (loss, reward accuracy, the method's own series), `manifest.json`
with lineage (parent adapter, or start: base) and `metrics.<name>_history` of every per-step figure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipelines.artifacts.location import Location
from pipelines.artifacts.manifest import hash_path, read_manifest, write_manifest
from pipelines.artifacts.models import on_this_node
from pipelines.data import curate
from pipelines.data.chat import pad_batch, tokenize_messages
from pipelines.data.config import DataConfig
from pipelines.data.readers import expand_paths
from pipelines.data.rowformats import RowError, unpaired_view
from pipelines.schema import DataError, MissingInput, actor_gpus, cluster_gpus, torch_device
from pipelines.train import worker
from pipelines.train.base import attach_lora, load_base, start_worker
from pipelines.train.config import DPOSection, LoraSection, TrainSetup, WorkerJob
from pipelines.train.driver import run_stage
from pipelines.train.engine import all_sum, select_accelerator
from pipelines.train.loop import run_loop
from pipelines.train.losses import (
    LEAN_CHUNK_TOKENS,
    dpo_loss,
    hidden_and_head,
    kto_kl,
    kto_loss,
    lean_sequence_logps,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)

PAIR_COLUMNS = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "ref_chosen",
                "ref_rejected"]
KTO_COLUMNS = ["input_ids", "labels", "label", "kl_input_ids", "kl_labels", "ref", "ref_kl"]


class _PrepareBatch:
    """Ray Data callable class: tokenize preference rows and, for methods with a reference (dpo, kto), score them
    under the frozen reference: base + SFT adapter, or the base alone (start None)."""

    def __init__(self, cfg: DPOSection, setup: TrainSetup, sft: Location | None, device: str = "cpu",
                 store_fs=None):
        import torch
        from transformers import AutoTokenizer

        # this actor's node may not have the driver's folders: the base resolved again, the adapter from the store
        model_dir = on_this_node(setup.model_dir, setup.model_name)
        torch.set_num_threads(1)
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.device = device
        self.model = None
        if cfg.reference:
            base = load_base(model_dir, setup.dtype, setup.quant, False)
            if sft is not None:
                from peft import PeftModel

                base = PeftModel.from_pretrained(base, str(sft.on_node(store_fs)))
            self.model = base.eval()
            if not setup.quant.load_in_4bit:  # a 4-bit base is placed by bitsandbytes where it loads
                self.model.to(device)

    def _logps(self, rows) -> list[float]:
        """Summed completion log-probs of tokenized rows under the reference (0.0 each without one)."""
        import torch

        if self.model is None:
            return [0.0] * len(rows)
        with torch.no_grad():  # the lean form: no [tokens, vocab] logits for the whole sequence
            return [float(policy_logps(self.model, {
                "input_ids": torch.tensor([t.input_ids], device=self.model.device),
                "labels": torch.tensor([t.labels], device=self.model.device)})[0][0]) for t in rows]

    def _turns(self, prompt, answer: str):
        return tokenize_messages(self.tokenizer, prompt + [{"role": "assistant", "content": answer}],
                                 self.cfg.max_length)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Curated rows (their normalised record as JSON, split, source, line) → tokens and reference log-probs;
        a row the chat template cannot fit in dpo.max_length is refused (reason, raw record kept)."""
        if self.cfg.method == "kto":
            return self._unpaired(batch)
        cols = PAIR_COLUMNS + ["reason", "split", "raw", "source", "line", "first"]
        out: dict[str, list] = {k: [] for k in cols}
        for source, number, record, split in zip(batch["source"], batch["line"], batch["record"], batch["split"]):
            reason, pair = "", json.loads(record)
            try:
                ch, rj = self._turns(pair["prompt"], pair["chosen"]), self._turns(pair["prompt"], pair["rejected"])
            except RowError as e:
                reason = str(e)
            out["source"].append(source)
            out["line"].append(number)
            out["first"].append(True)
            out["reason"].append(reason)
            out["raw"].append(record if reason else "")
            if reason:
                for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
                    out[k].append([])
                out["ref_chosen"].append(0.0)
                out["ref_rejected"].append(0.0)
                out["split"].append("")
                continue
            logps = self._logps((ch, rj))
            out["chosen_input_ids"].append(ch.input_ids)
            out["chosen_labels"].append(ch.labels)
            out["rejected_input_ids"].append(rj.input_ids)
            out["rejected_labels"].append(rj.labels)
            out["ref_chosen"].append(logps[0])
            out["ref_rejected"].append(logps[1])
            out["split"].append(split)
        return out

    def _unpaired(self, batch: dict[str, Any]) -> dict[str, Any]:
        """KTO rows: each curated unpaired row (or each side of a curated pair) tokenized, with its mismatched KL
        sequence: its prompt with the completion of the nearest earlier row of this batch whose prompt differs
        (TRL pairs each row with the previous one's completion), both scored under the reference."""
        cols = KTO_COLUMNS + ["reason", "split", "raw", "source", "line", "first"]
        out: dict[str, list] = {k: [] for k in cols}
        kept: list[tuple[dict[str, Any], Any, str]] = []  # (row, tokenized, split) of the kept rows, in order
        where: list[int] = []  # their positions in out
        for source, number, record, split in zip(batch["source"], batch["line"], batch["record"], batch["split"]):
            rec = json.loads(record)
            rows = unpaired_view(rec) if "chosen" in rec else [rec]
            try:
                toks = [self._turns(r["prompt"], r["completion"]) for r in rows]
            except RowError as e:
                rows, toks, reason = [None], [None], str(e)
            else:
                reason = ""
            for i, (row, tok) in enumerate(zip(rows, toks)):
                out["source"].append(source)
                out["line"].append(number)
                out["first"].append(i == 0)
                out["reason"].append(reason)
                out["raw"].append(record if reason else "")
                if row is not None:
                    kept.append((row, tok, split))
                    where.append(len(out["reason"]) - 1)
        n = len(out["reason"])
        for k in ("input_ids", "labels", "kl_input_ids", "kl_labels"):
            out[k] = [[] for _ in range(n)]
        out["label"], out["ref"], out["ref_kl"], out["split"] = [False] * n, [0.0] * n, [0.0] * n, [""] * n
        kls = []
        for i, (row, tok, _) in enumerate(kept):
            kl = tok  # a batch with one prompt only: the row itself
            for back in range(1, len(kept)):
                other = kept[(i - back) % len(kept)][0]
                if other["prompt"] != row["prompt"]:
                    try:
                        kl = self._turns(row["prompt"], other["completion"])
                        break
                    except RowError:  # too long together: the next one
                        continue
            kls.append(kl)
        ref = self._logps([t for _, t, _ in kept] + kls)
        for i, ((row, tok, split), kl, pos) in enumerate(zip(kept, kls, where)):
            out["input_ids"][pos], out["labels"][pos] = tok.input_ids, tok.labels
            out["kl_input_ids"][pos], out["kl_labels"][pos] = kl.input_ids, kl.labels
            out["label"][pos], out["ref"][pos], out["ref_kl"][pos] = bool(row["label"]), ref[i], ref[len(kept) + i]
            out["split"][pos] = split
        return out


def reference_options(cfg: DPOSection, available: float) -> dict[str, float]:
    """What each reference-scoring actor asks Ray for: dpo.reference_num_gpus, else one GPU on a GPU cluster."""
    return {"num_gpus": actor_gpus(cfg.reference_num_gpus, available)}


def curate_rows(cfg: DPOSection, model_dir: str | None, out_dir: str | os.PathLike) -> Path:
    """dpo.train_path through the data wing (pipelines.data.curate), like data.train_path: every row read (any
    file type, dpo.columns mapping), validated, normalised, quality-filtered, de-duplicated (exact and near) and
    split by prompt into train / validation (dpo.validation_fraction), its report, rejects and manifest in
    out_dir. DataError (exit 2) when the rows are not of a kind dpo.method trains on."""
    if not cfg.train_path:
        raise MissingInput("dpo.train_path is not set: point it at a preference JSONL (prompt, chosen, rejected"
                           + (", or prompt, completion, label" if cfg.method == "kto" else "") + ")")
    if not expand_paths(cfg.train_path):
        raise MissingInput(f"dpo.train_path={cfg.train_path!r} matches no file")
    split = {"train": 1.0 - cfg.validation_fraction, "validation": cfg.validation_fraction, "test": 0.0}
    data = DataConfig(train_path=cfg.train_path, columns=cfg.columns, max_length=cfg.max_length, split=split,
                      max_rejected_fraction=cfg.max_rejected_fraction)
    out = curate.run(data, out_dir, model_dir, section="dpo")
    kind = read_manifest(out, kind="curated_dataset")["data_kind"]
    wanted = ("preference", "unpaired") if cfg.method == "kto" else ("preference",)
    if kind not in wanted:
        shape = "prompt/chosen/rejected pairs" + (" or prompt/completion/label rows" if cfg.method == "kto" else "")
        raise DataError(f"dpo.train_path={cfg.train_path!r} holds {kind} rows; dpo.method={cfg.method} trains on "
                        f"{shape} (map your fields with dpo.columns)")
    return out


def _curated_table(curated: Path, max_pairs: int | None):
    """The kept rows of a curation (train and validation) in file order as (kept table: row_id, source, line,
    split, record JSON; the rows past dpo.max_pairs as rejected.jsonl entries)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    parts = []
    for split in ("train", "validation"):
        folder = curated / split
        if folder.is_dir() and any(folder.glob("*.parquet")):
            t = pads.dataset(str(folder), format="parquet").to_table()
            body = [c for c in ("prompt", "chosen", "rejected", "completion", "label") if c in t.column_names]
            records = [json.dumps(r, ensure_ascii=False) for r in t.select(body).to_pylist()]
            parts.append(pa.table({"row_id": t["row_id"], "source": t["source"], "line": t["line"],
                                   "split": pa.array([split] * len(t), pa.string()),
                                   "record": pa.array(records, pa.string())}))
    if not parts:
        return pa.table({"row_id": pa.array([], pa.int64())}), []
    table = pa.concat_tables(parts).sort_by("row_id")
    past = []
    if max_pairs and len(table) > max_pairs:
        past = [{"reason": f"max_pairs: past the first {max_pairs} kept rows (dpo.max_pairs)", "source": r["source"],
                 "line": r["line"], "row": r["record"]} for r in table.slice(max_pairs).to_pylist()]
        table = table.slice(0, max_pairs)
    return table, past


def _curation_rejects(curated: Path) -> list[dict[str, Any]]:
    """curation's rejected/ rows as rejected.jsonl entries (reason: detail, source, line, row)."""
    out = []
    for f in sorted((curated / "rejected").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            reason = f"{r['reason']}: {r['detail']}" if r.get("detail") else r["reason"]
            out.append({"reason": reason, "source": r["source"], "line": int(r["line"]), "row": r["row"]})
    return out


def prepare(cfg: DPOSection, setup: TrainSetup, sft: Location | str | os.PathLike | None,
            out_dir: str | os.PathLike) -> Path:
    """Curate dpo.train_path (curate_rows: out_dir/curated), then tokenize the kept rows and, for dpo / kto,
    precompute the reference log-probs (Ray Data); counts add up (rows_in = rows_kept + rows_rejected, curation's
    refusals, duplicates, max_pairs and the chat template's refusals together), rejects kept. `sft`: the adapter
    the policy starts from (and the reference), None: the base (dpo.start=base). The reference actors read the
    SFT adapter from the store when `sft` has a URI (any node can), and resolve model.name again on a node
    without the driver's model folder (models.on_this_node)."""
    import ray
    from ray.data.expressions import col

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    curated = curate_rows(cfg, setup.model_dir, out / "curated")
    table, past = _curated_table(curated, cfg.max_pairs)
    rejected = _curation_rejects(curated) + past
    counts, labels, rows_kept = {"train": 0, "validation": 0}, {}, 0
    sft = Location.of(sft) if sft is not None else None
    if len(table):
        options = reference_options(cfg, cluster_gpus()) if cfg.reference else {"num_cpus": 1}
        store_fs = sft.reader()[0] if sft is not None else None  # built here, where the credentials are
        ds = ray.data.from_arrow([table.slice(i, 256) for i in range(0, len(table), 256)])  # blocks to share
        ds = ds.map_batches(_PrepareBatch, fn_constructor_args=(cfg, setup, sft, torch_device(
            options.get("num_gpus", 0)), store_fs), concurrency=(1, 2), batch_size=32, batch_format="numpy",
            **options).materialize()
        rows_kept = ds.filter(expr=col("first")).filter(expr=col("reason") == "").count()
        rejected += [{"reason": r["reason"], "source": r["source"], "line": int(r["line"]), "row": r["raw"]}
                     for r in ds.filter(expr=col("reason") != "").filter(expr=col("first")).select_columns(
                         ["reason", "source", "line", "raw"]).take_all()]
        counts, labels = _write_splits(cfg, ds, out)
    cm = read_manifest(curated, kind="curated_dataset")["metrics"]
    if cm["rows_in"] != rows_kept + len(rejected):
        raise RuntimeError(f"row accounting broke: in={cm['rows_in']} kept={rows_kept} rejected={len(rejected)}")
    with open(out / "rejected.jsonl", "w") as fh:
        for r in rejected:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    by_reason: dict[str, int] = {}
    for r in rejected:
        by_reason[r["reason"].split(":")[0]] = by_reason.get(r["reason"].split(":")[0], 0) + 1
    metrics = {"method": cfg.method, "reference": ("sft" if sft is not None else "base") if cfg.reference else None,
               "rows_in": cm["rows_in"], "rows_kept": rows_kept, "rows_rejected": len(rejected),
               "rejected_by_reason": by_reason, **counts,
               "curation": {k: cm[k] for k in ("rows_kept", "rows_rejected", "rejected_by_reason", "split_rows")}}
    if cfg.method == "kto":
        metrics["labels"] = labels
    if not counts["train"]:
        raise DataError(f"dpo.train_path={cfg.train_path!r}: no row left to train on of {cm['rows_in']} "
                        f"(refused: {by_reason}); see {out / 'rejected.jsonl'}")
    write_manifest(out, kind="preference_dataset",
                   inputs={"curated": str(curated), **({"reference_adapter": str(sft.path)}
                                                       if cfg.reference and sft is not None else {})},
                   config=cfg.model_dump(), metrics=metrics,
                   extra={"outputs": {s: s for s in counts if counts[s]},
                          "source": {"path": cfg.train_path, "hash": hash_path(cfg.train_path)
                                     if Path(cfg.train_path).is_file() else None}})
    return out


def _write_splits(cfg: DPOSection, ds, out: Path) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """The prepared rows of each split as Parquet in out/<split>; (rows per split, KTO's labels per split)."""
    from ray.data.expressions import col

    cols = KTO_COLUMNS if cfg.method == "kto" else PAIR_COLUMNS
    counts, labels = {}, {}
    for split in ("train", "validation"):
        part = ds.filter(expr=col("split") == split).select_columns(cols)
        counts[split] = part.count()
        if counts[split]:
            part.write_parquet(str(out / split))
        if cfg.method == "kto":
            good = part.filter(expr=col("label")).count() if counts[split] else 0
            labels[split] = {"desirable": good, "undesirable": counts[split] - good}
    return counts, labels


def run(cfg: DPOSection, setup: TrainSetup, sft: Location | str | os.PathLike | None,
        data: Location | str | os.PathLike, out: Location | str | os.PathLike, lora: LoraSection | None = None
        ) -> Path:
    """Train the aligned adapter with dpo.method from the SFT adapter `sft` (None: a fresh `lora` adapter on the
    base) on the preference dataset `prepare` wrote into `data`; write it with a manifest into out's folder. The
    loop runs with `cfg.optimisation(setup.train)`: train's settings, with DPO's own steps / lr / warmup / batch
    size where set. With store URIs, every worker reads the rows and the adapter from the store, and Ray Train
    keeps the checkpoints in out/ray_train there. setup.local: the loop in this process on one device, without Ray
    Train (the reference pass still uses Ray Data)."""
    data, out = Location.of(data), Location.of(out)
    sft = Location.of(sft) if sft is not None else None
    if sft is not None:
        parent = read_manifest(sft.path, kind="lora_adapter")
        lineage = {"parent_adapter": {"path": str(sft.path), "lineage": parent.get("lineage")}}
    else:
        lora = lora or LoraSection()
        lineage = {"parent_adapter": None, "start": "base"}
    loop = cfg.optimisation(setup.train)
    weights = None
    config = {"dpo": cfg.model_dump(), "quant": setup.quant.model_dump(), "train": loop.model_dump(),
              "dtype": setup.dtype, "parent_adapter": str(sft.path) if sft is not None else None,
              "method": cfg.method}
    if cfg.method == "kto":
        n = read_manifest(data.path, kind="preference_dataset")["metrics"].get("labels", {}).get("train", {})
        weights = cfg.kto.weights(n.get("desirable", 0), n.get("undesirable", 0))
        config["kto_weights"] = {"desirable": weights[0], "undesirable": weights[1], "train_rows": n}
    if sft is None:
        config["lora"] = lora.model_dump()
    job = setup.job(out.child("ray_train").shared, data, train=loop, dpo=cfg, sft=sft, kto_weights=weights,
                    lora=lora if sft is None else None)
    series = {"reward accuracy": "reward_accuracy"}
    if cfg.method == "kto":
        series["KL estimate"] = "kl"
    if cfg.method == "orpo":
        series["log odds ratio"] = "log_odds_ratio"
    return run_stage(train_loop_per_worker, setup, job, out.path, name="dpo", title=TITLES[cfg.method],
                     data_kind="preference_dataset", config=config, extra_series=series, lineage=lineage)


TITLES = {"dpo": "DPO", "orpo": "ORPO", "simpo": "SimPO", "kto": "KTO"}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What each worker runs for the align stage: the policy is the SFT adapter (or a fresh one on the base),
    trainable; the reference, where the method has one, is data (its log-probs precomputed)."""
    select_accelerator()  # before anything below can import DeepSpeed
    from peft import PeftModel

    job: WorkerJob = config["job"].on_node()  # the base model as this node has it
    cfg, train = job.dpo, job.train
    if job.sft is not None:
        sft_dir = str(job.sft.on_node(config.get("store_fs")))
        adapter = lambda base: PeftModel.from_pretrained(base, sft_dir, is_trainable=True)  # noqa: E731
    else:
        adapter = lambda base: attach_lora(base, job.lora, train.seed)  # noqa: E731
    tokenizer, pad_id, model, static = start_worker(job, adapter)
    tag = cfg.method
    if worker.current().world_rank == 0:
        start = "SFT adapter" if job.sft is not None else "a fresh LoRA adapter on the base"
        ref = "reference log-probs precomputed" if cfg.reference else "no reference model"
        print(f"[{tag}] policy = {start} ({static['trainable_params']:,} trainable parameters), {ref}", flush=True)
    loss_fn = make_loss(cfg, train.loss_chunk_tokens, job.kto_weights)

    def save_extra(folder: str, rank: int) -> None:
        if rank == 0:
            tokenizer.save_pretrained(folder)
            Path(folder, "static.json").write_text(json.dumps(static))

    count = (lambda b: b["ref"].shape[0]) if cfg.method == "kto" else (lambda b: b["ref_chosen"].shape[0])
    run_loop(job, model, loss_fn=loss_fn, collate=_kto_collate(pad_id) if cfg.method == "kto" else _collate(pad_id),
             count_items=count, save_extra=save_extra, tag=tag)


def make_loss(cfg: DPOSection, chunk_tokens: int = LEAN_CHUNK_TOKENS, kto_weights: tuple[float, float] | None = None):
    """The loop's loss function for dpo.method: (model, batch) -> (sum of item losses, items, extra sums)."""
    def paired(m, batch):
        logps, ntok = policy_logps(m, batch, chunk_tokens)
        b = batch["ref_chosen"].shape[0]
        pc, pr, nc, nr = logps[:b], logps[b:], ntok[:b], ntok[b:]
        extras = {}
        if cfg.method == "dpo":
            out = dpo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], beta=cfg.beta,
                           loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                           chosen_tokens=nc, rejected_tokens=nr)
        elif cfg.method == "orpo":
            out = orpo_loss(pc, pr, nc, nr, lam=cfg.orpo.lam)
            extras = {"log_odds_ratio": out["log_odds_ratio"].sum(), "nll": out["nll"] * b}
        else:
            out = simpo_loss(pc, pr, nc, nr, beta=cfg.simpo.beta, gamma_beta_ratio=cfg.simpo.gamma_beta_ratio,
                             label_smoothing=cfg.label_smoothing)
        extras = {"reward_accuracy": out["accuracy"].sum(), "rewards_chosen": out["chosen_rewards"].sum(),
                  "rewards_rejected": out["rejected_rewards"].sum(), "reward_margin": out["margins"].sum(), **extras}
        return out["losses"].sum(), b, extras

    def unpaired(m, batch):
        import torch

        training = torch.is_grad_enabled()
        with torch.no_grad():  # the KL sequences only set the detached reference point z0
            kl_logps, _ = policy_logps(m, {"input_ids": batch["kl_input_ids"],
                                           "attention_mask": batch["kl_attention_mask"],
                                           "labels": batch["kl_labels"]}, chunk_tokens)
        logps, _ = policy_logps(m, batch, chunk_tokens)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        # while training every rank runs the same micro-batches: z0 averaged over them, as TRL gathers it
        reduce = (lambda kl: torch.tensor(all_sum([float(kl)])[0] / world, device=kl.device)) \
            if training and world > 1 else None
        kl = kto_kl(kl_logps, batch["ref_kl"], reduce)
        wd, wu = kto_weights or (cfg.kto.desirable_weight, 1.0)
        out = kto_loss(logps, batch["ref"], batch["label"], kl, beta=cfg.beta, desirable_weight=wd,
                       undesirable_weight=wu)
        b = logps.shape[0]
        margin = out["margin"] if out["margin"] is not None else torch.zeros((), device=logps.device)
        extras = {"reward_accuracy": out["accuracy"].sum(), "reward_margin": margin * b, "kl": out["kl"] * b,
                  "desirable_share": batch["label"].float().sum()}
        return out["losses"].sum(), b, extras

    return unpaired if cfg.method == "kto" else paired


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


def _kto_collate(pad_id: int):
    def collate(batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        out = {}
        for prefix in ("", "kl_"):
            rows = [(list(ids), list(lab)) for ids, lab in zip(batch[f"{prefix}input_ids"], batch[f"{prefix}labels"])]
            out.update({f"{prefix}{k}": torch.tensor(v, dtype=torch.long) for k, v in pad_batch(rows, pad_id).items()})
        out["label"] = torch.tensor(batch["label"], dtype=torch.bool)
        out["ref"] = torch.tensor(batch["ref"], dtype=torch.float32)
        out["ref_kl"] = torch.tensor(batch["ref_kl"], dtype=torch.float32)
        return out

    return collate
