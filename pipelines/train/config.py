"""The training config: the adapter (LoRA), quantization (QLoRA), loop (Train) and DPO sections, the checks on
their combinations, the DeepSpeed ZeRO config they select, and `WorkerJob`, the one typed object a Ray Train worker
receives. Pure pydantic: importing it imports neither torch nor Ray.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from pipelines.artifacts.location import Location
from pipelines.artifacts.models import on_this_node
from pipelines.data.rowformats import check_columns
from pipelines.schema import Section
from pipelines.train.state_seal import machine_key

AUTO_MIN_STEPS = 10  # checkpoint_every=auto never checkpoints more often than this (short runs)
# Llama/Qwen2's names for the presets: what pipelines.train.targets resolves them to on those families, and the
# fallback where a model's module listing is not at hand (a known shape without config.json or transformers).
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL_LINEAR = ATTENTION + MLP
DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


class LoraSection(Section):
    """The adapter's shape."""

    r: int = Field(16, ge=1, le=256, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["attention", "mlp", "all-linear"] | list[str] = Field("all-linear", description=(
        "'all-linear' (every linear layer but the output head; on mixture-of-experts models the attention and "
        "shared layers, never the experts or the router), 'attention', 'mlp' (the feed-forward block), resolved "
        "from the model's own modules (Phi-3's qkv_proj, GPT-2's c_attn, ...), or an explicit list of module names "
        "(each must match a linear layer: its full name, or a suffix after a '.')."))
    rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    dora: bool = Field(False, description="Weight-decomposed LoRA. Trains, but vLLM cannot serve it: serve refuses.")

    def modules(self) -> list[str]:
        """The explicit list, or a preset in Llama/Qwen2's names (ATTENTION, MLP, ALL_LINEAR). Training resolves
        presets against the model itself (pipelines.train.targets.resolve); this is the fallback where no module
        listing is at hand."""
        if isinstance(self.target_modules, list):
            return self.target_modules
        return {"attention": ATTENTION, "mlp": MLP}.get(self.target_modules, ALL_LINEAR)


class QuantSection(Section):
    """QLoRA: the frozen base in 4-bit NF4 through bitsandbytes (CPU backend here, CUDA on clusters)."""

    load_in_4bit: bool = Field(False, description="Load the frozen base in 4-bit (QLoRA).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Dtype of the 4-bit matmuls. bfloat16 on GPUs; float32 is faster on CPUs without bf16.")


class TrainSection(Section):
    """The optimisation loop and how many Ray Train workers run it."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(0.5, gt=0, description=(
        "CPUs reserved per worker. Fractional on small machines so Ray Data keeps room to feed them."))
    use_gpu: bool = Field(False, description="One GPU per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK", description=(
        "How Ray places the workers' bundles: PACK fills a node first; STRICT_SPREAD puts each worker on its own "
        "node (Ray placement-group strategies)."))
    max_steps: int = Field(60, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Rows per worker per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (cosine decay after warmup).")
    warmup_steps: int = Field(5, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="torch AdamW, or bitsandbytes 8-bit / paged 8-bit AdamW.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field("auto", description=(
        "Attention kernel. auto: flash_attention_2 on a GPU when the flash-attn package is installed, else sdpa. "
        "Packed rows: flash_attention_2 runs them varlen from position ids (no mask); sdpa gets a boolean "
        "block mask built on the device; eager a float one."))
    tf32: bool = Field(True, description="Allow TF32 for float32 matmuls on GPUs (Ampere and newer).")
    throughput_warmup_steps: int = Field(2, ge=0, description=(
        "Steps left out of the reported tokens/s (allocator warm-up, kernel selection); validation and "
        "checkpoints are never counted."))
    loss_chunk_tokens: int = Field(128, ge=0, description=(
        "Lean loss: label tokens per chunk through the LM head, each chunk's float32 logits recomputed in backward "
        "(never all at once). 0: the plain loss over the full [tokens, vocab] logits."))
    deepspeed: Literal["none", "zero2", "zero3", "zero2-offload", "zero3-offload"] | str = Field(
        "none", description="DeepSpeed ZeRO config: a name from configs/deepspeed/ or a JSON path; 'none' = DDP.")
    eval_every: Annotated[int, Field(ge=0)] | Literal["auto"] = Field("auto", description=(
        "Validation loss every N steps (0: only at the end), when the data has a validation split. auto: with "
        "every checkpoint (checkpoint_every's cadence), so each checkpoint is ranked on a fresh eval_loss."))
    eval_max_batches: int = Field(8, ge=1, description="Validation micro-batches per evaluation, per worker.")
    early_stopping_patience: int = Field(0, ge=0, description="Stop after N evaluations without improvement (0: off).")
    checkpoint_every: Annotated[int, Field(ge=0)] | Literal["auto"] = Field("auto", description=(
        f"Checkpoint every N steps (0: only at the end). auto: every 10% of max_steps (at least every "
        f"{AUTO_MIN_STEPS} steps), and sooner once checkpoint_minutes of training steps passed since the last one: "
        "a killed worker or driver resumes from there and loses little."))
    checkpoint_minutes: float = Field(10.0, gt=0, description=(
        "checkpoint_every=auto: the most minutes of measured step time between two checkpoints."))
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (the best by validation loss among them).")
    max_failures: int = Field(2, ge=0, description=(
        "Worker-group restarts Ray Train attempts, from the last checkpoint."))
    fail_once_at_step: int | None = Field(None, ge=1, description=(
        "Fault drill: the rank-0 worker process kills itself (SIGKILL) once at this step (marker in the storage "
        "folder), to exercise recovery from a dead worker."))
    seed: int = Field(0, description="Seed for LoRA init and data order.")
    log_every: int = Field(5, ge=1, description="Print a progress line every N steps.")
    tracking_uri: str | None = Field(None, description=(
        "MLflow tracking URI; default a sqlite store in the stage's output folder. 'off' disables tracking."))

    @field_validator("tracking_uri", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_exists(cls, v: str) -> str:
        if v != "none":
            load_deepspeed_json(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> "TrainSection":
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("early_stopping_patience needs eval_every > 0 (or auto)")
        return self

    def checkpoint_steps(self) -> int:
        """Steps between periodic checkpoints (0: only at the end); auto: 10% of max_steps, at least
        AUTO_MIN_STEPS (checkpoint_minutes can make one come sooner)."""
        if self.checkpoint_every != "auto":
            return self.checkpoint_every
        return max(AUTO_MIN_STEPS, math.ceil(self.max_steps / 10))

    def eval_steps(self) -> int:
        """Steps between validations (0: only at the end); auto: the checkpoint cadence."""
        return self.checkpoint_steps() if self.eval_every == "auto" else self.eval_every


def deepspeed_path(name: str) -> Path:
    """A ZeRO config: a name from configs/deepspeed/ (zero2, zero3, ...) or a JSON file's path."""
    path = Path(name).expanduser()
    return DEEPSPEED_DIR / f"{name}.json" if not path.suffix else path


def load_deepspeed_json(name: str) -> dict[str, Any]:
    """The ZeRO config as a dict; ValueError naming what exists when the name or file is wrong."""
    path = deepspeed_path(name)
    if not path.is_file():
        names = sorted(f.stem for f in DEEPSPEED_DIR.glob("*.json"))
        raise ValueError(f"{name!r} is neither a config in configs/deepspeed/ ({', '.join(names)}, or 'none') nor "
                         f"a JSON file ({path} does not exist)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("zero_optimization"), dict):
        raise ValueError(f"{path}: a DeepSpeed config needs a zero_optimization section")
    return cfg


def check_combination(quant: QuantSection, train: TrainSection) -> None:
    """Refuse what does not work, before any worker starts."""
    if quant.load_in_4bit and "zero3" in train.deepspeed and quant.compute_dtype == "float32":
        raise ValueError(
            "train.deepspeed=zero3 with quant.load_in_4bit stores the packed 4-bit weights as tensors of "
            "quant.compute_dtype so ZeRO-3 can partition them; set quant.compute_dtype=bfloat16 (GPUs) or use "
            "zero2 (the 4-bit base is small enough to replicate)")
    if quant.load_in_4bit and train.optimizer != "adamw" and train.deepspeed != "none":
        raise ValueError("bitsandbytes 8-bit optimizers cannot be combined with DeepSpeed ZeRO; use optimizer=adamw")


def deepspeed_config(train: TrainSection, dtype: str) -> dict[str, Any] | None:
    """Load a ZeRO JSON and fill its "auto" fields from the run config."""
    if train.deepspeed == "none":
        return None
    cfg = load_deepspeed_json(train.deepspeed)
    fill = {"train_micro_batch_size_per_gpu": train.batch_size, "gradient_accumulation_steps": train.grad_accum,
            "gradient_clipping": train.max_grad_norm}
    for key, value in fill.items():
        if cfg.get(key) == "auto":
            cfg[key] = value
    cfg["train_batch_size"] = train.batch_size * train.grad_accum * train.num_workers
    for key, on in (("bf16", dtype == "bfloat16"), ("fp16", dtype == "float16")):
        if isinstance(cfg.get(key), dict) and cfg[key].get("enabled") == "auto":
            cfg[key]["enabled"] = on
    return cfg


def zero_dtype(ds_config: dict | None) -> str | None:
    """The 16-bit dtype DeepSpeed casts the module's floating parameters to (bf16 / fp16 enabled), else None."""
    for key, name in (("bf16", "bfloat16"), ("fp16", "float16")):
        if ds_config and isinstance(ds_config.get(key), dict) and ds_config[key].get("enabled") is True:
            return name
    return None


class ORPOOptions(Section):
    """ORPO (odds-ratio preference optimisation): SFT loss plus an odds-ratio term, no reference model."""

    lam: float = Field(0.1, gt=0, description=(
        "λ, the weight of the odds-ratio term (the paper's and TRL's default 0.1; TRL calls it ORPOConfig.beta)."))


class SimPOOptions(Section):
    """SimPO: length-normalised log-probs as the reward, a target margin γ, no reference model."""

    beta: float = Field(2.0, gt=0, description=(
        "β, the reward scale. 2.0: the SimPO authors' recommendation (TRL's CPOConfig default is 0.1)."))
    gamma_beta_ratio: float = Field(0.5, ge=0, description=(
        "γ/β: the target margin γ in units of β (the authors' 0.5, so γ = 1.0 at β 2.0; TRL's simpo_gamma is γ)."))


class KTOOptions(Section):
    """KTO: unpaired desirable / undesirable completions, against the frozen reference (dpo.beta is KTO's β)."""

    desirable_weight: float = Field(1.0, gt=0, description="w_D, the weight of a desirable row's loss.")
    undesirable_weight: float | Literal["auto"] = Field("auto", description=(
        "w_U, the weight of an undesirable row's loss. auto: chosen from the prepared training rows' counts so that "
        "w_D·n_D : w_U·n_U lies within 1:1 to 4:3 (the KTO paper's advice): 1 when it already does."))

    @field_validator("undesirable_weight")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v <= 0:
            raise ValueError("must be greater than 0 (or auto)")
        return v

    def weights(self, desirable: int, undesirable: int) -> tuple[float, float]:
        """(w_D, w_U) for these training-row counts."""
        if self.undesirable_weight != "auto":
            return self.desirable_weight, float(self.undesirable_weight)
        if not desirable or not undesirable:
            return self.desirable_weight, 1.0
        ratio = self.desirable_weight * desirable / undesirable  # weighted D : U with w_U = 1
        return self.desirable_weight, ratio / min(max(ratio, 1.0), 4 / 3)


ALIGN_METHODS = ("dpo", "orpo", "simpo", "kto")


class DPOSection(Section):
    """Preference optimisation (the align stage, named dpo): DPO (sigmoid / IPO / cDPO), ORPO, SimPO or KTO, on
    top of the SFT adapter (or a fresh adapter on the base: start=base)."""

    train_path: str | None = Field(None, description=(
        "Preference pairs: prompt + chosen + rejected (explicit prompt), chosen + rejected conversations (implicit "
        "prompt) or HH dialogue strings; for method=kto unpaired rows, prompt + completion + label (true: "
        "desirable), or pairs (each gives a desirable and an undesirable row). Any file type the data stage reads "
        "(JSONL, JSON, Parquet, CSV, compressed), a file, folder, glob, s3:// URI or "
        "hf://datasets/<owner>/<name>[:split]."))
    columns: dict[str, str] = Field(default_factory=dict, description=(
        "Roles -> the file's fields, as data.columns: e.g. {prompt: question, chosen: good, rejected: bad}, or "
        "{completion: answer, label: thumbs_up} for KTO."))
    method: Literal["dpo", "orpo", "simpo", "kto"] = Field("dpo", description=(
        "dpo (loss_type sigmoid / ipo, label_smoothing for cDPO), orpo and simpo (no reference model), kto "
        "(unpaired rows, reference model)."))
    start: Literal["sft", "base"] = Field("sft", description=(
        "The policy starts from this run's SFT adapter (sft), or from a fresh LoRA adapter (the lora section) on "
        "the base (base: no SFT stage; ORPO needs none). The reference of dpo / kto is the start model."))
    beta: float = Field(0.1, gt=0, description=(
        "Strength of the pull towards the reference (DPO β / IPO τ; KTO's β)."))
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="method=dpo: sigmoid DPO, or IPO.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description=(
        "cDPO: assumed share of flipped labels (method=dpo sigmoid, and simpo)."))
    orpo: ORPOOptions = Field(default_factory=ORPOOptions, description="method=orpo.")
    simpo: SimPOOptions = Field(default_factory=SimPOOptions, description="method=simpo.")
    kto: KTOOptions = Field(default_factory=KTOOptions, description="method=kto.")
    max_length: int = Field(512, ge=16, description="Longest prompt+answer in tokens; longer pairs are rejected.")
    max_pairs: int | None = Field(None, ge=1, description=(
        "Use only the first N rows curation kept (in file order); the rest are counted as max_pairs."))
    validation_fraction: float = Field(0.1, ge=0, lt=1, description=(
        "Held-out rows for eval: curation's seeded split, by prompt (every row of a prompt in one split)."))
    max_rejected_fraction: float = Field(0.2, ge=0, le=1, description=(
        "Stop when more than this share of the rows is broken or fails curation's quality filters (as "
        "data.max_rejected_fraction; duplicates do not count)."))
    reference_num_gpus: float | None = Field(None, ge=0, description=(
        "GPUs each reference-scoring actor holds; None: one when the cluster has GPUs, else none."))
    # DPO's own optimisation: unset, each takes train.<same name> (what a DPO run used before it had its own).
    max_steps: int | None = Field(None, ge=1, description="DPO optimizer steps; default train.max_steps.")
    lr: float | None = Field(None, gt=0, description=(
        "DPO peak learning rate; default train.lr. DPO usually wants a lower one than SFT (e.g. 5e-6 to 5e-5)."))
    warmup_steps: int | None = Field(None, ge=0, description="DPO linear warmup steps; default train.warmup_steps.")
    batch_size: int | None = Field(None, ge=1, description=(
        "Pairs per worker per micro-batch; default train.batch_size."))

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: dict[str, str]) -> dict[str, str]:
        check_columns(v)
        return v

    @model_validator(mode="after")
    def _method_options(self) -> "DPOSection":
        if self.method != "dpo" and self.loss_type != "sigmoid":
            raise ValueError(f"loss_type={self.loss_type} is a DPO variant; it does not apply to method="
                             f"{self.method}")
        if self.method in ("orpo", "kto") and self.label_smoothing:
            raise ValueError(f"label_smoothing applies to method=dpo and simpo, not {self.method}")
        return self

    @property
    def reference(self) -> bool:
        """Whether the method scores its rows under a frozen reference model (DPO, KTO)."""
        return self.method in ("dpo", "kto")

    def optimisation(self, train: TrainSection) -> TrainSection:
        """The loop settings DPO runs with: train's, with this section's own values where they are set."""
        own = {k: getattr(self, k) for k in ("max_steps", "lr", "warmup_steps", "batch_size")
               if getattr(self, k) is not None}
        return TrainSection.model_validate({**train.model_dump(), **own})


