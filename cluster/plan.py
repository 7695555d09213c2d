"""The planner: what a run config needs per device (memory), per step (time) and per run (cost), by arithmetic
alone: no torch, no Ray (a model's shape comes from its config.json, or cluster/gpus.json for models not on disk).

    loraforge plan configs/quickstart-cpu.yaml              # memory per worker, step time, cost, smallest GPU
    loraforge plan configs/quickstart-cpu.yaml --lora       # trainable parameters per target module
    loraforge plan configs/sft-qwen2.5-7b-qlora-1n8g-zero2.yaml --json

Each component is what our trainer really holds (pipelines.train.base / engine / sft), and
tests/integration/test_plan_measured.py counts the same components on the real objects of a real step:
- weights: the frozen base. NF4 packs a linear weight into 0.5 B/param plus its absmax (fp32 per 64 params, or
  8-bit per 64 + fp32 per 256 blocks with double quantization); embeddings, norms and biases stay in floating
  point, upcast to fp32 by peft.prepare_model_for_kbit_training (DeepSpeed's bf16 casts them back to bf16).
- lora / grads / optimizer: PEFT keeps adapters in fp32 under DDP; DeepSpeed bf16 casts them to bf16 and keeps an
  fp32 master, an fp32 gradient copy and Adam's two fp32 moments in the optimizer (ZeRO-1/2/3 partition those
  over the ranks, ZeRO-3 the weights too, offload moves them to host memory). 8-bit AdamW: 2 B/param (+ absmax)
  for tensors of at least 4096 values; smaller ones keep 8 B (bitsandbytes' min_8bit_size).
- activations (plan_shape.py): what autograd saves in the forward, per layer, without or with checkpointing.
- logits: what causal_lm_loss saves: with train.loss_chunk_tokens (the lean loss) the label positions' hidden
  states, one chunk's logits in flight; with 0, the fp32 log-softmax over [tokens, vocab] and, in flight, one
  more fp32 copy and its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from cluster.plan_shape import BYTES, ModelShape, activation_bytes, layer_bytes, loss_bytes, table
from pipelines.schema import UserError
from pipelines.train.config import load_deepspeed_json

GIB = 2**30


@dataclass(frozen=True)
class Setup:
    """What the plan depends on, read from a run config (Setup.of) or written out (the unit tests)."""

    batch: int = 1
    seq: int = 512
    ranks: int = 1
    dtype: str = "bfloat16"           # compute dtype (quant.compute_dtype under QLoRA, else model.dtype)
    load_in_4bit: bool = False
    double_quant: bool = True
    r: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    dropout: float = 0.0
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    zero: int = 0                     # DeepSpeed ZeRO stage; 0 = DDP
    offload: bool = False             # ZeRO optimizer state in host memory
    reduce_bucket: int = 50_000_000   # DeepSpeed's gradient bucket, in elements
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    grad_accum: int = 1
    max_steps: int = 1
    mfu: float = 0.4                  # the stated utilisation: achieved / peak FLOP/s
    full_finetune: bool = False       # every weight trains (16-bit mixed precision: 2 + 2 + 12 B/param)
    lora_dtype: str | None = None     # override the adapters' dtype (the QLoRA paper keeps them in bf16)
    chunk_tokens: int | None = None   # a chunked loss: logits for this many tokens at a time

    @classmethod
    def of(cls, cfg, **overrides) -> "Setup":
        """The setup a RunConfig describes; overrides replace single fields (e.g. ranks=8)."""
        ds = load_deepspeed_json(cfg.train.deepspeed)["zero_optimization"] if cfg.train.deepspeed != "none" else {}
        pack = cfg.data.packing
        seq = (pack.block_size or cfg.data.max_length) if pack.enabled else cfg.data.max_length
        chunk = getattr(cfg.train, "loss_chunk_tokens", 0) or None  # 0: the plain full-logits loss
        found = cls(batch=cfg.train.batch_size, seq=seq, ranks=cfg.train.num_workers,
                    dtype=cfg.quant.compute_dtype if cfg.quant.load_in_4bit else cfg.model.dtype,
                    load_in_4bit=cfg.quant.load_in_4bit, double_quant=cfg.quant.double_quant, r=cfg.lora.r,
                    targets=tuple(cfg.lora.modules()), dropout=cfg.lora.dropout, optimizer=cfg.train.optimizer,
                    gradient_checkpointing=cfg.train.gradient_checkpointing, zero=int(ds.get("stage", 0)),
                    offload=ds.get("offload_optimizer", {}).get("device", "none") == "cpu",
                    reduce_bucket=int(ds.get("reduce_bucket_size", 50_000_000)), use_gpu=cfg.train.use_gpu,
                    cpus_per_worker=cfg.train.cpus_per_worker, grad_accum=cfg.train.grad_accum,
                    max_steps=cfg.train.max_steps, chunk_tokens=chunk)
        return replace(found, **overrides)

    @property
    def ds_cast(self) -> bool:
        """DeepSpeed's bf16 mode casts every floating parameter (adapters, norms, embeddings) to bf16."""
        return self.zero > 0 and self.dtype == "bfloat16"

    @property
    def lora_bytes(self) -> int:
        if self.lora_dtype:
            return BYTES[self.lora_dtype]
        return BYTES[self.dtype] if (self.ds_cast or self.full_finetune) else 4

    @property
    def float_bytes(self) -> int:
        """Bytes of the base's non-quantized floating parameters (all of them without QLoRA)."""
        if self.load_in_4bit and not self.ds_cast:
            return 4  # prepare_model_for_kbit_training upcasts them
        return BYTES[self.dtype]

    @property
    def act_bytes(self) -> int:
        """The residual stream's dtype: fp32 under QLoRA without DeepSpeed (the upcast norms' outputs are fp32,
        and bitsandbytes returns its input's dtype), else the compute dtype."""
        return self.float_bytes if self.load_in_4bit else BYTES[self.dtype]


