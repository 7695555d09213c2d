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
from pydantic import Field, ValidationError, model_validator

from cluster.plan_shape import config_of
from pipelines.artifacts import storage
from pipelines.artifacts.models import ModelConfig, local_folder
from pipelines.artifacts.registry import RegistrySection
from pipelines.data.config import DataConfig
from pipelines.data.readers import expand_paths
from pipelines.eval.evaluate import EvalSection
from pipelines.eval.gate import GateSection
from pipelines.export.merge import MergeSection
from pipelines.export.quantize import QuantizeSection
from pipelines.schema import ConfigError, DataError, MissingInput, Section, redact
from pipelines.train import targets as lora_targets
from pipelines.train.config import DPOSection, LoraSection, QuantSection, TrainSection, TrainSetup, check_combination
from pipelines.train.rl import check as rl_check
from pipelines.train.rl_config import RLSection
from serve.config import ServeConfig, lora_ranks
from serve.lora_support import support_for_config
from tune.space import TuneSection

CURATED_TEST = "curated"  # eval.test_path: this run's curated test split (the data stage's curated/test folder)


class RaySection(Section):
    """Which Ray cluster runs the job."""

    address: str | None = Field(None, description=(
        "Ray address; None starts a local instance (or joins the one `ray job submit` runs under)."))
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started instance; default all.")
    include_dashboard: bool = Field(True, description=(
        "Start the dashboard with a local instance: it serves Ray's State API, which Ray Train's placement-group "
        "cleaner and Tune's stopped trials need (without it they warn every second and leave resources held). "
        "Always on when the config has a tune: section."))


class DemoSection(Section):
    """What `loraforge run` asks the served base model and adapter at the end."""

    prompts: list[str] = Field(default_factory=list, description="User messages sent to base and adapter.")
    max_tokens: int = Field(48, ge=1, description="Tokens generated per answer (greedy).")


class RunConfig(Section):
    """A whole run: data → sft (→ dpo when dpo.train_path is set) → serve."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Run name (folder name).")
    output_dir: str = Field("runs", description=(
        "Parent folder of run folders: <output_dir>/<name>/<stage>/. A local path, or an object-store URI "
        "(s3://bucket/prefix; S3-compatible stores through AWS_ENDPOINT_URL) that every node and the next driver "
        "reach: stages work in a local mirror and push each finished stage there; Ray Train checkpoints go there "
        "directly."))
    ray: RaySection = Field(default_factory=RaySection)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraSection = Field(default_factory=LoraSection)
    quant: QuantSection = Field(default_factory=QuantSection)
    train: TrainSection = Field(default_factory=TrainSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    rl: RLSection | None = Field(None, description=(
        "Online RL (GRPO family) on the adapter with vLLM rollouts (pipelines.train.rl); reward import paths are "
        "checked when the config is read."))
    tune: TuneSection | None = Field(None, description="A Ray Tune sweep over the SFT trainer (`loraforge tune`).")
    eval: EvalSection = Field(default_factory=EvalSection)
    gate: GateSection = Field(default_factory=GateSection)
    merge: MergeSection = Field(default_factory=MergeSection)
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    demo: DemoSection = Field(default_factory=DemoSection)

    @model_validator(mode="after")
    def _combinations(self) -> "RunConfig":
        """What no single section can see: refused here, before any Ray work, not after workers started."""
        check_combination(self.quant, self.train)
        if self.tune and self.tune.space.r and max(self.tune.space.r) > self.serve.max_lora_rank:
            raise ValueError(f"tune.space.r goes up to {max(self.tune.space.r)} > serve.max_lora_rank="
                             f"{self.serve.max_lora_rank}: the sweep's winner might not fit vLLM's LoRA slots; raise "
                             f"serve.max_lora_rank ({lora_ranks()}) or drop the larger ranks")
        if self.tune and self.data.split.validation <= 0:
            raise ValueError("tune: a sweep ranks trials on eval_loss and needs a validation split; set "
                             "data.split.validation > 0")
        if self.rl:
            _check_rl(self)
        return self

    def stage_dir(self, stage: str) -> Path:
        """A stage's folder on this machine (the local mirror when output_dir is a URI)."""
        return self.run_dir() / stage

    def eval_test_path(self) -> str | None:
        """What the evaluate stage reads: eval.test_path when set; else, when the config asks for an evaluation
        (an `eval:` or `gate:` section) and the data stage holds rows out (data.split.test > 0), `curated` (this
        run's curated test split); else None (no evaluate stage)."""
        if self.eval.test_path:
            return self.eval.test_path
        return CURATED_TEST if self.asks_evaluation() and self.data.split.test > 0 else None

    def asks_evaluation(self) -> bool:
        """The config has an `eval:` or `gate:` section (written, or set by an override)."""
        return bool({"eval", "gate"} & self.model_fields_set)

    def run_dir(self) -> Path:
        base = storage.mirror(self.output_dir) if storage.is_uri(self.output_dir) else Path(self.output_dir)
        return base / self.name

    def remote_run(self) -> str | None:
        """The run folder's URI when output_dir is one, else None."""
        return f"{self.output_dir.rstrip('/')}/{self.name}" if storage.is_uri(self.output_dir) else None



