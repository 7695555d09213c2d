"""The stage commands: each parses its arguments, loads the config and runs its entry of cluster.stages (a stage
with no options of its own gets `stage_command`).

    loraforge run configs/quickstart-cpu.yaml [--dry-run] [--force S] [--from S] [--until S]  # the job graph
    loraforge tokenize CONFIG | curate CONFIG | sft CONFIG | dpo CONFIG | rl CONFIG
    loraforge tune CONFIG [--register NAME]                       # Ray Tune + ASHA; winner in <run>/tune/winner
    loraforge evaluate CONFIG --adapter runs/x/sft [--gate] [--force]
    loraforge merge CONFIG --adapter runs/x/sft [--out DIR] [--register NAME]
    loraforge quantize CONFIG [--model runs/x/merge] [quantize.method=int8|awq] [--register NAME]
    loraforge score preds.jsonl --prediction-field prediction --reference-field reference --json
    loraforge validate CONFIG [overrides]                         # the config resolved, its inputs checked

Every stage command prints its output folder as the last line of its output.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from cluster import cli_plan, cli_serve, graph, session, stages, terminal
from cluster.cli_common import CONFIG, OVERRIDES, REGISTER, done, fail, load
from cluster.config import json_schema
from pipelines.artifacts.manifest import read_manifest
from pipelines.data import curate as curation
from pipelines.eval.metrics import exact_match, text_metrics
from pipelines.schema import DataError, MissingInput, redact

ADAPTER = typer.Option(None, "--adapter", help="NAME=FOLDER or FOLDER; repeatable. Default: this run's sft/ folder.")


@contextlib.contextmanager
def _quiet(cfg, command: str):
    """A command's terminal: library noise (Ray's and its workers' logging, warnings, loading bars) to
    <run>/logs/<command>-<time>.log, our progress lines and the stage summaries on the terminal; the Ray instance
    the command started is stopped inside, so no worker line lands after the output folder. Yields the log's path."""
    log = terminal.log_path(cfg.run_dir(), command)
    with terminal.quiet(log, stages.console):
        try:
            yield log
        finally:
            session.finish()


def _plan_line(text: str) -> None:
    stages.console.print(text, style="cyan", markup=False, soft_wrap=True)


def _alone(stage: stages.Stage, config: Path, overrides: Optional[list[str]], **options) -> tuple:
    """(config, context) of a stage command run alone: the config loaded and checked for what the stage reads."""
    cfg = load(config, overrides, stage.needs)
    stages.needs_output(cfg, stage, str(config))
    return cfg, stages.Context(cfg, **options)


def stage_command(stage: stages.Stage) -> Callable[..., None]:
    """The command of a stage with no options of its own: load and check the config, run the stage, print its
    output folder last. Its help is the stage's run docstring."""

    def command(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES) -> None:
        cfg, ctx = _alone(stage, config, overrides)
        with _quiet(cfg, stage.command):
            out = stage(ctx)
        done(out)

    command.__name__ = stage.command.replace("-", "_")
    command.__doc__ = stage.run.__doc__
    return command


def run(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the graph, each stage's run/cached and why; "
                                                              "run nothing."),
        force: Optional[list[str]] = typer.Option(None, "--force", help="Rerun this stage; repeatable."),
        start: Optional[str] = typer.Option(None, "--from", help="Rerun this stage and every stage after it."),
        until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage.")) -> None:
    """The job graph: data → sft → [dpo] → [rl] → [tune] → [evaluate → gate] → [merge → quantize] → serve → demo;
    a stage whose inputs, config sections and code are unchanged since it last finished is skipped (cluster.graph).
    Prints what was served (its registry version when the gate published it), then the run folder last.
    Exit 3 when the gate refuses the adapter."""
    cfg = load(config, overrides, RUN_CHECKS)
    if dry_run:
        cli_plan.check_fits(cfg, str(config))  # refuses, with the breakdown, a run its workers cannot hold
        plan = graph.Graph(cfg, force=tuple(force or ()), start=start, until=until).plan()
        typer.echo(plan.table())
        statuses = {r["stage"]: r["status"] for r in plan.rows}
        if statuses[stages.SERVE.name] == "run":
            typer.echo(f"serves: {stages.served_in_plan(cfg, statuses)}")
        return
    try:
        with _quiet(cfg, "run") as log:
            # inside: the plan imports transformers' quantizers (torchao's import-time warnings go to the log)
            cli_plan.check_fits(cfg, str(config), echo=_plan_line)
            from serve.app import shutdown  # imports vLLM (and its libraries' import-time warnings)

            g = graph.Graph(cfg, force=tuple(force or ()), start=start, until=until)
            try:
                g.run(log=lambda line: stages.console.print(line, style="cyan", markup=False))
            finally:
                if stages.SERVE.name in g.folders:
                    shutdown(only_app=True)  # this run's app only: other apps on a shared cluster keep running
            if stages.SERVE.name in g.folders:
                stages.console.print(f"[bold]served[/]: {stages.served(g.ctx).what}")
    except graph.GateRefused as e:
        for reason in e.reasons:
            typer.secho(f"gate: {reason}", fg="red", err=True)
        fail(f"gate: refused; nothing after the gate ran (outputs so far are in {cfg.run_dir()}; full log {log})",
             code=3)
    done(cfg.run_dir())  # every stage's output is in the run folder


