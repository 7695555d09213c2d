"""CLI commands of the data area, added to the `loraforge` app by cluster.cli. Heavy imports stay inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""

    @app.command()
    def curate(config: Path = typer.Argument(..., help="Run config YAML (see configs/)."),
               overrides: Optional[list[str]] = typer.Argument(None, help="dotted.key=value overrides")) -> None:
        """Curation alone: raw rows → validated, filtered, de-duplicated, split rows + report (Ray Data)."""
        from cluster import runner
        from cluster.cli import _done, _load
        from pipelines import curate as curate_stage

        cfg = _load(config, overrides)
        model_dir = runner.stage_model(cfg)
        runner.init_ray(cfg)
        _done(curate_stage.run(cfg.data, cfg.stage_dir("curated"), model_dir=model_dir))
