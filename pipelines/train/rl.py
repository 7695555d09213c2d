"""The rl stage: online RL with verifiable rewards (GRPO, DAPO, Dr. GRPO) on a LoRA adapter, rollouts on a vLLM
Ray actor, adapter-only versioned weight sync, and a parity gate between trainer and rollouts.

    driver:   prompts read and templated → RolloutEngine actor (pipelines.train.rollout) → Ray Train workers
    worker:   publish policy@0 → [rollouts (version v) → rewards → group advantages → parity gate → GRPO loss →
              optimizer step → publish policy@N (adapter files into the run's storage, bytes to the engine)]×steps

Workers (train.num_workers, DDP): rank 0 asks the one engine for each step's rollouts and hands them to the other
ranks (a gloo/NCCL broadcast); every rank scores the whole batch (group advantages need whole groups) and trains on
its share of the groups (group g on rank g mod W); the loss of each rank is scaled so that DDP's mean of the
ranks' gradients is the gradient of the whole batch's loss; parity and loss figures are reduced over the ranks;
rank 0 publishes each version.

Versions: policy@0 is the starting adapter (fresh on the base, or the SFT adapter); the optimizer step N publishes
policy@N, an immutable folder `<storage>/policies/policy@N/` and a LoRA of its own id in the engine. Step k trains
with the weights of policy@k-1 on rollouts of a version v with (k-1) - v <= rl.staleness; any other rollout stops
the stage. The trainer scores the sampled tokens with the weights of the version that sampled them (kept for the
staleness window): those are the importance ratio's old log-probs, and their distance to the engine's own
log-probs is the parity figure of the step (warn / stop thresholds in rl.parity).

Each step's record (rl_steps.jsonl in the output folder): rollout and trainer versions, reward (total and per
function), parity mean/max, loss, clip fractions, KL, sync latency (publish → first rollout on that version),
the engine's load time, the step's seconds, and the nodes of the trainer (rank 0) and of the engine. What is not
wired yet: DeepSpeed ZeRO and QLoRA (refused with a message), resuming an interrupted run, MLflow.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.artifacts.location import Location
from pipelines.artifacts.manifest import hash_path, read_manifest, write_manifest
from pipelines.data.readers import expand_paths, iter_records
from pipelines.data.rowformats import RowError, apply_columns, messages_of, parse_raw
from pipelines.schema import ConfigError, DataError, MissingInput, UserError
from pipelines.train import worker
from pipelines.train.base import attach_lora, start_worker
from pipelines.train.config import LoraSection, TrainSetup, WorkerJob
from pipelines.train.driver import adapter_health, plot_curves
from pipelines.train.engine import Engine, all_sum, make_optimizer, select_accelerator
from pipelines.train.grpo import (
    combine_rewards,
    completion_logps,
    group_advantages,
    grpo_loss,
    parity,
    truncated_is_weights,
)
from pipelines.train.rewards import score
from pipelines.train.rl_config import RLSection
from pipelines.train.rollout import engine_env, engine_kwargs, start_engine

STATE = "rl_state.json"
STEPS = "rl_steps.jsonl"


class RLStopped(UserError):
    """The rl stage stopped on a check: the parity gate, or a rollout outside the staleness bound."""


# -- prompts ----------------------------------------------------------------------------------------------------
def read_prompts(cfg: RLSection, tokenizer) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The prompts (rendered with the tokenizer's chat template, token ids, reference columns) and the rows left
    out, each with its file, line and reason."""
    if not cfg.prompts_path:
        raise MissingInput("rl.prompts_path is not set: point it at a file of prompts (e.g. JSONL with a prompt "
                           "field; map other field names in rl.columns)")
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for path in expand_paths(cfg.prompts_path):
        for rec in iter_records(path):
            if cfg.max_prompts and len(rows) >= cfg.max_prompts:
                break
            where = {"source": path, "line": rec.line}
            try:
                if rec.raw is None:
                    raise RowError("not_utf8", rec.error)
                mapped = apply_columns(parse_raw(rec.raw), cfg.columns, key="rl.columns")
                prompt = _templated(cfg.prompt_template, mapped) if cfg.prompt_template else mapped["prompt"]
                if isinstance(prompt, str):
                    if not prompt.strip():
                        raise RowError("empty_turn", "the prompt is empty")
                    messages = [{"role": "user", "content": prompt}]
                else:
                    messages = messages_of(prompt, cfg.columns.get("prompt", "prompt"))
                if cfg.system_prompt:
                    messages = [{"role": "system", "content": cfg.system_prompt}] + messages
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(ids) > cfg.max_prompt_tokens:
                    raise RowError("too_long", f"{len(ids)} prompt tokens > rl.max_prompt_tokens="
                                               f"{cfg.max_prompt_tokens}")
            except RowError as e:
                rejected.append({**where, "reason": f"{e.reason}: {e.detail}"})
                continue
            rows.append({"prompt": text, "prompt_ids": ids, **where,
                         "columns": {k: mapped[k] for k in cfg.columns if k != "prompt"}})
    if not rows:
        first = f"; first refusal: {rejected[0]['source']} line {rejected[0]['line']}: {rejected[0]['reason']}" \
            if rejected else ""
        raise DataError(f"rl.prompts_path={cfg.prompts_path!r}: no usable prompt ({len(rejected)} left out){first}")
    return rows, rejected