class TrainSetup(Section):
    """How a training stage (SFT, DPO, a sweep's trials) trains: the frozen base it starts from, the loop settings,
    and how this invocation runs them. The stage's data and output folders travel beside it as Locations."""

    model_dir: str = Field(description="Local Hugging Face folder of the base model (on the driver's machine).")
    model_name: str | None = Field(None, description=(
        "model.name: resolved again on a node that lacks model_dir (a hub id or built-in: each node gets its own "
        "copy); None: model_dir is the name."))
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Compute dtype (model.dtype).")
    quant: QuantSection = Field(default_factory=QuantSection)
    train: TrainSection = Field(default_factory=TrainSection, description="The train section.")
    base_cache: str | None = Field(None, description=(
        "Where each node keeps the 4-bit base it quantized once (QLoRA); None: the node's model cache."))
    resume: bool = Field(False, description=(
        "Continue the Ray Train run an interrupted attempt left under the stage's checkpoint storage from its last "
        "checkpoint, instead of starting afresh."))
    local: bool = Field(False, description="The loop in this process on one device, without Ray Train.")

    def job(self, storage: str, data: Location | None, **fields: Any) -> WorkerJob:
        """The WorkerJob of this setup over `data`, checkpointing into `storage` (fields: the stage's own, and
        `train` where the stage changes the loop settings)."""
        return WorkerJob(**{"model_dir": self.model_dir, "model_name": self.model_name, "dtype": self.dtype,
                            "quant": self.quant, "train": self.train, "base_cache": self.base_cache,
                            "storage": storage, "data": data, **fields})