# What `run` and `validate` check before any work: every stage's inputs.
RUN_CHECKS = ("model", "train_rows", "pairs", "prompts", "test_rows", "serving")


def curate(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Curation alone: raw rows → validated, filtered, de-duplicated, split rows + report (Ray Data)."""
    cfg = load(config, overrides, ("model", "train_rows"))
    with _quiet(cfg, "curate"):
        session.init_ray(cfg)
        t0 = time.time()
        out = curation.run(cfg.data, cfg.stage_dir("curated"), model_dir=stages.resolve_base(cfg))
        m = read_manifest(out)["metrics"]
        stages.console.print(f"[bold]curate[/]: {m['rows_in']} rows in, {m['rows_kept']} kept, "
                             f"{m['rows_rejected']} rejected ({time.time() - t0:.0f} s)")
    done(out)


def sft(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
        local: bool = typer.Option(False, "--local", help="Run the training loop in this process on one device "
                                                           "(the GPU when there is one), without Ray: the same "
                                                           "loop, checkpoints and manifest.")) -> None:
    """SFT stage alone, on the data stage's output folder of the same run."""
    cfg, ctx = _alone(stages.SFT, config, overrides, local=local)
    with _quiet(cfg, stages.SFT.command):
        cli_plan.check_fits(cfg, str(config), echo=_plan_line)
        out = stages.SFT(ctx)
    done(out)


def tune(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
         register: Optional[str] = REGISTER) -> None:
    """Ray Tune sweep (tune: section) over the SFT trainer with ASHA; the winner is exported to <run>/tune/winner.
    Tokenizes first when this run has no data stage output; rerun after an interruption to resume the sweep."""
    cfg, ctx = _alone(stages.TUNE, config, overrides)
    with _quiet(cfg, stages.TUNE.command):
        if not (stages.DATA.folder(cfg) / "manifest.json").is_file():
            stages.DATA(ctx)
        out = stages.TUNE(ctx)
        published = stages.publish(cfg, out / "winner", register, "lora_adapter") if register else None
    if published:
        typer.echo(published)
    done(out)


def evaluate(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
             adapter: Optional[list[str]] = ADAPTER,
             test: Optional[str] = typer.Option(None, help="Test split JSONL (overrides eval.test_path)."),
             gate: bool = typer.Option(False, "--gate", help="Apply the gate to the first adapter afterwards."),
             force: bool = typer.Option(False, "--force", help="Promote even if the gate fails (audited).")) -> None:
    """Base vs few-shot base vs adapters: metrics, forgetting, report; optionally gate + promote."""
    cfg, ctx = _alone(stages.EVALUATE, config, [*(overrides or []), *([f"eval.test_path={test}"] if test else [])],
                      force=force)
    ctx.given = stages.adapters_from(adapter, cfg)
    with _quiet(cfg, stages.EVALUATE.command):
        out = stages.EVALUATE(ctx)
        if gate:
            stages.GATE(ctx)
    decision = ctx.decision
    if decision is not None:
        for reason in decision.reasons:
            typer.secho(f"gate: {reason}", fg="red", err=True)
        if not decision.passed and not force:
            fail("gate: refused (use --force to override; it is recorded)", code=1)
        typer.echo(f"gate: {'FORCED' if decision.forced else 'passed'}: {decision.name}@{decision.version}")
    done(out)


def merge(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
          adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="Adapter folder; repeatable."),
          out: Optional[Path] = typer.Option(None, help="Output folder; default <run>/merge."),
          register: Optional[str] = REGISTER) -> None:
    """Merge adapter(s) into an unquantized copy of the base; parity-check; save an HF folder."""
    cfg, ctx = _alone(stages.MERGE, config, overrides)
    ctx.given = stages.adapters_from(adapter, cfg)
    if out:
        ctx.places[stages.MERGE.name] = out
    with _quiet(cfg, stages.MERGE.command):
        path = stages.MERGE(ctx)
        published = stages.publish(cfg, path, register, "merged_model") if register else None
    if published:
        typer.echo(published)
    done(path)


