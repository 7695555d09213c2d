"""The `rl:` config section (online RL, GRPO family): prompts, rewards, sampling, the loss, the optimisation, the
weight-sync staleness bound and the parity gate. Pure pydantic (reward import paths are resolved when the
config is read, so a wrong one is a config error naming it).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.artifacts.manifest import hash_path
from pipelines.data.readers import expand_paths
from pipelines.schema import Section
from pipelines.train.config import TrainSection
from pipelines.train.grpo import AGGREGATIONS
from pipelines.train.rewards import RewardSpec

_PATH = re.compile(r"[A-Za-z_][\w-]*(?:\[\d+\])*(?:\.[A-Za-z_][\w-]*(?:\[\d+\])*)*")  # as data.columns
_NAME = re.compile(r"[A-Za-z_]\w*")


class SamplingSection(Section):
    """How the rollout engine samples each prompt's G completions."""

    temperature: float = Field(1.0, gt=0, le=4, description="Sampling temperature (the loss uses the same).")
    top_p: float = Field(1.0, gt=0, le=1, description=(
        "Nucleus sampling. Below 1 the rollout's log-probs are renormalised over the nucleus (vLLM's processed "
        "log-probs) and the trainer's are not: the parity figures then include that difference."))
    max_new_tokens: int = Field(64, ge=1, description="Longest completion in tokens (L_max of dr_grpo).")


class ParitySection(Section):
    """The gate between trainer and rollouts: mean |log π_trainer − log π_rollout| over the sampled tokens of
    a step, the trainer scoring them with the weights of the version that sampled them."""

    warn: float = Field(0.02, gt=0, description="Above this mean the step logs a warning.")
    stop: float = Field(0.2, gt=0, description=(
        "Above this mean the stage stops with an error: a wrong adapter version, or rollouts from the base model."))

    @model_validator(mode="after")
    def _order(self) -> "ParitySection":
        if self.stop < self.warn:
            raise ValueError(f"parity.stop ({self.stop}) is below parity.warn ({self.warn})")
        return self