class WorkerJob(Section):
    """What every Ray Train worker of a stage receives, validated once on the driver and passed as this object
    (`train_loop_config={"job": job}`): sections stay typed across the process boundary, never rebuilt from dicts."""

    state_key: SecretStr = Field(default_factory=lambda: SecretStr(machine_key()), description=(
        "The key checkpoints are sealed with (pipelines.train.state_seal), the driver's: a resume unpickles only "
        "what it sealed."))
    model_dir: str = Field(description="Local Hugging Face folder of the base model (on the driver's machine).")
    model_name: str | None = Field(None, description=(
        "model.name: resolved again on a node that lacks model_dir (a hub id or built-in: each node gets its own "
        "copy); see base_dir()."))
    dtype: Literal["float32", "bfloat16", "float16"] = Field(description="Compute dtype (model.dtype).")
    quant: QuantSection
    train: TrainSection = Field(description="The loop settings this stage runs with (DPO: dpo.optimisation(train)).")
    storage: str = Field(description="Ray Train storage folder (or object-store URI) of this stage's run.")
    data: Location | None = Field(None, description=(
        "The data stage's folder the workers read its splits from (from the store, when it has a URI: every node "
        "reads it there)."))
    base_cache: str | None = Field(None, description="Where each node keeps the 4-bit base it quantized once.")
    lora: LoraSection | None = Field(None, description="SFT: the adapter to attach to the frozen base.")
    dpo: DPOSection | None = Field(None, description="DPO: the preference loss settings.")
    kto_weights: tuple[float, float] | None = Field(None, description="KTO: (w_D, w_U) resolved from the counts.")
    sft: Location | None = Field(None, description=(
        "DPO: the SFT adapter the policy starts from (None: a fresh adapter on the base, dpo.start=base); with a "
        "URI, each worker copies it to its node (Location.on_node) instead of reading the driver's folder, which "
        "other nodes do not have."))

    def compute_dtype(self) -> str:
        """The dtype matmuls run in: the 4-bit base's compute dtype under QLoRA, else the model's."""
        return self.quant.compute_dtype if self.quant.load_in_4bit else self.dtype

    def on_node(self) -> WorkerJob:
        """This job as the node it runs on sees it: model_dir is this node's copy of the base (on_this_node)."""
        here = on_this_node(self.model_dir, self.model_name)
        return self if here == self.model_dir else self.model_copy(update={"model_dir": here})
