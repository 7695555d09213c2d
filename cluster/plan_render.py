"""Text and JSON views of a plan (cluster.plan) for `loraforge plan`, and the one-line summary `run`/`sft` print.

    loraforge plan configs/quickstart-cpu.yaml [--lora] [--json]
"""

from __future__ import annotations

from typing import Any

from cluster.plan import (
    GIB,
    Setup,
    TrainingPlan,
    fits,
    lora_params,
    plan_serving,
    serving_on_gpu,
    serving_parallel,
    smallest_gpu,
    step_seconds,
    table,
)
from cluster.plan_shape import ModelShape
from pipelines.train import targets as lora_targets


def size(b: float) -> str:
    return f"{b / GIB:,.2f} GiB" if b >= GIB / 2 else f"{b / 2**20:,.1f} MiB"


def count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


def duration(s: float) -> str:
    return f"{s:.2f} s" if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"


def describe(s: Setup) -> str:
    engine = "DDP" if s.zero == 0 else f"ZeRO-{s.zero}" + (" + CPU offload" if s.offload else "")
    base = ("NF4" + (" + double quant" if s.double_quant else "")) if s.load_in_4bit else s.dtype
    return (f"{s.ranks} × {'GPU' if s.use_gpu else 'CPU worker'}, batch {s.batch} × seq {s.seq} (× accum "
            f"{s.grad_accum}), base {base}, compute {s.dtype}, {engine}, {s.optimizer}, gradient checkpointing "
            f"{'on' if s.gradient_checkpointing else 'off'}")


def summary(plan: TrainingPlan) -> str:
    """One line: peak per device, where the bytes go, the step time."""
    s = plan.setup
    where = "GPU" if s.use_gpu else "worker"
    top = sorted(plan.parts, key=lambda p: -p.bytes)[:3]
    parts = ", ".join(f"{p.name} {size(p.bytes)}" for p in top)
    return (f"plan: {size(plan.device_bytes)} peak per {where} × {s.ranks} ({parts}); {count(plan.trainable)} "
            f"trainable of {count(plan.base_params)}; `loraforge plan` for the breakdown")


def breakdown(plan: TrainingPlan) -> list[str]:
    where = "per GPU" if plan.setup.use_gpu else "per worker"
    rows = [f"  {'component':<14}{where:>12}  note"]
    for p in plan.parts:
        flag = " (host)" if p.host else " (peak only)" if p.transient else ""
        rows.append(f"  {p.name:<14}{size(p.bytes):>12}  {p.note}{flag}")
    rows.append(f"  {'peak':<14}{size(plan.device_bytes):>12}  on the device" +
                (f"; {size(plan.host_bytes)} on the host" if plan.host_bytes else ""))
    return rows


def render_training(plan: TrainingPlan, serve=None) -> str:
    s, shape = plan.setup, plan.shape
    lines = [f"model: {shape.name} ({count(plan.base_params)} params; {shape.layers} layers, hidden {shape.hidden}, "
             f"{shape.heads}/{shape.kv_heads} heads × {shape.head_dim}, vocab {shape.vocab})",
             f"train: {describe(s)}; LoRA r={s.r} on {len(s.targets)} modules: {count(plan.trainable)} trainable "
             f"({100 * plan.trainable / plan.base_params:.2f}% of the base)", "", *breakdown(plan), ""]
    flops = f"{plan.flops_per_step / 1e12:,.2f} TFLOP per {'GPU' if s.use_gpu else 'worker'} per step"
    if not s.use_gpu:
        cpu = table()["cpu"]
        step = step_seconds(plan, None)
        cores = max(1.0, s.cpus_per_worker) * s.ranks
        usd = cpu["usd_per_core_hour"] * cores * step * s.max_steps / 3600
        lines.append(f"time: {flops} at {s.mfu:.0%} of {cpu['gflops_per_core']} GFLOPS/core → {duration(step)}/step; "
                     f"{s.max_steps} steps ≈ {duration(step * s.max_steps)}, ≈ ${usd:.2f}")
    lines += [f"GPUs ({s.ranks} ranks, {flops}, {s.mfu:.0%} MFU, {s.max_steps} steps):",
              f"  {'gpu':<13}{'memory':>9}  {'fits':<5}{'step':>9}{'run':>10}{'cost':>10}"]
    for gpu in table()["gpus"]:
        step = step_seconds(plan, gpu)
        cost = gpu["usd_per_hour"] * s.ranks * step * s.max_steps / 3600
        lines.append(f"  {gpu['label']:<13}{gpu['memory_gib']:>6.1f} GiB  {'yes' if fits(plan, gpu) else 'no':<5}"
                     f"{duration(step):>9}{duration(step * s.max_steps):>10}{'$' + format(cost, ',.2f'):>10}")
    best = smallest_gpu(s, shape)
    lines.append(f"smallest fit: {best[1]} × {best[0]['label']}" if best else "smallest fit: none of these "
                 "(up to 8 GPUs): lower the batch or sequence, checkpoint gradients, quantize, or use ZeRO-3")
    if serve is not None:
        gpu = serving_on_gpu(serve, s.use_gpu)
        parts = plan_serving(shape, serve, gpu=gpu)
        lines += ["", f"serve (one {'GPU' if gpu else 'CPU'} replica, {serve.engine_dtype(gpu)}): "
                  + " + ".join(f"{p.name} {size(p.bytes)} ({p.note})" for p in parts)
                  + f" = {size(sum(p.bytes for p in parts))}"]
        if gpu:
            lines.append(render_serving_tp(serving_parallel(shape, serve, s), serve))
    return "\n".join(lines)


