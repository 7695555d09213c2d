"""The training loop SFT and DPO both run inside Ray Train workers: DDP or DeepSpeed ZeRO, accumulation,
token-weighted loss, validation, early stopping, checkpoints that resume mid-run. The stage supplies the loss.

`loss_fn(model, batch) -> (sum_of_item_losses, n_items, extra_sums)`: SFT counts label tokens, DPO pairs. Every
step's loss is sum / (items in the whole step, over all micro-batches and ranks), so 4 micro-batches × accumulation
4 is the same step as one batch of 16, and ranks with unequal token counts are weighted correctly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from pipelines.train import state_seal, worker
from pipelines.train.config import WorkerJob, deepspeed_config
from pipelines.train.engine import Engine, all_sum, make_optimizer

STATE = "train_state.json"


def micro_batches(shard, batch_size: int, collate, skip: int, epoch: int, device="cpu"
                  ) -> Iterator[tuple[int, int, Any]]:
    """Endless (epoch, index-in-epoch, batch) over a dataset shard, each batch on `device`; the first `skip`
    batches of `epoch` are passed over (resuming mid-epoch lands on the batch after the checkpoint's)."""
    while True:
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate,
                                                           drop_last=True)):
            if i < skip:
                continue
            yield epoch, i, worker.to_device(batch, device)
        skip, epoch = 0, epoch + 1


