"""A decoder model's shape for the planner (cluster.plan), where it comes from, and what one layer saves for
backward. Reads config.json as JSON; the module listing (`ModelShape.listing`: every linear layer with its shape,
what LoRA targets resolve against) builds the model from that config on the meta device through
pipelines.train.targets, importing torch and transformers only when asked, and falls back to Llama's seven
matrices (`matrices`) where it cannot (no transformers, or a known shape without a model_type).

    python -c "from cluster.plan_shape import shape_of; print(shape_of('Qwen/Qwen2.5-7B-Instruct'))"

Saved activations of one Llama/Qwen2 decoder layer per token, counted tensor by tensor on the real autograd
graph (torch.autograd.graph.saved_tensors_hooks, tests/integration/test_plan_measured.py), with a = the
residual stream's bytes per value, l = the adapters' (LoRA) bytes, h/i hidden/intermediate, q/kv the query and
key-value widths:
    2·(4h + 4)            two RMSNorms: their fp32 input and 1/rms (they upcast in every dtype)
    a·(2q + 2kv) + 4·heads SDPA: q and k after RoPE, v, its output (which o_proj reads), the fp32 logsumexp
    3·a·i                 MLP: gate, up, silu(gate)
    LoRA inputs           per target, when PEFT copies x (dropout > 0: x_dropped·l + a bool mask; a != l: the
                          cast copy x·l); else only the shared inputs: norm outputs (h·a), down's input (i·a)
    r·l per target        each lora_B's input A·x
A frozen base linear saves no input (its weight needs no gradient), which is why LoRA's activations are what
they are; full fine-tuning saves the shared inputs of all seven linears instead. Korthikanti et al.'s
s·b·h·(34 + 5·a·s/h) assumes eager attention (the s² score matrix) and dropout everywhere; SDPA keeps only
the logsumexp (flash-attention 2 the same). Under autocast (16-bit compute on GPUs under DDP) the kernel's q, k,
v and output and each adapter's input and A·x are autocast's fresh 16-bit copies (m in layer_bytes), while the
residual stream, the norms and a 4-bit base's MLP outputs keep their dtype. Under gradient checkpointing only
each layer's input (h·a) is saved, and one layer is recomputed at a time in backward. Outside the layers: the
final norm (4h + 4) and RoPE's cos/sin; the loss (`loss_bytes`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.artifacts.models import BUILTIN, cache_root, local_folder
from pipelines.schema import UserError
from pipelines.train import targets as lora_targets

TABLE = Path(__file__).with_name("gpus.json")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ATTN_IN, MLP_IN = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def table() -> dict[str, Any]:
    """cluster/gpus.json: the GPU table (memory, bf16 TFLOPS, $/hour), the CPU row and known model shapes."""
    return json.loads(TABLE.read_text())


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    name: str = ""
    config: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # config.json, for `listing`

    @classmethod
    def from_config(cls, d: dict[str, Any], name: str = "") -> "ModelShape":
        """From a Hugging Face config.json (a multimodal one's text_config)."""
        full = d
        d = d.get("text_config", d) if "hidden_size" not in d else d
        try:
            heads = int(d["num_attention_heads"])
            return cls(hidden=int(d["hidden_size"]), intermediate=int(d["intermediate_size"]),
                       layers=int(d["num_hidden_layers"]), heads=heads,
                       kv_heads=int(d.get("num_key_value_heads") or heads),
                       head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
                       vocab=int(d["vocab_size"]), tied=bool(d.get("tie_word_embeddings", False)),
                       qkv_bias=bool(d.get("attention_bias", d.get("model_type") == "qwen2")), name=name,
                       config=full)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{name or 'model'}: config.json lacks a decoder shape ({type(e).__name__}: {e}); the "
                            "planner needs hidden_size, intermediate_size, num_hidden_layers, num_attention_heads "
                            "and vocab_size") from None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def matrices(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def listing(self) -> lora_targets.Listing | None:
        """The model's linear layers from its config on the meta device (pipelines.train.targets.describe, cached
        by config), or None where that cannot be built here (no config / model_type, no transformers, or a
        model type this transformers does not know)."""
        if not self.config or "model_type" not in self.config:
            return None
        try:
            return lora_targets.describe(self.config)
        except Exception:  # ImportError, an unknown model_type, a config transformers refuses: the fallback
            return None

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.matrices().values())

    def float_params(self) -> int:
        """Embeddings, lm_head (unless tied), norms and biases: what NF4 leaves in floating point."""
        bias = self.layers * (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden + bias

    def total_params(self) -> int:
        return self.linear_params() + self.float_params()


def layer_bytes(shape: ModelShape, tokens: int, a: int, lb: int, r: int, targets, dropout: float,
                full: bool = False, mask_bytes: int = 1, *, m: int | None = None, copies: bool | None = None,
                attn: str = "sdpa", seq: int = 0) -> float:
    """Bytes one decoder layer saves for backward over `tokens` tokens (the module docstring's formula).
    mask_bytes: a dropout mask's bytes per value (bool on CUDA; CPU's dropout saves a float noise tensor).
    m: bytes of what the attention kernel and the adapters' matmuls save (default a; under autocast the 16-bit
    copies autocast casts their inputs to, while the residual stream, the norms and a 4-bit base's MLP outputs
    stay in a: bitsandbytes casts its output back to its input's dtype). copies: whether each LoRA target saves
    its own copy of its input (default: dropout, or an input cast to the adapters' dtype). attn: eager attention
    also saves its fp32 probabilities and their m cast over `seq` keys per head (SDPA and flash-attention 2 only
    the fp32 logsumexp)."""
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    m = a if m is None else m
    copies = (dropout > 0 or a != lb) if copies is None else copies
    per = 2 * (4 * h + 4) + m * (2 * q + 2 * kv) + 4 * shape.heads + 3 * a * i
    if attn == "eager":
        per += shape.heads * seq * (4 + (m if m != 4 else 0)) - 4 * shape.heads
    ins = target_inputs(shape, targets)
    if full:
        per += 2 * a * h + a * i
    elif copies:
        per += sum(ins) * (lb + (mask_bytes if dropout > 0 else 0))
    elif all(t in shape.matrices() for t in targets):
        per += a * h * (any(t in ATTN_IN for t in targets) + any(t in MLP_IN for t in targets))
        per += a * i * ("down_proj" in targets)
    else:  # another family's names: one saved input per distinct input width (an estimate, not measured)
        per += a * sum(set(ins))
    if not full:
        per += r * lb * len(ins)
    return float(tokens * per)


def target_inputs(shape: ModelShape, targets) -> list[float]:
    """The input width of each LoRA target matrix in one decoder layer: Llama's seven by name, else from the
    model's listing (the matched layers over all decoder layers, spread evenly)."""
    mats = shape.matrices()
    if all(t in mats for t in targets):
        return [float(mats[t][0]) for t in targets]
    listing = shape.listing()
    if listing is None:
        raise UserError(f"lora.target_modules: {[t for t in targets if t not in mats]} are not linear layers of a "
                        f"{shape.name or 'decoder'} layer ({', '.join(mats)})")
    chosen = lora_targets.selected(list(targets), listing.linears)
    per = max(1, shape.layers)
    return [x.d_in / per for x in chosen]


def activation_bytes(shape: ModelShape, batch: int, seq: int, a: int, lb: int, r: int, targets, dropout: float,
                     checkpointing: bool, full: bool = False, mask_bytes: int = 1, **kw) -> float:
    """Bytes the decoder saves for backward (the loss's own are `loss_bytes`): every layer's, or with
    checkpointing each layer's input and the final norm's. Without checkpointing the final norm's count as
    the first layer's input norm's: the frozen embedding's output needs no gradient, so that norm saves nothing
    (checkpointing makes it require one: peft's enable_input_require_grads; full fine-tuning too).
    kw: layer_bytes' m, copies and attn (seq is this one's)."""
    tokens = batch * seq
    norm = tokens * (4 * shape.hidden + 4)
    if checkpointing:
        return float(shape.layers * tokens * shape.hidden * a + norm)
    rope = 2 * seq * shape.head_dim * a
    return (shape.layers * layer_bytes(shape, tokens, a, lb, r, targets, dropout, full, mask_bytes, seq=seq, **kw)
            + rope + (norm if full else 0))


def loss_bytes(shape: ModelShape, batch: int, seq: int, a: int, chunk_tokens: int | None) -> tuple[float, float]:
    """(saved through the forward, in flight at the peak) of causal_lm_loss, every position a label (the worst
    case). Plain: the fp32 log-softmax over [tokens, vocab] and the targets; in flight one more fp32 copy and its
    gradient. Chunked (losses.label_logps): the label positions' hidden states and their indices; one chunk's
    logits (a), fp32 copy, log-softmax and gradient, recomputed in backward."""
    n = batch * (seq - 1)
    if chunk_tokens:
        return float(n * (shape.hidden * a + 24)), float(min(chunk_tokens, n) * shape.vocab * (a + 12))
    return float(n * (shape.vocab * 4 + 8)), float(2 * batch * seq * shape.vocab * 4)


def shape_of(name: str, cache_dir: str | None = None) -> ModelShape:
    """The shape of model.name: its folder's config.json (a local folder, a built-in model already built, the
    Hugging Face cache of a hub id), else cluster/gpus.json's known models; UserError naming what to do."""
    return ModelShape.from_config(config_of(name, cache_dir), name)


def config_of(name: str, cache_dir: str | None = None) -> dict[str, Any]:
    """model.name's config.json as a dict (shape_of's sources, in its order); UserError naming what to do."""
    path = None
    if name in BUILTIN:
        path = cache_root(cache_dir) / "models" / name / "config.json"
    else:
        folder = local_folder(name)
        if folder is not None:
            path = folder / "config.json"
        else:
            try:
                from huggingface_hub import try_to_load_from_cache

                found = try_to_load_from_cache(name, "config.json")
                path = Path(found) if isinstance(found, str) else None
            except Exception:  # not a valid repo id, or no hub library: the table below decides
                path = None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    known = table()["models"]
    if name in known:
        return dict(known[name])
    raise UserError(f"model.name={name!r}: no config.json on this machine and not among the known shapes in "
                    f"{TABLE}; download it (huggingface-cli download {name} config.json) or add its shape there")