def render_serving_tp(tp: dict[str, Any], serve) -> str:
    """The serving replica's tensor parallelism (cluster.plan.serving_parallel), and what to set if anything."""
    line = (f"serve tensor parallelism: {tp['tensor_parallel_size']} × {tp['gpu_label']} ({tp['weights_gib_per_gpu']}"
            f" GiB of weights per GPU; the KV cache left at gpu_memory_utilization {serve.gpu_memory_utilization} "
            f"holds {tp['kv_sequences']:,} of the {serve.max_ongoing_requests} requests at the full "
            f"{serve.max_model_len} tokens); serve.tensor_parallel_size={tp['configured']}"
            if tp["tensor_parallel_size"] else "serve tensor parallelism: none fits")
    return line + (f"\n  → {tp['advice']}" if tp["advice"] else "")


def render_lora(shape: ModelShape, r: int, targets, dora: bool = False) -> str:
    """Per target module: in, out, r·(in + out) per matrix, the layers it matches, and the total (PEFT's trainable
    count), from the model's own linear layers where they can be listed (ModelShape.listing)."""
    lp = lora_params(shape, r, targets, dora)
    listing = shape.listing()
    base = listing.total_params if listing is not None else shape.total_params()
    return _lora_table(shape.name, r, lp, base, dora)


def render_lora_config(name: str, config: dict[str, Any], r: int, targets, dora: bool = False) -> str:
    """render_lora from a config.json alone: any family transformers can build on the meta device (GPT-2,
    GPT-NeoX, Falcon, Phi-3, MoE, ...), also those without a Llama-style decoder shape for the memory plan."""
    try:
        listing = lora_targets.describe(config)
    except Exception:  # no transformers, or a model type it does not know: the Llama-shape table
        return render_lora(ModelShape.from_config(config, name), r, targets, dora)
    return _lora_table(name, r, lora_targets.lora_counts(targets, listing.linears, r, dora), listing.total_params,
                       dora)


def _lora_table(name: str, r: int, lp: dict[str, dict[str, int]], base: int, dora: bool) -> str:
    total = sum(v["total"] for v in lp.values())
    width = max([11, *(len(t) + 2 for t in lp)])
    rows = [f"LoRA r={r} on {name}: A is r × in, B is out × r; per matrix r·(in + out)"
            + (" + out (DoRA's magnitude)" if dora else ""),
            f"  {'module':<{width}}{'in':>7}{'out':>7}{'per matrix':>13}{'layers':>8}{'total':>15}"]
    for t, v in lp.items():
        rows.append(f"  {t:<{width}}{v['in']:>7}{v['out']:>7}{v['per_matrix']:>13,}{v['count']:>8}{v['total']:>15,}")
    rows.append(f"  {'total':<{width}}{'':>35}{total:>15,}  = {100 * total / base:.3f}% of {base:,} base parameters")
    return "\n".join(rows)


def as_json(plan: TrainingPlan, serve=None) -> dict[str, Any]:
    s = plan.setup
    best = smallest_gpu(s, plan.shape)
    shape = {k: v for k, v in plan.shape.__dict__.items() if k != "config"}
    out = {"model": plan.shape.name, "shape": shape, "setup": s.__dict__,
           "trainable_params": plan.trainable, "base_params": plan.base_params,
           "components": {p.name: {"bytes": round(p.bytes), "note": p.note, "host": p.host,
                                   "transient": p.transient} for p in plan.parts},
           "peak_device_bytes": round(plan.device_bytes), "host_bytes": round(plan.host_bytes),
           "flops_per_step": plan.flops_per_step,
           "gpus": {g["name"]: {"fits": fits(plan, g), "step_s": step_seconds(plan, g),
                                "cost_usd": g["usd_per_hour"] * s.ranks * step_seconds(plan, g) * s.max_steps / 3600}
                    for g in table()["gpus"]},
           "smallest_fit": {"gpu": best[0]["name"], "count": best[1]} if best else None}
    if not s.use_gpu:
        out["cpu_step_s"] = step_seconds(plan, None)
    if serve is not None:
        gpu = serving_on_gpu(serve, s.use_gpu)
        out["serve"] = {p.name: round(p.bytes) for p in plan_serving(plan.shape, serve, gpu=gpu)}
        out["serve_dtype"] = serve.engine_dtype(gpu)
        out["serve"].update(serving_parallel(plan.shape, serve, s) if gpu else
                            {"tensor_parallel_size": serve.tensor_parallel_size, "gpu": None})
    return out