def _templated(template: str, mapped: dict[str, Any]) -> str:
    try:
        return template.format(**{k: "" if v is None else v for k, v in mapped.items()})
    except (KeyError, IndexError, ValueError) as e:
        raise RowError("wrong_type", f"rl.prompt_template: {e}") from None


def check(cfg: RLSection, setup: TrainSetup, lora: LoraSection, serve_cfg) -> None:
    """What the rl stage refuses before anything starts."""
    if not cfg.rewards:
        raise ConfigError("rl.rewards is empty: name at least one reward function (e.g. {fn: exact_answer})")
    if setup.train.deepspeed != "none" or setup.quant.load_in_4bit:
        raise ConfigError("rl: DeepSpeed ZeRO and QLoRA are not wired into the rl stage yet; set "
                          "train.deepspeed=none and quant.load_in_4bit=false")
    if cfg.prompts_per_step < setup.train.num_workers:
        raise ConfigError(f"rl: prompts_per_step={cfg.prompts_per_step} < train.num_workers="
                          f"{setup.train.num_workers}: each worker trains on whole groups and needs at least one")
    if cfg.start == "base" and lora.r > serve_cfg.max_lora_rank:
        raise ConfigError(f"rl: lora.r={lora.r} > serve.max_lora_rank={serve_cfg.max_lora_rank}: the rollout "
                          "engine could not load the adapter")
    if cfg.start == "base" and lora.dora:
        raise ConfigError("rl: lora.dora=true: vLLM cannot load DoRA adapters for the rollouts")


