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
  Under ZeRO-3 the 4-bit base is partitioned over the ranks (stored in the compute dtype: bnb_4bit_quant_storage)
  but for its quantization constants, and one module at a time is gathered whole (zero3_gather, peak only).
- lora / grads / optimizer: PEFT keeps adapters in fp32 under DDP; DeepSpeed bf16 casts them to bf16 and keeps an
  fp32 master, an fp32 gradient copy and Adam's two fp32 moments in the optimizer (ZeRO-1/2/3 partition those
  over the ranks, ZeRO-3 the weights too, offload moves them to host memory). 8-bit AdamW: 2 B/param (+ absmax)
  for tensors of at least 4096 values; smaller ones keep 8 B (bitsandbytes' min_8bit_size).
- activations (plan_shape.py): what autograd saves in the forward, per layer, without or with checkpointing;
  under 16-bit autocast (GPUs without DeepSpeed: the loop's rule) the attention's and adapters' saved inputs in
  16 bits; eager attention's s² probabilities. mask: a packed batch's (B, 1, L, L) block mask (bool for SDPA,
  float32 for eager), none with flash-attention 2 (varlen from position ids).
- logits: what causal_lm_loss saves: with train.loss_chunk_tokens (the lean loss) the label positions' hidden
  states, one chunk's logits in flight; with 0, the fp32 log-softmax over [tokens, vocab] and, in flight, one
  more fp32 copy and its gradient.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from cluster.plan_shape import BYTES, ModelShape, activation_bytes, layer_bytes, loss_bytes, table
from pipelines.schema import UserError
from pipelines.train.config import LoraSection, load_deepspeed_json
from pipelines.train.targets import lora_counts
from pipelines.train.targets import resolve as resolve_targets

GIB = 2**30
HALF = ("bfloat16", "float16")
Attn = Literal["sdpa", "flash_attention_2", "eager"]
# The attention mask a packed batch holds, bytes per (query, key) pair: SDPA gets a boolean block mask and eager
# an additive float32 one (pipelines.data.packing.attention_inputs); flash-attention 2 runs packed rows varlen
# from their position ids, with no mask at all.
PACKED_MASK_BYTES = {"sdpa": 1, "eager": 4, "flash_attention_2": 0}


def resolve_attn(requested: str, use_gpu: bool) -> Attn:
    """train.attn_implementation as the workers resolve it: auto is flash_attention_2 on GPUs when the flash-attn
    package is installed (here: where the plan runs), else sdpa; anything else as given."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    return "flash_attention_2" if use_gpu and importlib.util.find_spec("flash_attn") is not None else "sdpa"


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
    autocast: bool | None = None      # forward + loss under 16-bit autocast; None: the loop's rule (`amp`)
    attn: Attn = "sdpa"               # the attention kernel (train.attn_implementation, auto resolved)
    packed: bool = False              # rows packed into blocks (data.packing.enabled)
    prefetch_bucket: int = 50_000_000  # ZeRO-3's stage3_prefetch_bucket_size, in elements

    @classmethod
    def of(cls, cfg, **overrides) -> "Setup":
        """The setup a RunConfig describes; overrides replace single fields (e.g. ranks=8)."""
        ds = load_deepspeed_json(cfg.train.deepspeed)["zero_optimization"] if cfg.train.deepspeed != "none" else {}
        pack = cfg.data.packing
        seq = (pack.block_size or cfg.data.max_length) if pack.enabled else cfg.data.max_length
        chunk = getattr(cfg.train, "loss_chunk_tokens", 0) or None  # 0: the plain full-logits loss
        use_gpu = cfg.train.use_gpu
        found = cls(batch=cfg.train.batch_size, seq=seq, ranks=cfg.train.num_workers,
                    dtype=cfg.quant.compute_dtype if cfg.quant.load_in_4bit else cfg.model.dtype,
                    load_in_4bit=cfg.quant.load_in_4bit, double_quant=cfg.quant.double_quant, r=cfg.lora.r,
                    targets=tuple(cfg.lora.modules()), dropout=cfg.lora.dropout, optimizer=cfg.train.optimizer,
                    gradient_checkpointing=cfg.train.gradient_checkpointing, zero=int(ds.get("stage", 0)),
                    offload=ds.get("offload_optimizer", {}).get("device", "none") == "cpu",
                    reduce_bucket=int(ds.get("reduce_bucket_size", 50_000_000)), use_gpu=use_gpu,
                    cpus_per_worker=cfg.train.cpus_per_worker, grad_accum=cfg.train.grad_accum,
                    max_steps=cfg.train.max_steps, chunk_tokens=chunk,
                    attn=resolve_attn(getattr(cfg.train, "attn_implementation", "auto"), use_gpu),
                    packed=pack.enabled,
                    prefetch_bucket=int(ds.get("stage3_prefetch_bucket_size", 50_000_000)))
        found = replace(found, **overrides)
        return found if found.autocast is not None else replace(found, autocast=found.amp)

    @property
    def amp(self) -> bool:
        """Whether the forward and the loss run under autocast: as set, else a 16-bit compute dtype on GPUs
        without DeepSpeed (whose bf16/fp16 mode casts the module itself), the loop's rule
        (pipelines.train.engine.autocast_dtype)."""
        if self.autocast is not None:
            return self.autocast
        return self.use_gpu and self.dtype in HALF and self.zero == 0

    @property
    def mm_bytes(self) -> int:
        """Bytes per value of what the attention kernel and the adapters' matmuls save for backward: under
        autocast the compute dtype (autocast casts their inputs), else the residual stream's."""
        return BYTES[self.dtype] if self.amp else self.act_bytes

    @property
    def lora_saved_bytes(self) -> int:
        """The adapters' saved inputs and A·x: autocast's 16-bit copies, else the adapters' own dtype."""
        return BYTES[self.dtype] if self.amp else self.lora_bytes

    @property
    def lora_copies(self) -> bool:
        """Whether each adapter saves its own copy of its input: dropout makes one per target, and so does a
        cast (to the adapters' dtype by PEFT, or under autocast to the 16-bit dtype, a fresh copy per call)."""
        saved = self.lora_saved_bytes
        return self.dropout > 0 or self.act_bytes != saved or (self.amp and self.lora_bytes != saved)

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


def lora_targets(shape: ModelShape, spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """lora.target_modules (a preset or a list) as the names training puts a LoRA on: resolved against the
    model's own linear layers (ModelShape.listing, pipelines.train.targets.resolve), else a preset in Llama's
    names (LoraSection.modules) where no listing can be built."""
    listing = shape.listing()
    if listing is not None:
        return tuple(resolve_targets(spec, listing.linears))
    return tuple(LoraSection(target_modules=spec if isinstance(spec, str) else list(spec)).modules())


def lora_params(shape: ModelShape, r: int, targets: str | tuple[str, ...] | list[str], dora: bool = False
                ) -> dict[str, dict[str, int]]:
    """Trainable LoRA parameters per target module: r·(in + out) per matrix (A: r×in, B: out×r; + out for DoRA's
    magnitude), summed over every layer the name matches in the model's listing (count: how many), so the total
    is PEFT's trainable count; without a listing, Llama's seven matrices × layers. targets: a preset or names."""
    listing = shape.listing()
    if listing is not None:
        return lora_counts(targets, listing.linears, r, dora)
    targets = lora_targets(shape, targets)
    mats = shape.matrices()
    unknown = [t for t in targets if t not in mats]
    if unknown:
        raise UserError(f"lora.target_modules: {unknown} are not linear layers of a {shape.name or 'decoder'} "
                        f"layer ({', '.join(mats)})")
    return {t: {"in": mats[t][0], "out": mats[t][1], "per_matrix": r * (mats[t][0] + mats[t][1]) + dora * mats[t][1],
                "count": shape.layers, "total": (r * (mats[t][0] + mats[t][1]) + dora * mats[t][1]) * shape.layers}
            for t in targets}


def nf4_bytes(shape: ModelShape, double_quant: bool) -> float:
    """The packed 4-bit linear weights with their quantization constants (blocks of 64 values)."""
    n = shape.linear_params()
    absmax = n / 64 * (1 + 4 / 256) if double_quant else n / 64 * 4
    per_matrix = 16 * 4 + (256 * 4 + 4 if double_quant else 0)  # NF4 code book (+ 8-bit code book, offset)
    return n / 2 + absmax + per_matrix * 7 * shape.layers


def qlora_weights(s: Setup, shape: ModelShape) -> tuple[float, str]:
    """A 4-bit base's bytes on one rank: the packed NF4 weights, their quantization constants and the floating
    rest. ZeRO-3 partitions it over the ranks like any parameter: the packed weights are stored in the 16-bit
    compute dtype (bnb_4bit_quant_storage, 4 values an element) and the floating rest is ordinary parameters,
    while the quantization constants (absmax, code books) ride on each weight's quant_state, not a parameter,
    and stay whole on every rank."""
    quant = nf4_bytes(shape, s.double_quant)
    packed, rest = shape.linear_params() / 2, shape.float_params() * s.float_bytes
    note = f"NF4{' + double quant' if s.double_quant else ''}; the rest {_dt(s.float_bytes)}"
    if s.zero != 3:
        return quant + rest, note
    return (packed + rest) / s.ranks + quant - packed, note + f" / {s.ranks} ranks (ZeRO-3; absmax on every rank)"


def zero3_gather_bytes(s: Setup, shape: ModelShape) -> float:
    """What ZeRO-3 gathers whole for the module being computed: the largest one (the embedding or LM head, else
    one decoder layer) plus the prefetch bucket (stage3_prefetch_bucket_size elements of the 16-bit storage).
    DeepSpeed may keep more gathered (up to stage3_max_live_parameters) when a parameter is reused soon."""
    fb = s.float_bytes if s.load_in_4bit else BYTES[s.dtype]
    per_layer = shape.linear_params() / shape.layers * (0.5 if s.load_in_4bit else fb) + 2 * shape.hidden * fb
    largest = max(shape.vocab * shape.hidden * fb, per_layer)
    return min(largest + s.prefetch_bucket * BYTES[s.dtype], shape.linear_params() * (0.5 if s.load_in_4bit else fb)
               + shape.float_params() * fb)


def optimizer_bytes(s: Setup, sizes: list[int]) -> float:
    """Optimizer state for trainable tensors of these sizes (DDP; ZeRO is handled by the caller)."""
    if s.optimizer == "adamw":
        return 8.0 * sum(sizes)
    return float(sum(2 * n + 2 * 4 * n / 256 if n >= 4096 else 8 * n for n in sizes))


def plan_training(cfg, shape: ModelShape, **overrides) -> TrainingPlan:
    """The per-device plan of cfg's SFT stage; overrides go to Setup (ranks=, full_finetune=, lora_dtype=...)."""
    overrides.setdefault("targets", lora_targets(shape, cfg.lora.target_modules))
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
        sizes = [s.r * n for v in lp.values() for n in (v["in"], v["out"]) for _ in range(v["count"])]
        if s.load_in_4bit:
            w, note = qlora_weights(s, shape)
        else:
            w = shape.total_params() * BYTES[s.dtype] / (s.ranks if s.zero == 3 else 1)
            note = s.dtype + (f" / {s.ranks} ranks (ZeRO-3)" if s.zero == 3 else "")
        weights = Part("weights", w, note)
    lb = BYTES[s.dtype] if s.full_finetune else s.lora_bytes
    parts = [weights]
    if not s.full_finetune:
        parts.append(Part("lora", trainable * lb / (s.ranks if s.zero == 3 else 1), f"{trainable:,} params, {_dt(lb)}"))
    parts += _grads_and_optimizer(s, trainable, sizes, lb, shards)
    if s.zero == 3:
        parts.append(Part("zero3_gather", zero3_gather_bytes(s, shape),
                          "the largest module gathered whole + the prefetch bucket", transient=True))
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
    a, lb, mask = s.act_bytes, s.lora_saved_bytes, 1 if s.use_gpu else 4
    how = {"m": s.mm_bytes, "copies": s.lora_copies, "attn": s.attn}
    saved = activation_bytes(shape, s.batch, s.seq, a, lb, s.r, s.targets, s.dropout, s.gradient_checkpointing,
                             full=s.full_finetune, mask_bytes=mask, **how)
    gc = "layer inputs only (gradient checkpointing)" if s.gradient_checkpointing else "per layer, saved for backward"
    amp = f", autocast {s.dtype}" if s.amp else ""
    parts = [Part("activations", saved, f"{s.batch}×{s.seq} tokens, {gc}, {s.attn}{amp}")]
    if s.gradient_checkpointing:
        parts.append(Part("recompute", layer_bytes(shape, tokens, a, lb, s.r, s.targets, s.dropout,
                                                   full=s.full_finetune, mask_bytes=mask, seq=s.seq, **how),
                          "one layer recomputed in backward", transient=True))
    if s.packed and PACKED_MASK_BYTES[s.attn]:
        b = PACKED_MASK_BYTES[s.attn]
        parts.append(Part("mask", s.batch * s.seq ** 2 * b, f"packed rows' (batch, 1, L, L) block mask, "
                          f"{'bool' if b == 1 else _dt(b)}, for {s.attn} (flash_attention_2 needs none)"))
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
        plan = plan_setup(replace(setup, ranks=n, use_gpu=True, autocast=None), shape)
        for gpu in gpus:
            if fits(plan, gpu):
                return gpu, n
    return None


def serving_on_gpu(serve, use_gpu: bool) -> bool:
    """Whether the plan's serving replica is a GPU one: serve.accelerator, 'auto' following the training's."""
    return serve.accelerator == "gpu" or (serve.accelerator == "auto" and use_gpu)


def plan_serving(shape: ModelShape, serve, targets: tuple[str, ...] | None = None, gpu: bool = False
                 ) -> list[Part]:
    """One engine replica: weights + KV cache (max_model_len tokens × max_ongoing_requests × layers × kv heads ×
    head_dim × 2 (K and V) × dtype) + vLLM's LoRA slots (max_loras × max_lora_rank over every linear layer);
    dtype: serve.engine_dtype(gpu)."""
    dtype = serve.engine_dtype(gpu)
    b = BYTES[dtype]
    tokens = serve.max_model_len * serve.max_ongoing_requests
    slots = sum(v["total"] for v in lora_params(shape, serve.max_lora_rank, targets or "all-linear").values())
    return [Part("weights", shape.total_params() * b, dtype),
            Part("kv_cache", tokens * shape.layers * shape.kv_dim * 2 * b,
                 f"{serve.max_model_len} tokens × {serve.max_ongoing_requests} requests"),
            Part("lora_slots", (serve.max_loras + 1) * slots * b,
                 f"{serve.max_loras} + 1 slots × rank {serve.max_lora_rank}")]


@dataclass(frozen=True)
class ServingFit:
    """One GPU of an engine replica sharded over `tp` GPUs (vLLM tensor parallelism), in bytes."""

    gpu: dict[str, Any]
    tp: int
    weights: float     # the base in the engine's dtype, / tp
    reserve: float     # LoRA slots, the profile run's activations, CUDA context, graphs and NCCL buffers
    kv_per_seq: float  # the KV cache of one max_model_len sequence
    budget: float      # serve.gpu_memory_utilization of the GPU: what vLLM allows itself

    @property
    def sequences(self) -> int:
        """Full-length sequences the KV cache left over holds (vLLM's "maximum concurrency")."""
        return max(0, int((self.budget - self.weights - self.reserve) // self.kv_per_seq))


def tp_sizes(shape: ModelShape, most: int = 8) -> list[int]:
    """Powers of two up to one node's GPUs that vLLM can shard this model over: each divides the attention heads
    and the KV heads, or is a multiple of the KV heads (vLLM then replicates each KV head)."""
    sizes = [n for n in (1, 2, 4, 8, 16) if n <= most]
    return [n for n in sizes if shape.heads % n == 0 and (shape.kv_heads % n == 0 or n % shape.kv_heads == 0)]


def serving_fit(shape: ModelShape, serve, gpu: dict[str, Any], tp: int) -> ServingFit:
    """One GPU of a replica over `tp` GPUs. weights: every parameter / tp (vLLM shards the linears, embedding and
    LM head; the norms, replicated, are left out). KV: one max_model_len sequence, kv heads / tp (at least one).
    reserve: vLLM's profile run at its OpenAI-server defaults (max_num_batched_tokens 8192 and max_num_seqs 1024
    on cards of 70 GiB or more but A100s, else 2048 and 256): the tokens through one layer's sharded projections
    (q, k, v, gate, up, silu) and two fp32 residual copies, and the sampler's fp32 logits and probabilities over
    every row; the LoRA slots (max_loras + 1 at max_lora_rank on all seven linears: column-parallel layers shard
    B, row-parallel A); gpus.json's reserve_gib (CUDA context) and serve_overhead_gib (CUDA graphs, NCCL)."""
    b = BYTES[serve.engine_dtype(True)]
    big = gpu["memory_gib"] >= 70 and "A100" not in gpu["name"]
    tokens, seqs = (8192, 1024) if big else (2048, 256)
    h, i = shape.hidden, shape.intermediate
    act = tokens * (b * (3 * i + shape.q_dim + 2 * shape.kv_dim) / tp + 8 * h) + seqs * shape.vocab * 8
    r, rows = serve.max_lora_rank, ("o_proj", "down_proj")
    slot = sum(r * (din / tp + dout) if name in rows else r * (din + dout / tp)
               for name, (din, dout) in shape.matrices().items()) * shape.layers
    extra = (table()["reserve_gib"] + table()["serve_overhead_gib"]) * GIB
    kv_heads = max(1, shape.kv_heads // tp)
    return ServingFit(gpu=gpu, tp=tp, weights=shape.total_params() * b / tp,
                      reserve=act + (serve.max_loras + 1) * slot * b + extra,
                      kv_per_seq=serve.max_model_len * shape.layers * 2 * kv_heads * shape.head_dim * b,
                      budget=serve.gpu_memory_utilization * gpu["memory_gib"] * GIB)


def serving_tp(shape: ModelShape, serve, gpu: dict[str, Any]) -> ServingFit | None:
    """The smallest tensor-parallel size (a power of two vLLM accepts, up to 8 GPUs of one node) at which the
    base, its reserve and the KV cache of one full max_model_len sequence (vLLM's floor to start) fit one GPU of
    this type; None when none does."""
    return next((f for f in (serving_fit(shape, serve, gpu, n) for n in tp_sizes(shape)) if f.sequences >= 1),
                None)


def serving_choice(shape: ModelShape, serve, setup: Setup) -> tuple[ServingFit | None, dict[str, Any] | None]:
    """(the replica's GPUs, the node type it was asked of): on the GPU type training's smallest fit picked when it
    trains on GPUs (the node type the run asks for); when that is not the case, or the base does not fit 8 of
    them, as smallest_gpu picks: the fewest GPUs, then the smallest (then cheapest) type."""
    trained = smallest_gpu(setup, shape) if setup.use_gpu else None
    if trained is not None:
        fit = serving_tp(shape, serve, trained[0])
        if fit is not None:
            return fit, trained[0]
    gpus = sorted(table()["gpus"], key=lambda g: (g["memory_gib"], g["usd_per_hour"]))
    fits = [f for f in (serving_tp(shape, serve, g) for g in gpus) if f is not None]
    # min keeps the first of equal sizes: the smallest type
    return (min(fits, key=lambda f: f.tp) if fits else None), (trained[0] if trained else None)


def serving_parallel(shape: ModelShape, serve, setup: Setup) -> dict[str, Any]:
    """serve.tensor_parallel_size as `loraforge plan` reports it (text and --json): the size the base needs on
    the chosen GPU type (serving_choice), what one GPU then holds, and `advice` naming what to set when the
    configured size is too small or one vLLM cannot shard this model over, when the base needs another GPU type
    than training's, or when nothing up to 8 GPUs of any type fits."""
    (fit, asked), want = serving_choice(shape, serve, setup), serve.tensor_parallel_size
    out: dict[str, Any] = {"tensor_parallel_size": fit.tp if fit else None, "configured": want,
                           "gpu": fit.gpu["name"] if fit else None, "gpu_label": fit.gpu["label"] if fit else None,
                           "weights_gib_per_gpu": round(fit.weights / GIB, 2) if fit else None,
                           "kv_sequences": fit.sequences if fit else 0, "advice": None}
    dtype = serve.engine_dtype(True)
    if fit is None:
        out["advice"] = (f"the base in {dtype} does not fit 8 GPUs of any type in cluster/gpus.json with the KV "
                         "cache of one sequence: serve a quantized model (quantize stage), or lower "
                         "serve.max_model_len")
        return out
    where = fit.gpu["label"]
    if asked is not None and asked["name"] != fit.gpu["name"]:
        where = f"{where} (not on 8 × {asked['label']}, training's GPU type)"
    if want not in tp_sizes(shape, 16):
        out["advice"] = (f"serve.tensor_parallel_size={want}: vLLM cannot shard {shape.heads} attention heads / "
                         f"{shape.kv_heads} KV heads {want} ways; set serve.tensor_parallel_size={fit.tp}")
    elif want < fit.tp:
        one = "is left at 1: the base does not fit one GPU" if want == 1 else f"={want} is too small"
        out["advice"] = (f"serve.tensor_parallel_size {one} ({fit.weights * fit.tp / GIB:,.1f} GiB of {dtype} "
                         f"weights + the KV cache of one {serve.max_model_len}-token sequence); set "
                         f"serve.tensor_parallel_size={fit.tp}: {fit.tp} × {where}")
    elif where != fit.gpu["label"]:
        out["advice"] = f"the replica needs {fit.tp} × {where}"
    return out


def _dt(b: int) -> str:
    return {4: "fp32", 2: "16-bit", 1: "int8"}.get(b, f"{b} B")