def steady_throughput(step_seconds: list[float], step_tokens: list[float], warmup: int) -> dict[str, Any]:
    """Tokens per second over the steady-state steps: the first `warmup` steps (allocator, kernel selection,
    compilation) are left out when enough steps remain, and so is everything outside the steps (validation,
    checkpoints). Each step's seconds are the mean over ranks (they meet at every gradient reduction)."""
    skip = warmup if len(step_seconds) > warmup else 0
    secs, toks = sum(step_seconds[skip:]), sum(step_tokens[skip:])
    ordered = sorted(step_seconds[skip:])
    return {"tokens": toks, "seconds": secs, "tokens_per_s": toks / secs if secs else None,
            "steps_measured": len(ordered), "warmup_steps_skipped": skip,
            "step_seconds_median": ordered[len(ordered) // 2] if ordered else None}


def rng_states(device) -> dict[str, Any]:
    """The random generators a step draws from (LoRA dropout): the CPU one, and the GPU's on a CUDA worker."""
    import torch

    states = {"cpu": torch.get_rng_state()}
    if str(device).startswith("cuda"):
        states["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return states


def set_rng_states(states: dict[str, Any], device) -> None:
    import torch

    torch.set_rng_state(states["cpu"])
    if "cuda" in states and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(states["cuda"], torch.device(device))


# eval_loss of a checkpoint taken before the first validation: the worst score, and finite, because Ray Train's
# run snapshot stores inf as null, and a driver restarted on that snapshot then fails to rank it ("unsupported
# operand type(s) for *: 'float' and 'NoneType'").
NO_EVAL = 1e30


class ValidationBatches:
    """This rank's first `max_batches` validation batches, read from its shard once and kept: every validation
    scores the same rows, without a new pass of the streaming split (several seconds of actor and task start-up
    per validation on a small machine). A few batches of token ids: small next to the model."""

    def __init__(self, shard):
        self.shard, self.cached = shard, None

    def batches(self, batch_size: int, collate, max_batches: int) -> list:
        if self.cached is None:
            self.cached = []
            for i, batch in enumerate(self.shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate)):
                if i >= max_batches:
                    break
                self.cached.append(batch)
        return self.cached


def evaluate(engine: Engine, shard: ValidationBatches, batch_size: int, collate, loss_fn, max_batches: int
             ) -> tuple[float, dict[str, float]]:
    """Validation loss (item-weighted over all ranks) and the loss function's extra figures, e.g. DPO accuracy."""
    import torch

    engine.model.eval()
    total = items = 0.0
    extra: dict[str, float] = {}
    with torch.no_grad():
        for batch in shard.batches(batch_size, collate, max_batches):
            s, n, ex = engine.forward(loss_fn, engine.model, worker.to_device(batch, engine.device))
            total, items = total + float(s), items + float(n)
            for k, v in ex.items():
                extra[k] = extra.get(k, 0.0) + float(v)
    engine.model.train()
    sums = all_sum([total, items] + list(extra.values()))
    if not sums[1]:
        return float("nan"), {}
    return sums[0] / sums[1], {k: v / sums[1] for k, v in zip(extra, sums[2:])}


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside the block (storages counted once, parameters
    excluded): the activation memory gradient checkpointing trades for recompute. Measured on each rank's first
    micro-batch and reported in the stage manifest (`memory`)."""

    def __enter__(self):
        import torch

        self.bytes, self._seen = 0, set()

        def pack(t):
            if not isinstance(t, torch.nn.Parameter) and t.device.type != "meta":
                st = t.untyped_storage()
                if st.data_ptr() not in self._seen:
                    self._seen.add(st.data_ptr())
                    self.bytes += st.nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def run_loop(job: WorkerJob, model, *, loss_fn: Callable, collate, count_items: Callable,
             save_extra: Callable[[str, int], None], tag: str) -> None:
    """The loop each worker runs. Reports checkpoints (adapter + optimizer + step + data position + history)."""
    import time

    import torch
    from transformers import get_cosine_schedule_with_warmup

    train, here = job.train, worker.current()
    rank = here.world_rank
    engine = Engine(model, train, deepspeed_config(train, job.dtype), lambda p: make_optimizer(p, train),
                    lambda o: get_cosine_schedule_with_warmup(o, train.warmup_steps, train.max_steps),
                    compute_dtype=job.compute_dtype())
    state = {"step": 0, "epoch": 0, "batch_in_epoch": -1, "loss_history": [], "eval_history": [],
             "extra_history": {}, "best_eval": math.inf, "evals_since_best": 0, "zero_grad_share": None,
             "engine": engine.describe()}
    ckpt = here.checkpoint()
    if ckpt:  # a restarted worker group resumes where the last checkpoint left off
        with ckpt.as_directory() as d:
            state_seal.verify(d, job.state_key.get_secret_value())  # before anything in it is unpickled
            state = json.loads((Path(d) / STATE).read_text())
            engine.load(d)
            if (Path(d) / f"rng{rank}.pt").exists():
                set_rng_states(torch.load(Path(d) / f"rng{rank}.pt", weights_only=True), engine.device)
        if rank == 0:
            print(f"[{tag}] resumed from step {state['step']} (epoch {state['epoch']})", flush=True)
    shard = here.dataset_shard("train")
    try:
        val = ValidationBatches(here.dataset_shard("validation"))
    except KeyError:
        val = None
    batches = micro_batches(shard, train.batch_size, collate, state["batch_in_epoch"] + 1, state["epoch"],
                            engine.device)
    engine.model.train()
    step_seconds: list[float] = []
    step_tokens: list[float] = []
    checkpoint_steps, eval_steps = train.checkpoint_steps(), train.eval_steps()
    timed, since_checkpoint = train.checkpoint_every == "auto", 0.0  # step seconds since the last checkpoint
    cuda = str(engine.device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(engine.device)

    def checkpoint(final: bool = False) -> None:
        metrics = {"step": state["step"], "loss": state["loss_history"][-1] if state["loss_history"] else None}
        if val is not None:
            metrics["eval_loss"] = state["eval_history"][-1][1] if state["eval_history"] else NO_EVAL
        lora = engine.lora_state()  # collective under ZeRO-3
        with tempfile.TemporaryDirectory() as tmp:
            engine.save(tmp, rank)
            torch.save(rng_states(engine.device), Path(tmp) / f"rng{rank}.pt")
            save_extra(tmp, rank)  # on every rank: it may gather ZeRO-3 partitions; it writes on rank 0 only
            if rank == 0:
                engine.peft_model.save_pretrained(tmp, state_dict=lora, safe_serialization=True)
                (Path(tmp) / STATE).write_text(json.dumps({**state, "final": final}))
            state_seal.seal(tmp, rank, job.state_key.get_secret_value())  # what this rank wrote, for the resume
            here.report(metrics, tmp)

    while state["step"] < train.max_steps:
        t_step = time.perf_counter()
        micro = [next(batches) for _ in range(train.grad_accum)]
        step_tokens.append(float(sum(int(b["num_tokens"]) if "num_tokens" in b else int(b["attention_mask"].sum())
                                     for _, _, b in micro)))
        items = all_sum([float(sum(count_items(b) for _, _, b in micro))])[0]
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        step_sum, extra = 0.0, {}
        for j, (_, _, batch) in enumerate(micro):
            measure = state["step"] == 0 and j == 0 and "memory" not in state
            with SavedBytes() if measure else contextlib.nullcontext() as saved:
                s, _, ex = engine.forward(loss_fn, engine.model, batch)
            if measure:
                state["memory"] = {"saved_activation_bytes": saved.bytes}
            engine.backward(s * world / items, last_micro=j == len(micro) - 1)
            step_sum += float(s.detach())
            for k, v in ex.items():
                extra[k] = extra.get(k, 0.0) + float(v)
        if state["step"] + 1 == train.max_steps:  # DeepSpeed frees gradients in step(): measure before it
            state["zero_grad_share"] = engine.zero_grad_share()
        engine.step()
        if state["step"] == 0 and "memory" in state:
            state["memory"]["optimizer_state_bytes"] = engine.optimizer_state_bytes()
        state["step"] += 1
        state["epoch"], state["batch_in_epoch"] = micro[-1][0], micro[-1][1]
        engine.zero_grad()
        if cuda:
            torch.cuda.synchronize(engine.device)
        step_seconds.append(time.perf_counter() - t_step)
        since_checkpoint += step_seconds[-1]
        totals = all_sum([step_sum, since_checkpoint] + list(extra.values()))  # the same on every rank
        state["loss_history"].append(round(totals[0] / items, 6))
        # auto cadence: a checkpoint once the ranks' mean step time since the last passed checkpoint_minutes
        overdue = timed and totals[1] / world >= train.checkpoint_minutes * 60
        for k, v in zip(extra, totals[2:]):
            state["extra_history"].setdefault(k, []).append(round(v / items, 6))
        step = state["step"]
        if rank == 0 and (step % train.log_every == 0 or step in (1, train.max_steps)):
            extras = " ".join(f"{k} {v[-1]:.3f}" for k, v in state["extra_history"].items())
            print(f"[{tag}] step {step}/{train.max_steps} loss {state['loss_history'][-1]:.4f} "
                  f"lr {engine.lr():.2e} {extras}", flush=True)
        if train.fail_once_at_step == step:
            fs, marker = _drill_marker(step)  # beside the checkpoints: a folder or the store
            if fs.get_file_info(marker).type.name == "NotFound":
                if rank == 0:  # a dead process, not an exception: Ray Train restarts the group from the checkpoint
                    with fs.open_output_stream(marker) as f:
                        f.write(b"done")
                    print(f"[{tag}] fault drill: SIGKILL of this worker (pid {os.getpid()}) at step {step}",
                          flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
        stop = False
        evaluating = val is not None and ((eval_steps and step % eval_steps == 0) or step == train.max_steps
                                          or (overdue and train.eval_every == "auto"))
        if evaluating:
            ev, ev_extra = evaluate(engine, val, train.batch_size, collate, loss_fn, train.eval_max_batches)
            state["eval_history"].append([step, round(ev, 6)])
            for k, v in ev_extra.items():
                state.setdefault("eval_extra_history", {}).setdefault(k, []).append([step, round(v, 6)])
            if rank == 0:
                print(f"[{tag}] step {step} eval_loss {ev:.4f}", flush=True)
            if ev < state["best_eval"] - 1e-6:
                state["best_eval"], state["evals_since_best"] = ev, 0
            else:
                state["evals_since_best"] += 1
            stop = bool(train.early_stopping_patience) and state["evals_since_best"] >= train.early_stopping_patience
        if step == train.max_steps or stop:  # throughput of this attempt's steady-state steps, all ranks' tokens
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            state["throughput"] = steady_throughput([t / world for t in all_sum(step_seconds)], all_sum(step_tokens),
                                                    train.throughput_warmup_steps)
            if cuda:
                state.setdefault("memory", {})["peak_allocated_bytes"] = int(
                    torch.cuda.max_memory_allocated(engine.device))
        periodic = bool(checkpoint_steps) and step % checkpoint_steps == 0
        if stop or step == train.max_steps or evaluating or periodic or overdue:
            state["stopped_early"] = stop
            checkpoint(final=stop or step == train.max_steps)
            since_checkpoint = 0.0
        if stop:
            if rank == 0:
                print(f"[{tag}] early stop at step {step}: no improvement in {train.early_stopping_patience} evals",
                      flush=True)
            break


def _drill_marker(step: int):
    """(filesystem, path) of the fault drill's marker: in this run's Ray Train storage (a folder or the object
    store), through the filesystem Ray Train itself was given, so a worker needs no credentials of its own."""
    fs, root = worker.current().storage()
    return fs, f"{root}/fault_drill_step{step}"