# -- the driver -------------------------------------------------------------------------------------------------
def run(cfg: RLSection, setup: TrainSetup, lora: LoraSection, serve_cfg, out: Location | str | os.PathLike, *,
        sft: Location | str | os.PathLike | None = None, engine=None, engine_node: str | None = None,
        trainer_strategy: str | None = None, trainer_resources: dict[str, float] | None = None) -> Path:
    """Train the rl adapter; write it, its records and a manifest into out's folder. engine: a RolloutEngine
    actor handle to use (e.g. shared by tests; it is reset for this run and left running); else one is started
    here (on `engine_node` when given) and stopped at the end. trainer_strategy: the Ray Train worker's placement
    strategy; trainer_resources: custom Ray resources each worker asks for besides its CPUs (e.g. {"trainer": 1}
    to hold the trainer to the nodes that have them, with the engine on `engine_node`)."""
    import ray
    from transformers import AutoTokenizer

    check(cfg, setup, lora, serve_cfg)
    if cfg.start != "base" and sft is None:
        raise MissingInput(f"rl.start={cfg.start} needs this run's {cfg.start} adapter: run `loraforge {cfg.start}` "
                           "first, or set rl.start=base")
    out_loc = Location.of(out)
    out_dir = out_loc.path
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    prompts, rejected = read_prompts(cfg, tokenizer)
    with open(out_dir / "rejected.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rejected)
    print(f"[rl] {len(prompts)} prompts ({len(rejected)} left out), G={cfg.num_generations}, "
          f"{cfg.prompts_per_step} prompts per step, {cfg.steps} steps, staleness {cfg.staleness}", flush=True)
    # the rl section's steps / lr / warmup over train's loop, with train's workers (DDP over the groups)
    loop = cfg.optimisation(setup.train).model_copy(update={"num_workers": setup.train.num_workers})
    if cfg.start == "base":
        lora = lora.model_copy(update={"dropout": 0.0})  # the trainer's forward must be the rollout's
    job = setup.job(out_loc.child("ray_train").shared, None, train=loop, lora=lora,
                    sft=Location.of(sft) if sft is not None else None)
    own_engine = engine is None
    gpu = cfg.rollout_gpus > 0
    if own_engine:
        t0 = time.time()
        engine = start_engine(engine_kwargs(serve_cfg, setup.model_dir, max_loras=cfg.staleness + 2, gpu=gpu,
                                            seed=cfg.seed),
                              cfg.staleness, num_cpus=cfg.rollout_cpus, num_gpus=cfg.rollout_gpus,
                              env=engine_env(serve_cfg), node_id=engine_node)
        print(f"[rl] rollout engine up in {time.time() - t0:.0f} s", flush=True)
    run_id = f"{out_dir.name}-{int(time.time() * 1000)}"
    ray.get(engine.reset.remote(run_id, cfg.staleness))
    try:
        result = _fit(job, cfg, engine, prompts, run_id, trainer_strategy, trainer_resources)
    finally:
        try:
            engine_info = ray.get(engine.info.remote(), timeout=60)
        except Exception as e:  # noqa: BLE001 - the engine died: say so in the manifest, keep the run's own error
            engine_info = {"error": f"{type(e).__name__}: {e}"[:300]}
        if own_engine:
            ray.kill(engine)
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE).read_text())
        steps = state["steps"]
        with open(out_dir / STEPS, "w") as fh:
            fh.writelines(json.dumps(s) + "\n" for s in steps)
        if state.get("stopped"):
            raise RLStopped(f"rl stopped at step {state['stopped']['step']}: {state['stopped']['reason']} "
                            f"(records of every step in {out_dir / STEPS})")
        for f in Path(d).iterdir():
            if f.is_file() and f.name != STATE:
                shutil.copy2(f, out_dir / f.name)
    _finish(out_dir, cfg, setup, job, state, engine_info, sft, len(prompts), len(rejected))
    return out_dir


