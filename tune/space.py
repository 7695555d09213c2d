"""The `tune:` config section and its mapping onto the `lora` / `train` sections. Pure: no Ray, no torch.

    tune:
      space:
        r: [4, 8, 16]                  # choice
        alpha: ratio                   # alpha = alpha_ratio × r (scale fixed), rslora, or fixed (= lora.alpha)
        lr: {low: 1.0e-4, high: 3.0e-3}   # log-uniform; a list is a choice (and what `grid` needs)
        target_modules: [attention, all-linear]
      searcher: optuna                 # random | grid | optuna (TPE, seeded)
      num_samples: 8
      asha: {grace_period: 4, reduction_factor: 3, max_t: 24}   # in optimizer steps

Published guidance this leans on: the learning rate is the axis that matters most, and it is roughly independent
of rank once alpha is tied to rank (alpha = ratio × r keeps the update scale fixed; rsLoRA scales by 1/sqrt(r)).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.schema import Section
from pipelines.train.config import LoraSection, TrainSection

PRESETS = ("attention", "all-linear")


class LogRange(Section):
    """A log-uniform range."""

    low: float = Field(gt=0, description="Smallest value.")
    high: float = Field(gt=0, description="Largest value.")

    @model_validator(mode="after")
    def _ordered(self) -> "LogRange":
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class SpaceSection(Section):
    """What a sweep varies. An axis left unset keeps the value of the run's own `lora` / `train` section."""

    r: list[int] | None = Field(None, description="LoRA ranks to choose from.")
    alpha: Literal["ratio", "rslora", "fixed"] = Field("ratio", description=(
        "How alpha follows the rank: ratio (alpha = alpha_ratio × r), rslora (lora.alpha with rank-stabilised "
        "scaling alpha / sqrt(r)), fixed (lora.alpha whatever the rank)."))
    alpha_ratio: float = Field(2.0, gt=0, description="alpha / r when alpha=ratio.")
    lr: LogRange | list[float] | None = Field(None, description=(
        "Learning rate: {low, high} for log-uniform, or a list of values to choose from."))
    target_modules: list[Literal["attention", "mlp", "all-linear"]] | None = Field(
        None, description="Module presets to choose from.")
    dropout: list[float] | None = Field(None, description="LoRA dropout values to choose from.")

    @field_validator("r", "target_modules", "dropout", "lr")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("an empty list: give at least one value, or leave the axis out")
        return v

    @field_validator("r")
    @classmethod
    def _ranks(cls, v):
        if v and any(not 1 <= r <= 256 for r in v):
            raise ValueError(f"ranks must lie in 1..256 (got {v})")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropouts(cls, v):
        if v and any(not 0 <= d < 1 for d in v):
            raise ValueError(f"dropout values must lie in [0, 1) (got {v})")
        return v

    @field_validator("lr")
    @classmethod
    def _lrs(cls, v):
        if isinstance(v, list) and any(x <= 0 for x in v):
            raise ValueError(f"learning rates must be > 0 (got {v})")
        return v

    def axes(self) -> dict[str, Any]:
        """The axes that are set: name → list of values, or a LogRange."""
        return {k: getattr(self, k) for k in ("r", "lr", "target_modules", "dropout") if getattr(self, k)}


class AshaSection(Section):
    """Asynchronous successive halving over optimizer steps."""

    grace_period: int = Field(4, ge=1, description="Steps every trial runs before it can be stopped.")
    reduction_factor: float = Field(3, gt=1, description="Keep the best 1/reduction_factor at each rung.")
    max_t: int = Field(24, ge=1, description="Steps of a trial that is never stopped (its train.max_steps).")


