"""The `loraforge` command (also `python -m cluster`).

    loraforge run configs/quickstart-cpu.yaml                     # data → sft → serve → demo answers → exit
    loraforge run configs/quickstart-cpu.yaml train.max_steps=20 lora.r=8
    loraforge tokenize CONFIG | sft CONFIG | serve CONFIG         # one stage alone, on the previous one's output
    loraforge config-schema                                       # JSON Schema of the run config

Every stage command prints its output folder as the last line of its output.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from cluster.config import ConfigError, RunConfig, json_schema, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Ray-native LoRA fine-tuning and serving.")
CONFIG = typer.Argument(..., help="Run config YAML (see configs/).")
OVERRIDES = typer.Argument(None, help="dotted.key=value overrides, e.g. train.max_steps=20")


def _load(config: Path, overrides: Optional[list[str]]) -> RunConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        typer.secho(f"config error:\n{e}", fg="red", err=True)
        raise typer.Exit(2) from None


def _done(path: Path | str) -> None:
    from cluster.runner import finish

    finish()
    sys.stderr.flush()
    print(Path(path).resolve(), flush=True)


@app.command()
def run(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Run data → sft → serve, print base vs adapter answers through the OpenAI API, shut down, exit 0."""
    from cluster import runner

    cfg = _load(config, overrides)
    model_dir = runner.stage_model(cfg)
    data_dir = runner.stage_data(cfg, model_dir)
    sft_dir = runner.stage_sft(cfg, model_dir, data_dir)
    adapters = {cfg.name: str(sft_dir)}
    if cfg.dpo.train_path:
        adapters[f"{cfg.name}-dpo"] = str(runner.stage_dpo(cfg, model_dir, sft_dir))
    url = runner.start_serving(cfg, model_dir, adapters)
    try:
        runner.demo(cfg, url, cfg.name)
    finally:
        from serve.app import shutdown

        shutdown()
    _done(sft_dir)


@app.command()
def tokenize(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Data stage alone: raw rows → token ids with assistant-only labels (Ray Data)."""
    from cluster import runner

    cfg = _load(config, overrides)
    _done(runner.stage_data(cfg, runner.stage_model(cfg)))


@app.command()
def sft(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """SFT stage alone, on the data stage's output folder of the same run."""
    from cluster import runner

    cfg = _load(config, overrides)
    _done(runner.stage_sft(cfg, runner.stage_model(cfg), cfg.stage_dir("data")))


@app.command()
def dpo(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """DPO alone: preference pairs (dpo.train_path) on top of this run's SFT adapter."""
    from cluster import runner

    cfg = _load(config, overrides)
    _done(runner.stage_dpo(cfg, runner.stage_model(cfg), cfg.stage_dir("sft")))


@app.command()
def serve(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Serve the base model and this run's adapter (if trained) until Ctrl-C or SIGTERM."""
    from cluster import runner
    from serve.app import shutdown

    cfg = _load(config, overrides)
    model_dir = runner.stage_model(cfg)
    sft_dir = cfg.stage_dir("sft")
    adapters = {cfg.name: str(sft_dir.resolve())} if (sft_dir / "adapter_config.json").is_file() else {}
    url = runner.start_serving(cfg, model_dir, adapters)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    runner.console.print(f"serving on {url} — Ctrl-C to stop")
    stop.wait()
    shutdown()
    _done(sft_dir)


@app.command("config-schema")
def config_schema() -> None:
    """Print the JSON Schema of the run config."""
    print(json_schema())


@app.command()
def validate(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Validate a config (with overrides) and print it resolved, without running anything."""
    print(_load(config, overrides).model_dump_json(indent=2))


# Each area keeps its commands in its own module so the CLI grows without one file owning everything.
from cluster import cli_data, cli_eval, cli_serve  # noqa: E402

for _area in (cli_data, cli_eval, cli_serve):
    _area.register(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