def _check_rl(cfg: RunConfig) -> None:
    """An rl: section the stage could not run, refused when the config is read."""
    rl = cfg.rl
    if not rl.prompts_path:
        raise ValueError("rl.prompts_path is not set: point it at a file of prompts (JSONL, Parquet, CSV, ...)")
    if not rl.rewards:
        raise ValueError("rl.rewards is empty: name at least one reward function (e.g. {fn: exact_answer})")
    if rl.start == "dpo" and not cfg.dpo.train_path:
        raise ValueError("rl.start=dpo starts from the preference-tuned adapter: set dpo.train_path, or rl.start="
                         "sft / base")


def preflight(cfg: RunConfig, checks: tuple[str, ...] | list[str], source: str = "<config>") -> None:
    """Check what a command will read, before any Ray work: local input files exist and hold rows, the model
    folder is one, a served adapter fits serve's slots. Raises MissingInput / DataError / ConfigError.

    checks: "model" (and, last, lora.target_modules other than all-linear, which every model has, against its
    linear layers: that imports transformers), "train_rows" (data.train_path),
    "pairs" (dpo.train_path, when set), "test_rows"
    (eval.test_path), "quantize_rows" (its row files), "prompts" (rl.prompts_path and what the rl stage refuses,
    with an rl: section), "sweep" (a tune: section), "serving" (the adapter fits
    serve's LoRA slots). A stage's checks are its `needs` (cluster.stages). URIs (s3://...) are left to the stage:
    checking them here would need credentials and a round trip."""
    want = set(checks)
    if "model" in want:
        try:
            local_folder(cfg.model.name)
        except MissingInput as e:
            raise MissingInput(f"{source}: {e}") from None
    if "train_rows" in want:
        _check_rows(cfg.data.train_path, "data.train_path", source)
    if "pairs" in want and cfg.dpo.train_path:
        _check_rows(cfg.dpo.train_path, "dpo.train_path", source)
    if "test_rows" in want and cfg.eval_test_path() not in (None, CURATED_TEST):
        _check_rows(cfg.eval.test_path, "eval.test_path", source)
    if "quantize_rows" in want:
        for key in ("calibration_path", "eval_path"):
            if getattr(cfg.quantize, key):
                _check_rows(getattr(cfg.quantize, key), f"quantize.{key}", source)
    if "prompts" in want and cfg.rl:
        _check_rows(cfg.rl.prompts_path, "rl.prompts_path", source)
        try:
            rl_check(cfg.rl, TrainSetup(model_dir="", train=cfg.train, quant=cfg.quant), cfg.lora, cfg.serve)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    if "sweep" in want and cfg.tune is None:
        raise ConfigError(f"{source}: no tune: section: add one to sweep (see configs/tune-tiny-cpu.yaml)")
    if "serving" in want:
        if cfg.lora.dora:
            raise ConfigError(f"{source}: lora.dora=true with serving: vLLM cannot serve DoRA adapters; train "
                              "without DoRA, or merge the adapter (`loraforge merge`) and serve the merged model")
        if cfg.lora.r > cfg.serve.max_lora_rank:
            raise ConfigError(f"{source}: lora.r={cfg.lora.r} > serve.max_lora_rank={cfg.serve.max_lora_rank}: the "
                              "served adapter would not fit vLLM's LoRA slots; raise serve.max_lora_rank (one of "
                              f"{lora_ranks()}) or lower lora.r")
    if "model" in want and cfg.lora.target_modules != "all-linear":  # last: it imports transformers
        _check_targets(cfg, source)
    if "serving" in want and "merge" not in cfg.model_fields_set:  # the adapter is served on the base: vLLM's LoRA
        _check_lora_serving(cfg, source)


def _check_lora_serving(cfg: RunConfig, source: str) -> None:
    """An adapter served on the base needs vLLM's LoRA on its architecture (serve.lora_support): refused here when
    vLLM has none (GPT-2, Falcon, ...), before anything trains. Left to the stage when it cannot be told here (no
    config.json on this machine, no vLLM)."""
    try:
        support = support_for_config(config_of(cfg.model.name, cfg.model.cache_dir), modules=False)
    except Exception:  # noqa: BLE001 - no config here, an unknown model type: the serve stage checks again
        return
    if support is not None and not support.supported:
        raise ConfigError(f"{source}: model.name={cfg.model.name!r}: {support.refusal()}")


