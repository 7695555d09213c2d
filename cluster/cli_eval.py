"""CLI commands of the eval area, added to the `loraforge` app by cluster.cli. Heavy imports stay inside commands.

    loraforge score preds.jsonl --prediction-field prediction --reference-field reference --json
    loraforge evaluate CONFIG --adapter runs/x/sft [--gate] [--force]
    loraforge merge CONFIG --adapter runs/x/sft [--out DIR] [--register NAME]
    loraforge quantize CONFIG [--model runs/x/merge] [quantize.method=int8|awq] [--register NAME]
    loraforge registry list|show|promote|rollback --root registry
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

registry_app = typer.Typer(add_completion=False, no_args_is_help=True,
                           help="Versioned adapters and models: list, show, promote, rollback.")
ROOT = typer.Option("registry", "--root", help="Registry folder.")
REGISTER = typer.Option(None, "--register", help="Publish the result under this name in registry.root.")


def _fail(msg: str) -> None:
    typer.secho(msg, fg="red", err=True)
    raise typer.Exit(2)


def score(file: Path = typer.Argument(..., help="JSONL with one prediction and one reference per row."),
          prediction_field: str = typer.Option("prediction", help="Field holding the model's answer."),
          reference_field: str = typer.Option("reference", help="Field holding the reference answer."),
          as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object on the last line."),
          bertscore: bool = typer.Option(True, help="Compute BERTScore F1 (local MiniLM; a few seconds)."),
          bertscore_model: Optional[str] = typer.Option(None, help="Encoder folder for BERTScore."),
          use_stemmer: bool = typer.Option(False, help="Porter stemming in ROUGE.")) -> None:
    """Score predictions against references: ROUGE-1/2/L F means, corpus BLEU and chrF, BERTScore F1."""
    from pipelines.metrics import exact_match, text_metrics

    preds, refs = [], []
    try:
        lines = file.read_text().splitlines()
    except OSError as e:
        _fail(f"{file}: {e}")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            p, r = row[prediction_field], row[reference_field]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            _fail(f"{file}:{i}: needs fields {prediction_field!r} and {reference_field!r} ({type(e).__name__}: {e})")
        preds.append("" if p is None else str(p))
        refs.append("" if r is None else str(r))
    if not preds:
        _fail(f"{file}: no rows")
    figures = text_metrics(preds, refs, bertscore=bertscore, bertscore_model=bertscore_model, use_stemmer=use_stemmer)
    figures["exact_match"] = exact_match(preds, refs)
    figures["n"] = len(preds)
    for key, value in figures.items():
        typer.echo(f"{key:>14}  {value:.4f}" if isinstance(value, float) else f"{key:>14}  {value}")
    if as_json:
        print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in figures.items()}))


@registry_app.command("list")
def registry_list(root: Path = ROOT, as_json: bool = typer.Option(False, "--json", help="One JSON list, last line.")) -> None:
    """Registered names with their versions and aliases."""
    from pipelines.registry import Registry

    rows = Registry(root).list()
    for r in rows:
        aliases = ", ".join(f"{a}→{v}" for a, v in sorted(r["aliases"].items())) or "-"
        typer.echo(f"{r['name']:<24} {r['kind']:<16} versions {r['versions']}  aliases {aliases}")
    if as_json:
        print(json.dumps(rows))


@registry_app.command("show")
def registry_show(name: str = typer.Argument(..., help="Registered name."), root: Path = ROOT) -> None:
    """Versions (lineage, hash, variants), aliases and alias history of one name, as JSON."""
    from pipelines.registry import Registry, RegistryError

    try:
        print(json.dumps(Registry(root).show(name), indent=2, default=str))
    except RegistryError as e:
        _fail(str(e))


@registry_app.command("promote")
def registry_promote(name: str = typer.Argument(...), version: int = typer.Argument(...),
                     alias: str = typer.Argument(..., help="e.g. production, candidate"),
                     reason: str = typer.Option("", help="Recorded in the audit log."), root: Path = ROOT) -> None:
    """Point an alias at a version (recorded in the audit log)."""
    from pipelines.registry import Registry, RegistryError

    try:
        Registry(root).promote(name, version, alias, reason=reason or "manual promote")
    except RegistryError as e:
        _fail(str(e))
    typer.echo(f"{name}@{alias} -> {version}")


@registry_app.command("rollback")
def registry_rollback(name: str = typer.Argument(...), alias: str = typer.Argument(...),
                      reason: str = typer.Option("", help="Recorded in the audit log."), root: Path = ROOT) -> None:
    """Move an alias back to the version it pointed at before its last promote."""
    from pipelines.registry import Registry, RegistryError

    try:
        version = Registry(root).rollback(name, alias, reason=reason or "manual rollback")
    except RegistryError as e:
        _fail(str(e))
    typer.echo(f"{name}@{alias} -> {version}")


CONFIG = typer.Argument(..., help="Run config YAML (see configs/).")
OVERRIDES = typer.Argument(None, help="dotted.key=value overrides, e.g. eval.max_samples=32")


def _section(cfg, field: str, cls):
    """The run config's section, or the section's defaults while RunConfig does not carry it yet."""
    return getattr(cfg, field, None) or cls()


def evaluate(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
             adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="NAME=FOLDER or FOLDER; repeatable. "
                                                         "Default: this run's sft/ folder."),
             test: Optional[str] = typer.Option(None, help="Test split JSONL (overrides eval.test_path)."),
             gate: bool = typer.Option(False, "--gate", help="Apply the gate to the first adapter afterwards."),
             force: bool = typer.Option(False, "--force", help="Promote even if the gate fails (audited).")) -> None:
    """Base vs few-shot base vs adapters: metrics, forgetting, report; optionally gate + promote."""
    from cluster import runner
    from cluster.cli import _done, _load
    from pipelines import evaluate as ev
    from pipelines.gate import GateSection, apply
    from pipelines.registry import RegistrySection

    cfg = _load(config, overrides)
    section = _section(cfg, "eval", ev.EvalSection)
    if test:
        section = section.model_copy(update={"test_path": test})
    adapters = _adapters(adapter, cfg)
    runner.init_ray(cfg)
    out = ev.run(section, runner.stage_model(cfg), adapters, cfg.stage_dir("evaluate"))
    if gate:
        results = json.loads((out / "eval.json").read_text())
        reg, first = _section(cfg, "registry", RegistrySection), next(iter(adapters))
        decision = apply(results, first, adapters[first], _section(cfg, "gate", GateSection), reg.root,
                         reg.name or cfg.name, force=force)
        for reason in decision.reasons:
            typer.secho(f"gate: {reason}", fg="red", err=True)
        if not decision.passed and not force:
            typer.secho("gate: refused (use --force to override; it is recorded)", fg="red", err=True)
            raise typer.Exit(1)
        typer.echo(f"gate: {'FORCED' if decision.forced else 'passed'}: {reg.name or cfg.name}@{decision.version}")
    _done(out)


def merge(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
          adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="Adapter folder; repeatable."),
          out: Optional[Path] = typer.Option(None, help="Output folder; default <run>/merge."),
          register: Optional[str] = REGISTER) -> None:
    """Merge adapter(s) into an unquantized copy of the base; parity-check; save an HF folder."""
    from cluster import runner
    from cluster.cli import _done, _load
    from pipelines.merge import MergeSection, ParityError, run

    cfg = _load(config, overrides)
    folders = list(_adapters(adapter, cfg).values())
    try:
        path = run(_section(cfg, "merge", MergeSection), runner.stage_model(cfg), folders,
                   out or cfg.stage_dir("merge"))
    except ParityError as e:
        _fail(str(e))
    _register(cfg, path, register, "merged_model")
    _done(path)


def quantize(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
             model: Optional[Path] = typer.Option(None, help="Full-precision model folder; default <run>/merge."),
             out: Optional[Path] = typer.Option(None, help="Output folder; default <run>/quantize-<method>."),
             register: Optional[str] = REGISTER) -> None:
    """Quantize a merged model (int8 weight-only or AWQ W4A16); measure its recovery against the source."""
    from cluster import runner
    from cluster.cli import _done, _load
    from pipelines.quantize import RecoveryError

    cfg = _load(config, overrides)
    source = model or cfg.stage_dir("merge")
    if not (source / "config.json").is_file():
        _fail(f"{source}: not a model folder (no config.json); run `loraforge merge` first or pass --model")
    try:
        path = runner.stage_quantize(cfg, str(source.resolve()), out)
    except (RecoveryError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    _register(cfg, path, register, "quantized_model")
    typer.echo((path / "quantize_report.md").read_text())
    _done(path)


def _register(cfg, folder: Path, name: Optional[str], kind: str) -> None:
    """Publish a stage's output folder as the next version of `name` in the run's registry."""
    if not name:
        return
    from pipelines.registry import Registry, RegistryError, RegistrySection, lineage_from_manifest

    reg = _section(cfg, "registry", RegistrySection)
    try:
        version = Registry(reg.root).publish(name, folder, kind, lineage_from_manifest(folder))
    except RegistryError as e:
        _fail(str(e))
    typer.echo(f"registry: {name}@{version} ({kind}) in {reg.root}")


def _adapters(specs: Optional[list[str]], cfg) -> dict[str, str]:
    if not specs:
        sft = cfg.stage_dir("sft")
        if not (sft / "adapter_config.json").is_file():
            _fail(f"no --adapter given and {sft} holds no adapter")
        return {cfg.name: str(sft.resolve())}
    out = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).resolve().name, spec
        out[name] = str(Path(folder).resolve())
    return out


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command("score")(score)
    app.command("evaluate")(evaluate)
    app.command("merge")(merge)
    app.command("quantize")(quantize)
    app.add_typer(registry_app, name="registry")