class RLSection(Section):
    """Online RL with verifiable rewards (GRPO, DAPO, Dr. GRPO) on a LoRA adapter, with rollouts on a vLLM
    engine that loads each optimizer step's adapter as an immutable version `policy@N`."""

    prompts_path: str | None = Field(None, description=(
        "The prompts: any file type the data stage reads (JSONL, JSON, Parquet, CSV, compressed), a file, folder "
        "or glob."))
    columns: dict[str, str] = Field(default_factory=lambda: {"prompt": "prompt"}, description=(
        "Names -> the file's fields (a.b and [i] paths, as data.columns): `prompt` (a string, or a list of chat "
        "messages; required without prompt_template) and any reference fields, passed to the reward functions "
        "under these names (e.g. {prompt: question, answer: answer})."))
    prompt_template: str | None = Field(None, description=(
        "The user message built from the mapped columns (Python format fields), e.g. '{instruction}\\n\\n{input}'"
        " with columns {instruction: instruction, input: input}; unset: the `prompt` column as it is."))
    system_prompt: str | None = Field(None, description="A system message put before each prompt.")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    max_prompt_tokens: int = Field(512, ge=1, description="Prompts longer than this (in tokens) are left out.")
    rewards: list[RewardSpec] = Field(default_factory=list, description="Reward functions; their weighted sum.")
    num_generations: int = Field(8, ge=2, description="G: completions sampled per prompt (one group).")
    prompts_per_step: int = Field(4, ge=1, description="Prompts per optimizer step (a step trains on their G each).")
    micro_batch_size: int = Field(8, ge=1, description="Completions per forward/backward (gradient accumulation).")
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    start: Literal["base", "sft", "dpo"] = Field("base", description=(
        "The policy's first version: a fresh adapter on the base (lora: section), this run's SFT adapter, or its "
        "preference-tuned adapter (dpo: SFT → preference tuning → RL; needs dpo.train_path)."))
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clip range: the ratio is clipped to [1 - eps, 1 + eps_high].")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip (clip-higher, DAPO); default epsilon.")
    kl_beta: float = Field(0.0, ge=0, description=(
        "KL penalty towards the reference (the starting adapter, or the base with the adapter disabled: no second "
        "model in memory); k3 estimator as TRL. 0: off."))
    aggregation: Literal["grpo", "dapo", "dr_grpo"] = Field("grpo", description=(
        "grpo: mean of per-sequence token means; dapo: token mean over the batch; dr_grpo: token sum / (B · "
        "max_new_tokens), advantages not divided by the group's std."))
    tis_cap: float | None = Field(None, gt=0, description=(
        "Truncated importance sampling: weight each token by min(π_trainer / π_rollout, cap) (off when None)."))
    steps: int = Field(20, ge=1, description="Optimizer steps (each publishes one adapter version).")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (cosine decay after).")
    staleness: Literal[0, 1] = Field(0, description=(
        "0: on-policy (step k trains on rollouts of policy@k-1); 1: the rollouts of step k+1 are sampled while "
        "step k trains (policy@k-2 allowed). Older rollouts are refused."))
    parity: ParitySection = Field(default_factory=ParitySection)
    seed: int = Field(0, description="Seed of the prompt order, the adapter's init and the sampling.")
    rollout_cpus: float = Field(1.0, ge=0, description="CPUs the rollout engine actor reserves.")
    rollout_gpus: float = Field(0.0, ge=0, description="GPUs the rollout engine actor reserves.")
    drill_base_rollout_at_step: int | None = Field(None, ge=1, description=(
        "Fault drill: the rollout engine samples this step from the base model while recording the policy "
        "version, as a silently broken sync would; the parity gate must stop the stage."))

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            if not _NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a name a reward function can take (letters, digits, _)")
            if name == "completion_ids":
                raise ValueError("'completion_ids' is passed to the reward functions by the stage: choose another "
                                 "name")
            if not isinstance(path, str) or not _PATH.fullmatch(path):
                raise ValueError(f"{name}: {path!r} is not a field path (write e.g. question, a.b or "
                                 "instances[0].input)")
        return v

    @model_validator(mode="after")
    def _check(self) -> "RLSection":
        if self.prompt_template is None and "prompt" not in self.columns:
            raise ValueError("columns needs a 'prompt' entry (the field holding each prompt), or set prompt_template")
        if self.prompt_template is not None:
            import string

            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f is not None}
            except ValueError as e:
                raise ValueError(f"prompt_template: {e}") from None
            missing = sorted(f for f in fields if f not in self.columns)
            if missing or not fields:
                raise ValueError(f"prompt_template names {missing or 'no column'}: each {{field}} must be a name "
                                 f"in columns ({sorted(self.columns)})")
        if self.aggregation not in AGGREGATIONS:  # the Literal and the loss list are the same names
            raise ValueError(f"aggregation {self.aggregation!r} unknown")
        if self.drill_base_rollout_at_step and self.drill_base_rollout_at_step > self.steps:
            raise ValueError(f"drill_base_rollout_at_step={self.drill_base_rollout_at_step} > steps={self.steps}")
        return self

    def prompts_hash(self) -> str | None:
        """The prompts' hash (sha256 over each file's name and bytes, in order), the dataset hash of the rl adapter's
        lineage (the registry requires one); None when prompts_path is unset or a URI."""
        if not self.prompts_path or "://" in self.prompts_path:
            return None
        files = expand_paths(self.prompts_path)
        h = hashlib.sha256()
        for f in files:
            h.update(f"{Path(f).name}\0{hash_path(f)}\0".encode())
        return f"sha256:{h.hexdigest()}"

    def optimisation(self, train: TrainSection) -> TrainSection:
        """The loop settings the rl stage trains with: train's, with this section's steps, lr and warmup, and no
        restart on failure (the stage is started again, not resumed). Workers: train.num_workers under DDP
        (pipelines.train.rl sets them; rank 0 asks the engine and shares each step's groups out)."""
        return TrainSection.model_validate({**train.model_dump(), "max_steps": self.steps, "lr": self.lr,
                                            "warmup_steps": self.warmup_steps, "num_workers": 1,
                                            "max_failures": 0, "fail_once_at_step": None})