def _fit(job: WorkerJob, cfg: RLSection, engine, prompts: list[dict], run_id: str, strategy: str | None,
         resources: dict[str, float] | None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = job.train
    shutil.rmtree(job.storage, ignore_errors=True)
    Path(job.storage).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "rl": cfg, "engine": engine, "prompts": prompts, "run": run_id},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker, **(resources or {})},
                                     placement_strategy=strategy or train.placement_strategy),
        run_config=RunConfig(name="rl", storage_path=job.storage, failure_config=FailureConfig(max_failures=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"rl finished without a checkpoint: {result.error}")
    return result


def _finish(out: Path, cfg: RLSection, setup: TrainSetup, job: WorkerJob, state: dict, engine_info: dict, sft,
            n_prompts: int, n_rejected: int) -> None:
    steps = state["steps"]
    rewards = [s["reward_mean"] for s in steps]
    plot_curves({"mean reward": rewards, "parity mean |Δ log p|": [s["parity_mean"] for s in steps]},
                out / "reward.png", "rl reward")
    sync = [s["sync_s"] for s in steps if s.get("sync_s") is not None]
    metrics = {
        "steps": len(steps), "reward_history": rewards, "reward_first": rewards[0], "reward_last": rewards[-1],
        "loss_history": [s["loss"] for s in steps], "parity_mean_history": [s["parity_mean"] for s in steps],
        "parity_max_history": [s["parity_max"] for s in steps],
        "parity_mean_max": max(s["parity_mean"] for s in steps),
        "version_chain": [[s["step"], s["rollout_version"]] for s in steps],
        "sync_s_history": [s.get("sync_s") for s in steps],
        "sync_s_median": sorted(sync)[len(sync) // 2] if sync else None,
        "step_s_median": sorted(s["step_s"] for s in steps)[len(steps) // 2],
        "rollout_tokens_per_s": sum(s["completion_tokens"] for s in steps) / max(sum(s["rollout_s"] for s in steps),
                                                                                1e-9),
        "prompts": n_prompts, "prompts_rejected": n_rejected, "rollout_engine": engine_info,
        **state.get("static", {}), **adapter_health(out, setup.model_dir)}
    lineage: dict[str, Any] = {"base_model": setup.model_name or setup.model_dir,
                               "base_model_hash": hash_path(setup.model_dir),
                               "prompts_hash": hash_path(cfg.prompts_path) if cfg.prompts_path and
                               Path(cfg.prompts_path).is_file() else None,
                               "data_hash": cfg.prompts_hash()}  # the registry's dataset hash: the prompts
    if sft is not None and cfg.start != "base":
        sft_path = Location.of(sft).path
        lineage["parent_adapter"] = {"path": str(sft_path), "lineage": read_manifest(sft_path).get("lineage")}
    write_manifest(out, kind="lora_adapter", inputs={"base_model": setup.model_dir},
                   config={"rl": cfg.model_dump(), "lora": job.lora.model_dump() if job.lora else None,
                           "train": job.train.model_dump(), "dtype": setup.dtype},
                   metrics=metrics, extra={"lineage": lineage})


# -- the worker -------------------------------------------------------------------------------------------------
def _pad_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, device):
    """Prompts left-padded, completions right-padded: every completion starts at the same position, so the
    logits of the last T + 1 positions hold all their predictions. Position ids count real tokens only (as the
    rollout engine numbers them)."""
    import torch

    P = max(len(p) for p in prompt_ids)
    T = max(1, max(len(c) for c in completion_ids))
    ids, att, comp, mask = [], [], [], []
    for p, c in zip(prompt_ids, completion_ids):
        ids.append([pad_id] * (P - len(p)) + list(p) + list(c) + [pad_id] * (T - len(c)))
        att.append([0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (T - len(c)))
        comp.append(list(c) + [pad_id] * (T - len(c)))
        mask.append([1] * len(c) + [0] * (T - len(c)))
    att_t = torch.tensor(att, device=device)
    return {"input_ids": torch.tensor(ids, device=device), "attention_mask": att_t,
            "position_ids": (att_t.cumsum(-1) - 1).clamp(min=0), "completion_ids": torch.tensor(comp, device=device),
            "mask": torch.tensor(mask, dtype=torch.float32, device=device), "T": T}


def _logps(model, b: dict[str, Any], temperature: float):
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                logits_to_keep=b["T"] + 1)
    return completion_logps(out.logits[:, :-1], b["completion_ids"], temperature)


def _adapter_files(peft_model) -> dict[str, bytes]:
    """The adapter as PEFT saves it (adapter_config.json + adapter_model.safetensors), as bytes."""
    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d, safe_serialization=True)
        return {f.name: f.read_bytes() for f in Path(d).iterdir() if f.is_file()}


def _publish(files: dict[str, bytes], version: int) -> str:
    """policy@version into this run's storage (a folder or the object store, through Ray Train's filesystem),
    written once: an existing version is never overwritten."""
    import pyarrow.fs as pafs

    fs, root = worker.current().storage()
    folder = f"{root}/policies/policy@{version}"
    if fs.get_file_info(folder).type != pafs.FileType.NotFound:
        raise RuntimeError(f"{folder} exists: adapter versions are immutable")
    staging = f"{root}/policies/.staging-{version}"
    fs.create_dir(staging, recursive=True)
    for name, data in files.items():
        with fs.open_output_stream(f"{staging}/{name}") as fh:
            fh.write(data)
    fs.move(staging, folder)
    return folder


def _rewarded(cfg: RLSection, batch: list[dict[str, Any]], groups: list[list[dict[str, Any]]]):
    """The step's completions, prompt by prompt (G each), with their prompts' ids, each reward function's scores,
    the combined reward (NaN where no function applies) and the group advantages (Dr. GRPO: not std-scaled)."""
    import torch

    completions, texts, prompt_ids, prompt_texts = [], [], [], []
    columns: dict[str, list] = {k: [] for k in cfg.columns if k != "prompt"}
    for p, group in zip(batch, groups):
        for c in group:
            completions.append(c)
            texts.append(c["text"])
            prompt_ids.append(p["prompt_ids"])
            prompt_texts.append(p["prompt"])
            for k in columns:
                columns[k].append(p["columns"].get(k))
    per_func = score(cfg.rewards, prompt_texts, texts, {**columns, "completion_ids": [c["ids"] for c in completions]})
    table = torch.tensor([[math.nan if v is None else v for v in col] for col in per_func]).T
    rewards = combine_rewards(table, [r.weight for r in cfg.rewards])
    adv = group_advantages(rewards, cfg.num_generations, scale=cfg.aggregation != "dr_grpo")
    return completions, prompt_ids, per_func, rewards, adv


def _old_and_parity(chunks: list[list[int]], padded: list[dict[str, Any]], completions: list[dict[str, Any]],
                    device, old_logps):
    """Per micro-batch: the engine's sampled-token log-probs (NaN past each completion) and the trainer's old
    log-probs (`old_logps(b)`, the sampling version's weights, no gradient); and the parity figures of the step
    (token-weighted mean, max, tokens) between the two."""
    import torch

    par = {"sum": 0.0, "max": 0.0, "tokens": 0}
    olds, rollouts = [], []
    for ch, b in zip(chunks, padded):
        r = torch.full((len(ch), b["T"]), math.nan)
        for j, i in enumerate(ch):
            r[j, :len(completions[i]["logprobs"])] = torch.tensor(completions[i]["logprobs"])
        r = r.to(device)
        old = old_logps(b)
        p = parity(old, torch.nan_to_num(r, nan=0.0), b["mask"] * (~torch.isnan(r)))
        par["sum"] += p["mean"] * p["tokens"]
        par["max"] = max(par["max"], p["max"])
        par["tokens"] += p["tokens"]
        olds.append(old)
        rollouts.append(r)
    return olds, rollouts, par


def _passes(prompts: list[dict[str, Any]], seed: int):
    """The prompts, endlessly: every prompt once per pass, each pass in a new order."""
    rng, order = random.Random(seed), list(range(len(prompts)))
    while True:
        rng.shuffle(order)
        for i in order:
            yield prompts[i]


def _starting_adapter(job: WorkerJob, cfg: RLSection, store_fs):
    """policy@0 on the base: the SFT adapter (trainable), or a fresh LoRA (rl.start)."""
    from peft import PeftModel

    if cfg.start != "base":  # sft, or the preference-tuned adapter (dpo)
        sft_dir = str(job.sft.on_node(store_fs))
        return lambda base: PeftModel.from_pretrained(base, sft_dir, is_trainable=True)
    return lambda base: attach_lora(base, job.lora, cfg.seed)


def _update(engine: Engine, cfg: RLSection, chunks: list[list[int]], padded: list[dict[str, Any]], olds: list,
            rollouts: list, adv, total_tokens: float, reference, B: int, world: int) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches (GRPO loss, accumulated) of the step's B completions:
    the loss, clip-region share and KL (token-weighted) summed over the ranks. `reference(b)`: the KL term's
    log-probs, asked only when rl.kl_beta > 0. Each micro-batch's loss is weighted by its share of the whole
    batch and by `world` (DDP averages the ranks' gradients); the forward of every micro-batch but the last runs
    under DDP's no_sync with its backward (a forward outside it would all-reduce in its backward)."""
    import contextlib

    import torch

    figures = {"loss": 0.0, "clip_region": 0.0, "kl": 0.0}
    for n, (ch, b, old, r) in enumerate(zip(chunks, padded, olds, rollouts)):
        last = n == len(chunks) - 1
        quiet = engine.model.no_sync() if not last and hasattr(engine.model, "no_sync") else contextlib.nullcontext()
        with quiet:
            figures = _micro(engine, cfg, ch, b, old, r, adv, total_tokens, reference, B, world, last, figures)
    grads = [p.grad.detach().float().norm() for p in engine.params if p.grad is not None]
    grad_norm = float(torch.stack(grads).norm()) if grads else 0.0  # after DDP's all-reduce, before clipping
    engine.step()
    engine.zero_grad()
    loss, clip, kl = all_sum([figures["loss"], figures["clip_region"], figures["kl"]])
    return {"loss": loss / world, "clip_region": clip, "kl": kl, "grad_norm": grad_norm}


def _micro(engine: Engine, cfg: RLSection, ch: list[int], b: dict[str, Any], old, r, adv, total_tokens: float,
           reference, B: int, world: int, last: bool, figures: dict[str, float]) -> dict[str, float]:
    """Forward, loss and backward of one micro-batch; the figures with its part added."""
    import torch

    logps = engine.forward(_logps, engine.model, b, cfg.sampling.temperature)
    ref_lp = reference(b) if cfg.kl_beta else None
    is_w = truncated_is_weights(old, torch.nan_to_num(r, nan=0.0), b["mask"], cfg.tis_cap) if cfg.tis_cap else None
    out = grpo_loss(logps, old, adv[ch], b["mask"], ref_logps=ref_lp, beta=cfg.kl_beta, eps=cfg.epsilon,
                    eps_high=cfg.epsilon_high, aggregation=cfg.aggregation,
                    max_completion_length=cfg.sampling.max_new_tokens, is_weights=is_w, token_normalizer=total_tokens)
    loss = out["loss"] * (1.0 if cfg.aggregation == "dapo" else len(ch) / B) * world
    engine.backward(loss, last_micro=last)
    share = b["mask"].sum().item() / max(total_tokens, 1.0)
    return {"loss": figures["loss"] + float(loss), "clip_region": figures["clip_region"] + out["clip_region"] * share,
            "kl": figures["kl"] + out["kl"] * share}


def _broadcast(obj, world: int):
    """rank 0's object on every rank (the process group's broadcast); the object itself on one worker."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_max(value: float) -> float:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device=worker.collective_device(dist.get_backend(), worker.current().device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class _Rollouts:
    """The engine's side of the loop. Rank 0 publishes each version (the run's storage, then the bytes into the
    object store for the engine's `sync`) and asks for each step's rollouts; every rank gets the step's prompts and
    rollouts from rank 0 (broadcast)."""

    def __init__(self, cfg: RLSection, actor, prompts: list[dict[str, Any]], run_id: str, rank: int, world: int):
        self.cfg, self.actor, self.run, self.rank, self.world = cfg, actor, run_id, rank, world
        self.stream = _passes(prompts, cfg.seed)
        self.pending: list[tuple[list[dict[str, Any]], Any]] = []
        self.syncs: dict[int, dict[str, Any]] = {}

    def publish(self, version: int, peft) -> None:
        if self.rank:
            return
        import ray

        t0 = time.time()
        files = _adapter_files(peft)
        folder = _publish(files, version)
        info = ray.get(self.actor.sync.remote(self.run, version, ray.put(files), t0))
        self.syncs[version] = {**info, "publish_s": time.time() - t0, "folder": folder}

    def request(self, step: int) -> None:
        if self.rank:
            return
        cfg, s = self.cfg, self.cfg.sampling
        batch = [next(self.stream) for _ in range(cfg.prompts_per_step)]
        self.pending.append((batch, self.actor.rollout.remote(
            self.run, [p["prompt_ids"] for p in batch], cfg.num_generations, temperature=s.temperature,
            top_p=s.top_p, max_tokens=s.max_new_tokens, seed=cfg.seed * 1_000_003 + step,
            drill_base=cfg.drill_base_rollout_at_step == step)))

    def take(self) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
        """The oldest requested step's prompts and rollouts, and how long rank 0 waited for them."""
        payload = None
        if self.rank == 0:
            import ray

            batch, ref = self.pending.pop(0)
            t0 = time.time()
            payload = (batch, ray.get(ref), time.time() - t0)
        return _broadcast(payload, self.world)

    def record(self, step: int, ro: dict[str, Any], wait_s: float, node: str) -> dict[str, Any]:
        sync = self.syncs.get(ro["version"], {})
        return {"step": step, "trainer_version": step - 1, "rollout_version": ro["version"],
                "lag": step - 1 - ro["version"], "lora_id": ro["lora_id"], "sync_s": ro["sync_s"],
                "load_s": sync.get("load_s"), "publish_s": sync.get("publish_s"), "sync_bytes": sync.get("bytes"),
                "rollout_s": ro["finished_at"] - ro["started_at"], "rollout_wait_s": wait_s,
                "completion_tokens": ro["tokens"], "trainer_node": node, "rollout_node": ro["node_id"],
                "workers": self.world}


def _my_chunks(n_prompts: int, G: int, micro: int, rank: int, world: int) -> list[list[int]]:
    """This rank's completions (the groups g with g mod world = rank), in micro-batches of at most `micro`."""
    mine = [g * G + j for g in range(rank, n_prompts, world) for j in range(G)]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


def _stop_reason(cfg: RLSection, rec: dict[str, Any], par: dict[str, float], states: dict) -> str | None:
    if rec["lag"] < 0 or rec["lag"] > cfg.staleness or rec["rollout_version"] not in states:
        return (f"rollouts of policy@{rec['rollout_version']} while the trainer holds policy@{rec['trainer_version']}:"
                f" outside the staleness bound {cfg.staleness}")
    if par and rec["parity_mean"] > cfg.parity.stop:
        return (f"parity gate: mean |log π_trainer − log π_rollout| = {rec['parity_mean']:.4f} on "
                f"policy@{rec['rollout_version']}'s {par['tokens']} sampled tokens > rl.parity.stop={cfg.parity.stop}"
                f" (max {par['max']:.4f}): the rollouts did not come from the published adapter (a wrong version, "
                "or the base model)")
    return None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The rl loop on each Ray Train worker (rank 0 talks to the engine; DDP over the groups)."""
    select_accelerator()
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import get_cosine_schedule_with_warmup

    job: WorkerJob = config["job"].on_node()
    cfg: RLSection = config["rl"]
    train, here = job.train, worker.current()
    rank, world = here.world_rank, here.world_size
    tokenizer, pad_id, model, static = start_worker(job, _starting_adapter(job, cfg, config.get("store_fs")))
    engine = Engine(model, train, None, lambda p: make_optimizer(p, train),
                    lambda o: get_cosine_schedule_with_warmup(o, train.warmup_steps, train.max_steps),
                    compute_dtype=job.compute_dtype())
    device = engine.device
    peft = engine.peft_model  # no-gradient forwards go through it: DDP's wrapper would sync buffers each time
    peft.train()
    for module in peft.modules():  # no dropout anywhere: the trainer's forward must be the rollout engine's
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    temperature, G = cfg.sampling.temperature, cfg.num_generations
    states: dict[int, dict[str, Any]] = {}  # version -> adapter weights, for the staleness window (+ reference)
    start_state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft).items()}
    rollouts_of = _Rollouts(cfg, config["engine"], config["prompts"], config["run"], rank, world)

    def publish(version: int) -> None:
        states[version] = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft).items()}
        for old in [v for v in states if v < version - cfg.staleness]:
            del states[old]
        rollouts_of.publish(version, peft)

    def scored(b: dict[str, Any], state: dict | None = None, base: bool = False):
        """log-probs without gradient under other adapter weights (a stale version, the reference), the base
        (adapter disabled), or the current weights (state None)."""
        with torch.no_grad():
            if base:
                with peft.disable_adapter():
                    return _logps(peft, b, temperature)
            if state is None:
                return _logps(peft, b, temperature)
            current = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft).items()}
            set_peft_model_state_dict(peft, state)
            try:
                return _logps(peft, b, temperature)
            finally:
                set_peft_model_state_dict(peft, current)

    def reference(b: dict[str, Any]):  # the KL term's reference: the starting adapter, or the base
        return scored(b, None, base=True) if cfg.start == "base" else scored(b, start_state)

    records: list[dict[str, Any]] = []
    stopped = None
    publish(0)
    if rank == 0:
        print(f"[rl] policy@0 published ({static['trainable_params']:,} trainable parameters, start={cfg.start}, "
              f"{world} worker(s))", flush=True)
    rollouts_of.request(1)
    for step in range(1, cfg.steps + 1):
        t_step = time.time()
        if cfg.staleness and step < cfg.steps:
            rollouts_of.request(step + 1)  # sampled while this step trains (the engine is one call at a time)
        batch, ro, wait_s = rollouts_of.take()
        rec = rollouts_of.record(step, ro, wait_s, here.node_id())
        reason = _stop_reason(cfg, rec, {}, states)
        if reason is None:
            completions, prompt_ids, per_func, rewards, adv = _rewarded(cfg, batch, ro["groups"])
            comp_ids = [c["ids"] for c in completions]
            adv = adv.to(device)
            # old log-probs (the sampling version's weights) of this rank's groups, parity against the engine's
            B = len(completions)
            chunks = _my_chunks(len(batch), G, cfg.micro_batch_size, rank, world)
            padded = [_pad_batch([prompt_ids[i] for i in ch], [comp_ids[i] for i in ch], pad_id, device)
                      for ch in chunks]
            total_tokens = float(sum(len(c) for c in comp_ids))
            sampled_by = None if ro["version"] == step - 1 else states[ro["version"]]
            olds, rolled, par = _old_and_parity(chunks, padded, completions, device, lambda b: scored(b, sampled_by))
            par["sum"], par["tokens"] = all_sum([par["sum"], par["tokens"]])
            par["max"] = _all_max(par["max"])
            rec.update({"parity_mean": par["sum"] / max(par["tokens"], 1), "parity_max": par["max"],
                        "parity_tokens": int(par["tokens"])})
            reason = _stop_reason(cfg, rec, par, states)
        if reason is not None:
            stopped = {"step": step, "reason": reason}
            records.append(rec)
            break
        if rec["parity_mean"] > cfg.parity.warn and rank == 0:
            print(f"[rl] WARNING step {step}: parity mean |Δ log p| {rec['parity_mean']:.4f} > rl.parity.warn="
                  f"{cfg.parity.warn} (max {par['max']:.4f})", flush=True)
        t_train = time.time()
        figures = _update(engine, cfg, chunks, padded, olds, rolled, adv, total_tokens, reference, B, world)
        train_s = time.time() - t_train
        publish(step)
        scored_rewards = rewards[~torch.isnan(rewards)]
        rec.update({"reward_mean": float(scored_rewards.mean()) if scored_rewards.numel() else math.nan,
                    "reward_std": float(scored_rewards.std()) if scored_rewards.numel() > 1 else 0.0,
                    "reward_per_function": {spec.fn: _nanmean(col) for spec, col in zip(cfg.rewards, per_func)},
                    "unscorable": int(torch.isnan(rewards).sum()), "lr": engine.lr(), "train_s": train_s,
                    "published": f"policy@{step}", "step_s": time.time() - t_step,
                    "mean_completion_tokens": total_tokens / B, **figures})
        records.append(rec)
        if rank == 0 and (step % train.log_every == 0 or step in (1, cfg.steps)):
            print(f"[rl] step {step}/{cfg.steps} reward {rec['reward_mean']:.3f} loss {rec['loss']:.4f} parity "
                  f"{rec['parity_mean']:.2e} (max {par['max']:.2e}) rollout policy@{ro['version']} sync "
                  f"{(rec['sync_s'] or 0):.2f} s", flush=True)
        if step < cfg.steps and not cfg.staleness:
            rollouts_of.request(step + 1)
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            peft.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            Path(folder, STATE).write_text(json.dumps({"steps": records, "stopped": stopped, "static": static}))
        here.report({"step": len(records)}, folder)


def _nanmean(values: list) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None