@dataclass(frozen=True)
class Part:
    name: str
    bytes: float
    note: str = ""
    host: bool = False       # held in host memory (offloaded), not on the device
    transient: bool = False  # only at the peak (backward), not saved through the forward


@dataclass
class TrainingPlan:
    shape: ModelShape
    setup: Setup
    parts: list[Part]
    trainable: int
    base_params: int
    flops_per_step: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device_bytes(self) -> float:
        """Peak bytes on one device (one GPU, or one CPU worker's RAM)."""
        return sum(p.bytes for p in self.parts if not p.host)

    @property
    def host_bytes(self) -> float:
        return sum(p.bytes for p in self.parts if p.host)

    def get(self, name: str) -> float:
        return sum(p.bytes for p in self.parts if p.name == name)


def lora_params(shape: ModelShape, r: int, targets: tuple[str, ...] | list[str]) -> dict[str, dict[str, int]]:
    """Trainable LoRA parameters per target module: r·(in + out) per matrix (A: r×in, B: out×r), × layers."""
    mats = shape.matrices()
    unknown = [t for t in targets if t not in mats]
    if unknown:
        raise UserError(f"lora.target_modules: {unknown} are not linear layers of a {shape.name or 'decoder'} "
                        f"layer ({', '.join(mats)})")
    return {t: {"in": mats[t][0], "out": mats[t][1], "per_matrix": r * (mats[t][0] + mats[t][1]),
                "total": r * (mats[t][0] + mats[t][1]) * shape.layers} for t in targets}


def nf4_bytes(shape: ModelShape, double_quant: bool) -> float:
    """The packed 4-bit linear weights with their quantization constants (blocks of 64 values)."""
    n = shape.linear_params()
    absmax = n / 64 * (1 + 4 / 256) if double_quant else n / 64 * 4
    per_matrix = 16 * 4 + (256 * 4 + 4 if double_quant else 0)  # NF4 code book (+ 8-bit code book, offset)
    return n / 2 + absmax + per_matrix * 7 * shape.layers


def optimizer_bytes(s: Setup, sizes: list[int]) -> float:
    """Optimizer state for trainable tensors of these sizes (DDP; ZeRO is handled by the caller)."""
    if s.optimizer == "adamw":
        return 8.0 * sum(sizes)
    return float(sum(2 * n + 2 * 4 * n / 256 if n >= 4096 else 8 * n for n in sizes))


def plan_training(cfg, shape: ModelShape, **overrides) -> TrainingPlan:
    """The per-device plan of cfg's SFT stage; overrides go to Setup (ranks=, full_finetune=, lora_dtype=...)."""
    return plan_setup(Setup.of(cfg, **overrides), shape)