class TuneSection(Section):
    """A Ray Tune sweep over the SFT trainer, with ASHA early stopping on the validation loss."""

    space: SpaceSection = Field(default_factory=SpaceSection)
    searcher: Literal["random", "grid", "optuna"] = Field("random", description=(
        "random sampling, a full grid (every value list; num_samples repeats it), or Optuna TPE (seeded)."))
    num_samples: int = Field(8, ge=1, description="Trials (grid: repetitions of the whole grid).")
    grid_order: Literal["shuffled", "as_written"] = Field("shuffled", description=(
        "searcher=grid: the order trials start in. 'shuffled' (seeded): ASHA is asynchronous, so the first trials "
        "to reach a rung meet little competition there and run on; a grid written from the weakest value up "
        "(lowest lr first) would let most trials through. 'as_written': the value lists' order."))
    seed: int = Field(0, description="Seed of the searcher's sampling.")
    asha: AshaSection | None = Field(default_factory=AshaSection, description=(
        "Early stopping; null runs every trial to max_t (a plain search)."))
    max_t: int | None = Field(None, ge=1, description="Steps per trial when asha is null; default train.max_steps.")
    metric: Literal["eval_loss"] = Field("eval_loss", description="What the sweep minimises (validation loss).")
    eval_every: int | None = Field(None, ge=1, description=(
        "Steps between validation reports; default train.eval_every (when a number), else asha.grace_period. Each "
        "report waits for Tune to take it, so reporting every step slows the trial."))
    max_concurrent_trials: int | None = Field(None, ge=1, description=(
        "Trials at once; default what the cluster's CPUs (or GPUs) fit, by one trial's ScalingConfig."))
    max_failures: int = Field(1, ge=0, description="Times Tune restarts a trial whose trainer failed for good.")

    @model_validator(mode="after")
    def _check(self) -> "TuneSection":
        if not self.space.axes():
            raise ValueError("space: nothing to search: set at least one of r, lr, target_modules, dropout")
        if self.asha and self.asha.grace_period > self.asha.max_t:
            raise ValueError(f"asha.grace_period={self.asha.grace_period} > asha.max_t={self.asha.max_t}: no trial "
                             "could be stopped; lower grace_period or raise max_t")
        if self.searcher == "grid" and isinstance(self.space.lr, LogRange):
            raise ValueError("searcher=grid needs space.lr as a list of values, not a {low, high} range")
        return self

    def steps(self, train: TrainSection) -> int:
        return self.asha.max_t if self.asha else (self.max_t or train.max_steps)

    def cadence(self, train: TrainSection) -> int:
        explicit = 0 if train.eval_every == "auto" else train.eval_every  # auto is the stage's cadence, not ASHA's
        return self.eval_every or explicit or (self.asha.grace_period if self.asha else self.steps(train))


def grid_size(space: SpaceSection) -> int | None:
    """Points of the full grid, or None when an axis is a range (no grid)."""
    axes = space.axes().values()
    return None if any(isinstance(v, LogRange) for v in axes) else math.prod(len(v) for v in axes)


def grid_points(space: SpaceSection) -> list[dict[str, Any]]:
    """Every combination of the value lists (a LogRange has no grid)."""
    axes = space.axes()
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def apply_trial(point: dict[str, Any], tune: TuneSection, lora: LoraSection,
                train: TrainSection) -> tuple[LoraSection, TrainSection]:
    """The lora and train sections one trial runs with: the run's own, with the point's values, alpha tied to
    the rank as the space says, max_steps = the sweep's max_t, validation at the sweep's cadence, checkpoints
    only at validations (each one is a report to Tune), and no patience-based stop (ASHA decides)."""
    space = tune.space
    r = int(point.get("r", lora.r))
    new_lora = {**lora.model_dump(), "r": r}
    if "target_modules" in point:
        new_lora["target_modules"] = point["target_modules"]
    if "dropout" in point:
        new_lora["dropout"] = float(point["dropout"])
    if space.alpha == "ratio":
        new_lora["alpha"] = max(1, round(space.alpha_ratio * r))
    new_lora["rslora"] = space.alpha == "rslora" or (lora.rslora and space.alpha == "fixed")
    steps = tune.steps(train)
    new_train = {**train.model_dump(), "max_steps": steps, "eval_every": min(tune.cadence(train), steps),
                 "checkpoint_every": 0, "early_stopping_patience": 0,
                 "warmup_steps": min(train.warmup_steps, max(0, steps - 1))}
    if "lr" in point:
        new_train["lr"] = float(point["lr"])
    return LoraSection.model_validate(new_lora), TrainSection.model_validate(new_train)


def trial_label(point: dict[str, Any]) -> str:
    """A short human name for a point: r=8 lr=3.2e-04 tm=attention."""
    short = {"r": "r", "lr": "lr", "target_modules": "tm", "dropout": "do"}
    parts = []
    for k in ("r", "lr", "target_modules", "dropout"):
        if k in point:
            v = point[k]
            parts.append(f"{short[k]}={v:.1e}" if k == "lr" else f"{short[k]}={v}")
    return " ".join(parts)
