"""One YAML file describes a whole run. Each package owns its section; this module composes them.

Errors name the file, the key's dotted path and the reason, and happen before any Ray work starts:

    $ loraforge run configs/quickstart-cpu.yaml train.max_stepz=3
    configs/quickstart-cpu.yaml: train.max_stepz: Extra inputs are not permitted
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from pipelines.data import DataConfig
from pipelines.dpo import DPOSection
from pipelines.evaluate import EvalSection
from pipelines.gate import GateSection
from pipelines.merge import MergeSection
from pipelines.models import ModelConfig
from pipelines.quantize import QuantizeSection
from pipelines.registry import RegistrySection
from pipelines.schema import Section
from pipelines.training import LoraSection, QuantSection, TrainSection
from serve.config import ServeConfig


class RaySection(Section):
    """Which Ray cluster runs the job."""

    address: str | None = Field(None, description=(
        "Ray address; None starts a local instance (or joins the one `ray job submit` runs under)."))
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started instance; default all.")
    include_dashboard: bool = Field(False, description="Start the dashboard with a local instance.")


class DemoSection(Section):
    """What `loraforge run` asks the served base model and adapter at the end."""

    prompts: list[str] = Field(default_factory=list, description="User messages sent to base and adapter.")
    max_tokens: int = Field(48, ge=1, description="Tokens generated per answer (greedy).")


class RunConfig(Section):
    """A whole run: data → sft (→ dpo when dpo.train_path is set) → serve."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Run name (folder name).")
    output_dir: str = Field("runs", description="Parent folder of run folders: <output_dir>/<name>/<stage>/.")
    ray: RaySection = Field(default_factory=RaySection)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraSection = Field(default_factory=LoraSection)
    quant: QuantSection = Field(default_factory=QuantSection)
    train: TrainSection = Field(default_factory=TrainSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    gate: GateSection = Field(default_factory=GateSection)
    merge: MergeSection = Field(default_factory=MergeSection)
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    demo: DemoSection = Field(default_factory=DemoSection)

    def stage_dir(self, stage: str) -> Path:
        return Path(self.output_dir) / self.name / stage


class ConfigError(ValueError):
    """A config that does not validate; the message names the file, the key path and the reason."""


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML: numbers, booleans, lists) to a config dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        node = doc
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return doc


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config. Raises ConfigError naming the file and every bad key."""
    source = str(path) if path else "<defaults>"
    doc: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: no such config file")
        try:
            doc = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from e
        if not isinstance(doc, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
    doc = apply_overrides(doc, overrides or [])
    try:
        return RunConfig.model_validate(doc)
    except ValidationError as e:
        lines = [f"{source}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                 + (f" (got {err['input']!r})" if err["type"] != "extra_forbidden" and "input" in err
                    and not isinstance(err["input"], dict) else "")
                 for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None


def json_schema() -> str:
    return json.dumps(RunConfig.model_json_schema(), indent=2)