def plan_setup(s: Setup, shape: ModelShape) -> TrainingPlan:
    """Every memory component of one device, and the step's FLOPs (see the module docstring)."""
    shards = s.ranks if s.zero else 1
    if s.full_finetune:
        trainable, sizes = shape.total_params(), [shape.total_params()]
        weights = Part("weights", shape.total_params() * BYTES[s.dtype] / (s.ranks if s.zero == 3 else 1),
                       "every weight trains: 16-bit")
    else:
        lp = lora_params(shape, s.r, s.targets)
        trainable = sum(v["total"] for v in lp.values())
        sizes = [s.r * n for v in lp.values() for n in (v["in"], v["out"]) for _ in range(shape.layers)]
        if s.load_in_4bit:
            w = nf4_bytes(shape, s.double_quant) + shape.float_params() * s.float_bytes
            note = f"NF4{' + double quant' if s.double_quant else ''}; the rest {_dt(s.float_bytes)}"
        else:
            w = shape.total_params() * BYTES[s.dtype] / (s.ranks if s.zero == 3 else 1)
            note = s.dtype + (f" / {s.ranks} ranks (ZeRO-3)" if s.zero == 3 else "")
        weights = Part("weights", w, note)
    lb = BYTES[s.dtype] if s.full_finetune else s.lora_bytes
    parts = [weights]
    if not s.full_finetune:
        parts.append(Part("lora", trainable * lb / (s.ranks if s.zero == 3 else 1), f"{trainable:,} params, {_dt(lb)}"))
    parts += _grads_and_optimizer(s, trainable, sizes, lb, shards)
    parts += _activations(s, shape)
    return TrainingPlan(shape=shape, setup=s, parts=parts, trainable=trainable, base_params=shape.total_params(),
                        flops_per_step=train_flops(s, shape, trainable) * s.batch * s.seq * s.grad_accum)


def _grads_and_optimizer(s: Setup, trainable: int, sizes: list[int], lb: int, shards: int) -> list[Part]:
    if s.zero == 0 and not s.full_finetune:
        parts = [Part("grads", trainable * lb, _dt(lb)),
                 Part("optimizer", optimizer_bytes(s, sizes), s.optimizer)]
        if s.ranks > 1:
            parts.append(Part("ddp_buckets", trainable * lb, "DDP's reducer keeps a bucketed copy of the grads"))
        return parts
    # DeepSpeed (or 16-bit full fine-tuning): fp32 master + Adam moments (12 B) and, in 16 bits, an fp32 copy of
    # the gradient partition at the step; both partitioned over the ranks under ZeRO.
    where = " on the host" if s.offload else ""
    master = (12.0 if s.optimizer == "adamw" else 4.0) * trainable + (optimizer_bytes(s, sizes) if s.optimizer
                                                                      != "adamw" else 0)
    fp32_grads = 4.0 * trainable if lb == 2 and s.zero else 0.0
    parts = [Part("grads", trainable * lb / shards, f"{_dt(lb)}" + (f" / {shards} ranks" if shards > 1 else "")),
             Part("optimizer", (master + fp32_grads) / shards,
                  "fp32 master + AdamW moments" + (" + fp32 grads" if fp32_grads else "")
                  + (f" / {shards} ranks" if shards > 1 else "") + where, host=s.offload)]
    if s.zero:
        parts.append(Part("zero_buckets", min(trainable, s.reduce_bucket) * lb, "DeepSpeed's gradient bucket"))
    return parts


def _activations(s: Setup, shape: ModelShape) -> list[Part]:
    tokens = s.batch * s.seq
    a, lb, mask = s.act_bytes, s.lora_bytes, 1 if s.use_gpu else 4
    saved = activation_bytes(shape, s.batch, s.seq, a, lb, s.r, s.targets, s.dropout, s.gradient_checkpointing,
                             full=s.full_finetune, mask_bytes=mask)
    gc = "layer inputs only (gradient checkpointing)" if s.gradient_checkpointing else "per layer, saved for backward"
    parts = [Part("activations", saved, f"{s.batch}×{s.seq} tokens, {gc}")]
    if s.gradient_checkpointing:
        parts.append(Part("recompute", layer_bytes(shape, tokens, a, lb, s.r, s.targets, s.dropout,
                                                   full=s.full_finetune, mask_bytes=mask),
                          "one layer recomputed in backward", transient=True))
    kept, peak = loss_bytes(shape, s.batch, s.seq, a, s.chunk_tokens)
    chunked = f"chunked loss, {s.chunk_tokens} tokens a chunk"
    parts += [Part("logits", kept, f"{chunked}: label positions' hidden states" if s.chunk_tokens
                   else "fp32 log-softmax over [tokens, vocab], saved by the loss"),
              Part("logits_peak", peak, "one chunk's logits, recomputed in backward" if s.chunk_tokens
                   else "one more fp32 copy + its gradient", transient=True)]
    return parts