def quantize(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
             model: Optional[Path] = typer.Option(None, help="Full-precision model folder; default <run>/merge."),
             out: Optional[Path] = typer.Option(None, help="Output folder; default <run>/quantize-<method>."),
             register: Optional[str] = REGISTER) -> None:
    """Quantize a merged model (int8 weight-only or AWQ W4A16); measure its recovery against the source."""
    cfg, ctx = _alone(stages.QUANTIZE, config, overrides)
    if model:
        ctx.places[stages.MERGE.name] = model
    ctx.places[stages.QUANTIZE.name] = out or cfg.stage_dir(f"{stages.QUANTIZE.name}-{cfg.quantize.method}")
    source = ctx.folder(stages.MERGE)
    if not (source / "config.json").is_file():
        raise MissingInput(f"{source}: not a model folder (no config.json); run `loraforge "
                           f"{stages.MERGE.command}` first or pass --model")
    with _quiet(cfg, stages.QUANTIZE.command):
        path = stages.QUANTIZE(ctx)
        published = stages.publish(cfg, path, register, "quantized_model") if register else None
    if published:
        typer.echo(published)
    typer.echo((path / "quantize_report.md").read_text())
    done(path)


def score(file: Path = typer.Argument(..., help="JSONL with one prediction and one reference per row."),
          prediction_field: str = typer.Option("prediction", help="Field holding the model's answer."),
          reference_field: str = typer.Option("reference", help="Field holding the reference answer."),
          as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object on the last line."),
          bertscore: bool = typer.Option(True, help="Compute BERTScore F1 (local MiniLM; a few seconds)."),
          bertscore_model: Optional[str] = typer.Option(None, help="Encoder folder for BERTScore."),
          use_stemmer: bool = typer.Option(False, help="Porter stemming in ROUGE.")) -> None:
    """Score predictions against references: ROUGE-1/2/L F means, corpus BLEU and chrF, BERTScore F1."""
    preds, refs = [], []
    try:
        lines = file.read_text().splitlines()
    except OSError as e:
        raise MissingInput(f"{file}: {e.strerror or e}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            p, r = row[prediction_field], row[reference_field]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{file}:{i}: needs fields {prediction_field!r} and {reference_field!r} "
                            f"({type(e).__name__}: {e})") from None
        preds.append("" if p is None else str(p))
        refs.append("" if r is None else str(r))
    if not preds:
        raise DataError(f"{file}: no rows")
    figures = text_metrics(preds, refs, bertscore=bertscore, bertscore_model=bertscore_model, use_stemmer=use_stemmer)
    figures["exact_match"] = exact_match(preds, refs)
    figures["n"] = len(preds)
    for key, value in figures.items():
        typer.echo(f"{key:>14}  {value:.4f}" if isinstance(value, float) else f"{key:>14}  {value}")
    if as_json:
        print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in figures.items()}))


def validate(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Validate a config (with overrides) and its local inputs; print it resolved, without running anything."""
    cfg = load(config, overrides, (*RUN_CHECKS, "quantize_rows"))
    cli_serve.check_config_adapters(cfg)  # serve.adapter_dir's adapters: their tensors vs config and base
    print(json.dumps(redact(cfg.model_dump(mode="json")), indent=2))  # keys and credentials as ***


def config_schema() -> None:
    """Print the JSON Schema of the run config."""
    print(json_schema())