def _check_targets(cfg: RunConfig, source: str) -> None:
    """lora.target_modules resolved against the model's own linear layers (pipelines.train.targets), listed from
    its config.json on the meta device: a name that matches no linear layer, or a preset with none on this model
    (mlp on Mixtral), is a ConfigError naming them and the model's linear layers. A model whose config.json is not
    on this machine (a hub id not downloaded yet), or that transformers cannot build here, is left to the stage."""
    try:
        listing = lora_targets.describe(config_of(cfg.model.name, cfg.model.cache_dir))
    except Exception:  # no config here, no transformers, an unknown model type: the worker resolves and says
        return
    try:
        lora_targets.resolve(cfg.lora.target_modules, listing.linears)
    except ConfigError as e:
        raise ConfigError(f"{source}: model.name={cfg.model.name!r}: {e}") from None


def _check_rows(spec: str, key: str, source: str) -> None:
    """A local file, folder or glob that exists and whose files are not all empty."""
    if "://" in spec:
        return
    try:
        files = expand_paths(spec)
    except MissingInput as e:
        raise MissingInput(f"{source}: {key}={spec!r}: {str(e).split(': ', 1)[-1]}") from None
    if all(_blank(f) for f in files):
        where = files[0] if len(files) == 1 else f"all {len(files)} files of {spec!r}"
        raise DataError(f"{source}: {key}: {where} has no rows (the file is empty); point {key} at a file "
                        "with data")


def _blank(path: str) -> bool:
    """No non-whitespace byte in the file (read in 64 KiB pieces; stops at the first byte of data)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return False
    return True


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML: numbers, booleans, lists) to a config dict. An empty
    value resets the key (None), except for a secret (serve.api_key=): that stays "", which validation refuses, so
    `serve.api_key=$UNSET_VAR` is an error, not an endpoint without a key."""
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
        secret = redact({parts[-1]: "x"})[parts[-1]] != "x"
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ("" if secret else None)
    return doc


MAX_CONFIG_BYTES = 1 << 20  # a run config is a page of YAML; a bigger file is not one
MAX_CONFIG_NODES = 100_000  # values after alias expansion: an alias bomb expands to billions


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last silently: a second `serve:`
    block would drop the first one's api_key)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name}: key {key!r} is given twice in one mapping, on lines {seen[key]} and "
                                  f"{line}: keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(node, memo: dict[int, int]) -> int:
    """How many nodes a YAML node stands for once its aliases are expanded (shared nodes counted per use)."""
    if id(node) not in memo:
        memo[id(node)] = 0  # a recursive alias counts as one while it is being measured
        children = node.value if isinstance(node.value, list) else []
        memo[id(node)] = 1 + sum(_expanded_size(c, memo) for pair in children
                                 for c in (pair if isinstance(pair, tuple) else (pair,)))
    return memo[id(node)]


def read_yaml(path: Path) -> Any:
    """A config file's YAML, refusing in one line: a file over MAX_CONFIG_BYTES, bytes that are not UTF-8 (with
    the line), a duplicate key (both lines), aliases that expand past MAX_CONFIG_NODES values, broken YAML."""
    raw = path.read_bytes()
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {len(raw):,} bytes is not a run config (at most {MAX_CONFIG_BYTES:,})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: byte 0x{raw[e.start]:02x} is not UTF-8; save the config as "
                          "UTF-8") from None
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_CONFIG_NODES:
            raise ConfigError(f"{path}: its aliases expand to more than {MAX_CONFIG_NODES:,} values; a run config "
                              "needs far fewer: write the values out")
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config. Raises ConfigError naming the file and every bad key."""
    source = str(path) if path else "<defaults>"
    doc: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: no such config file")
        doc = read_yaml(p) or {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
    doc = apply_overrides(doc, overrides or [])
    try:
        return RunConfig.model_validate(doc)
    except ValidationError as e:
        lines = [f"{source}: {'.'.join(str(x) for x in err['loc']) or '(run config)'}: "
                 f"{err['msg'].removeprefix('Value error, ')}"
                 + (f" (got {_shown(err)!r})" if err["type"] != "extra_forbidden" and "input" in err
                    and not isinstance(err["input"], dict) else "")
                 for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None


def _shown(err: Any) -> Any:
    """The refused value as an error message may show it: a secret's (serve.api_key's) is '***' unless empty."""
    key = str(err["loc"][-1]) if err.get("loc") else ""
    return redact({key: err["input"]})[key]


def json_schema() -> str:
    return json.dumps(RunConfig.model_json_schema(), indent=2)