def train_flops(s: Setup, shape: ModelShape, trainable: int) -> float:
    """FLOPs per token of one training step (PaLM's convention: matmuls only, attention unmasked).

    N = base matmul parameters (linear layers + lm_head; the embedding lookup is free), A = 4·L·seq·q_dim the
    attention scores and mix of one forward. A frozen base needs no weight gradients, so its backward is one
    pass (activation grads, 2N) where full training pays two (4N); LoRA's own matrices cost 6 per parameter:
        LoRA:  (4 + 2g)·N + (6 + 2g)·N_lora + (3 + g)·A        full:  (6 + 2g)·N + (3 + g)·A
    with g = 1 under gradient checkpointing (one more forward). Not 6·N·tokens: that counts weight gradients
    a frozen base never computes."""
    n = shape.linear_params() + shape.vocab * shape.hidden
    attn = 4.0 * shape.layers * s.seq * shape.q_dim
    g = 1 if s.gradient_checkpointing else 0
    if s.full_finetune:
        return (6 + 2 * g) * n + (3 + g) * attn
    return (4 + 2 * g) * n + (6 + 2 * g) * trainable + (3 + g) * attn


def step_seconds(plan: TrainingPlan, gpu: dict[str, Any] | None) -> float:
    """Seconds per optimizer step on one device at the setup's utilisation (mfu)."""
    s = plan.setup
    if gpu is None:
        peak = table()["cpu"]["gflops_per_core"] * 1e9 * max(1.0, s.cpus_per_worker)
    else:
        peak = gpu["bf16_tflops"] * 1e12
    return plan.flops_per_step / (peak * s.mfu)


def fits(plan: TrainingPlan, gpu: dict[str, Any]) -> bool:
    return plan.device_bytes <= (gpu["memory_gib"] - table()["reserve_gib"]) * GIB


def smallest_gpu(setup: Setup, shape: ModelShape, counts=(1, 2, 4, 8)) -> tuple[dict[str, Any], int] | None:
    """The fewest GPUs, then the smallest (then cheapest) type, on which each rank fits; None when none does.
    More ranks only help under ZeRO (partitioned state); DDP replicates everything."""
    gpus = sorted(table()["gpus"], key=lambda g: (g["memory_gib"], g["usd_per_hour"]))
    for n in counts:
        plan = plan_setup(replace(setup, ranks=n, use_gpu=True), shape)
        for gpu in gpus:
            if fits(plan, gpu):
                return gpu, n
    return None


def serving_on_gpu(serve, use_gpu: bool) -> bool:
    """Whether the plan's serving replica is a GPU one: serve.accelerator, 'auto' following the training's."""
    return serve.accelerator == "gpu" or (serve.accelerator == "auto" and use_gpu)


def plan_serving(shape: ModelShape, serve, lora_targets: tuple[str, ...] | None = None, gpu: bool = False
                 ) -> list[Part]:
    """One engine replica: weights + KV cache (max_model_len tokens × max_ongoing_requests × layers × kv heads ×
    head_dim × 2 (K and V) × dtype) + vLLM's LoRA slots (max_loras × max_lora_rank over every linear layer);
    dtype: serve.engine_dtype(gpu)."""
    dtype = serve.engine_dtype(gpu)
    b = BYTES[dtype]
    tokens = serve.max_model_len * serve.max_ongoing_requests
    slots = sum(v["total"] for v in lora_params(shape, serve.max_lora_rank, lora_targets or
                                                tuple(shape.matrices())).values())
    return [Part("weights", shape.total_params() * b, dtype),
            Part("kv_cache", tokens * shape.layers * shape.kv_dim * 2 * b,
                 f"{serve.max_model_len} tokens × {serve.max_ongoing_requests} requests"),
            Part("lora_slots", serve.max_loras * slots * b, f"{serve.max_loras} × rank {serve.max_lora_rank}")]


def _dt(b: int) -> str:
    return {4: "fp32", 2: "16-bit", 1: "int8"}.get(b, f"{b} B")
