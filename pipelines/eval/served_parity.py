"""The parity check between a trained adapter and the serving engine, once, before the gate publishes it (issue 39
item 4): a few prompts get a short sampled completion from a vLLM engine configured as serving configures its
replicas (pipelines.train.rollout.engine_kwargs over the serve: section), with the adapter loaded from its saved
files; transformers + PEFT score the same tokens with the same saved adapter (the trainer's forward, rl's own
padding and log-prob code). The figures are mean and max |log π_trainer − log π_engine| over the sampled tokens.

Prompt log-probs crash the CPU engine with LoRA on (STACK_NOTES, "prompt-logprobs engine crash"), so the check
compares the sampled tokens' log-probs of a generation, as the rl stage's own per-step gate does.

    figures = measure(engine, model_dir, adapter_dir, prompt_ids, temperature=1.0, max_tokens=16)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from pipelines.artifacts.location import Location
from pipelines.train import rl
from pipelines.train.config import LoraSection, TrainSetup
from pipelines.train.grpo import parity
from pipelines.train.rl import _logps, _pad_batch
from pipelines.train.rl_config import RLSection
from pipelines.train.rollout import engine_env, engine_kwargs, start_engine

RECORD = "served_parity.json"  # in the adapter's folder: what the gate reads
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def engine_logprobs(engine, adapter_dir: str | Path, prompt_ids: list[list[int]], *, temperature: float,
                    max_tokens: int, seed: int) -> list[dict[str, Any]]:
    """One sampled completion per prompt from the engine actor with the adapter's saved files loaded under a new
    LoRA id (the engine is reset first: any earlier run's versions are dropped): [{ids, logprobs}]."""
    import ray

    files = {name: (Path(adapter_dir) / name).read_bytes() for name in ADAPTER_FILES}
    run = f"served-parity-{int(time.time() * 1000)}"
    ray.get(engine.reset.remote(run, 0))
    ray.get(engine.sync.remote(run, 0, files, time.time()))
    out = ray.get(engine.rollout.remote(run, prompt_ids, 1, temperature=temperature, top_p=1.0,
                                        max_tokens=max_tokens, seed=seed))
    return [group[0] for group in out["groups"]]


def trainer_logprobs(model_dir: str, adapter_dir: str | Path, prompt_ids: list[list[int]],
                     completion_ids: list[list[int]], *, temperature: float, dtype: str = "float32"):
    """The saved adapter's log-probs of the completions under transformers + PEFT ([B, T] tensor, and its mask)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    b = _pad_batch(prompt_ids, completion_ids, pad, "cpu")
    with torch.no_grad():
        return _logps(model, b, temperature), b["mask"]


def measure(engine, model_dir: str, adapter_dir: str | Path, prompt_ids: list[list[int]], *, temperature: float = 1.0,
            max_tokens: int = 16, seed: int = 0, dtype: str = "float32") -> dict[str, Any]:
    """{mean, max, tokens, prompts, temperature, max_tokens} of |log π_trainer − log π_engine| on the sampled
    tokens of one completion per prompt."""
    import torch

    sampled = engine_logprobs(engine, adapter_dir, prompt_ids, temperature=temperature, max_tokens=max_tokens,
                              seed=seed)
    keep = [i for i, c in enumerate(sampled) if c["ids"]]
    if not keep:
        return {"mean": 0.0, "max": 0.0, "tokens": 0, "prompts": len(prompt_ids), "temperature": temperature,
                "max_tokens": max_tokens}
    prompts = [prompt_ids[i] for i in keep]
    completions = [sampled[i]["ids"] for i in keep]
    trainer, mask = trainer_logprobs(model_dir, adapter_dir, prompts, completions, temperature=temperature,
                                     dtype=dtype)
    served = torch.full_like(trainer, math.nan)
    for j, i in enumerate(keep):
        lps = sampled[i]["logprobs"]
        served[j, :len(lps)] = torch.tensor(lps, dtype=served.dtype)
    mask = mask.bool() & ~served.isnan()
    figures = parity(trainer, served.nan_to_num(0.0), mask)
    return {**figures, "prompts": len(prompt_ids), "temperature": temperature, "max_tokens": max_tokens}


def refusal(figures: dict[str, Any] | None, stop: float) -> str | None:
    """The gate's reason to refuse on these figures (mean above `stop`), else None."""
    if figures is None or figures["mean"] <= stop:
        return None
    return (f"served-engine parity: mean |log π_trainer − log π_engine| = {figures['mean']:.4g} (max "
            f"{figures['max']:.4g} over {figures['tokens']} sampled tokens) > rl.parity.stop={stop}: the served "
            "adapter does not compute what was trained")


def train_and_check(cfg: RLSection, setup: TrainSetup, lora: LoraSection, serve_cfg, out: Location, *,
                    sft: Location | None = None, prompts: int = 4) -> Path:
    """The rl stage with the check: its rollout engine started here (as rl.run starts its own), rl.run on it, then
    the check on the saved adapter with the same engine (its first `prompts` prompts, one completion each, at
    most 16 new tokens); the figures in <out>/served_parity.json, which the gate reads."""
    import ray
    from transformers import AutoTokenizer

    rl.check(cfg, setup, lora, serve_cfg)  # refused before an engine starts
    t0 = time.time()
    engine = start_engine(engine_kwargs(serve_cfg, setup.model_dir, max_loras=cfg.staleness + 2,
                                        gpu=cfg.rollout_gpus > 0, seed=cfg.seed),
                          cfg.staleness, num_cpus=cfg.rollout_cpus, num_gpus=cfg.rollout_gpus,
                          env=engine_env(serve_cfg))
    print(f"[rl] rollout engine up in {time.time() - t0:.0f} s", flush=True)
    try:
        folder = rl.run(cfg, setup, lora, serve_cfg, out, sft=sft, engine=engine)
        rows, _ = rl.read_prompts(cfg, AutoTokenizer.from_pretrained(setup.model_dir))
        figures = measure(engine, setup.model_dir, folder, [r["prompt_ids"] for r in rows[:prompts]],
                          temperature=cfg.sampling.temperature, max_tokens=min(16, cfg.sampling.max_new_tokens),
                          seed=cfg.seed, dtype=setup.dtype)
    finally:
        ray.kill(engine)
    (folder / RECORD).write_text(json.dumps(figures, indent=1))
    print(f"[rl] served-engine parity: mean |Δ log p| {figures['mean']:.3g}, max {figures['max']:.3g} over "
          f"{figures['tokens']} tokens", flush=True)
    return folder


def read(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The figures measured for this adapter folder, or None (not an rl adapter, or measured before this check)."""
    path = Path(adapter_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None
