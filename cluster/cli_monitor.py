"""`loraforge monitor`: live quality signals of each served adapter version against its baseline (serve.monitor).

    loraforge monitor --metrics http://127.0.0.1:8080/metrics --registry registry --window 60
"""

from __future__ import annotations

import json

import typer

from pipelines.schema import UserError
from serve import monitor as watch


def monitor(metrics: str = typer.Option(..., "--metrics", help=(
                "The app's Prometheus export: Ray's metrics endpoint, http://<node>:<metrics_export_port>/metrics.")),
            registry: str = typer.Option(None, "--registry", help="Registry holding each version's baseline."),
            window: float = typer.Option(60.0, "--window", min=0, help=(
                "Seconds between the two reads whose difference is judged; 0: everything since the start.")),
            z: float = typer.Option(3.0, "--z", min=0, help="Standard errors of the baseline band."),
            as_json: bool = typer.Option(False, "--json", help="One JSON object, last line.")) -> None:
    """Per adapter version: live mean entropy, empty/refusal/length shares vs the baseline band, the judge's mean
    score of its sampled answers (judged, failed); canary states."""
    try:
        rep = watch.report(metrics, registry, window, z)
    except OSError as e:
        raise UserError(f"--metrics {metrics}: cannot read the Prometheus export ({e}); give Ray's metrics "
                        "endpoint, http://<node>:<metrics_export_port>/metrics") from None
    for line in watch.lines(rep):
        typer.echo(line)
    if as_json:
        print(json.dumps(rep, default=str))
