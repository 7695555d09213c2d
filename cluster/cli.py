"""The `loraforge` command (also `python -m cluster`): one table of every command, each behind the one error path.

    loraforge run configs/quickstart-cpu.yaml                     # the job graph (cluster.graph) → demo answers
    loraforge run configs/quickstart-cpu.yaml --dry-run           # each stage run / cached / off, and why
    loraforge run configs/quickstart-cpu.yaml train.max_steps=20 lora.r=8
    loraforge tokenize CONFIG | sft CONFIG | serve CONFIG         # one stage alone, on the previous one's output
    loraforge submit configs/quickstart-cpu.yaml --address http://HEAD:8265 [--wait]   # the graph as a Ray job
    loraforge jobs status|logs|stop ID
    loraforge config-schema                                       # JSON Schema of the run config

The commands live in cli_stages (the stages), cli_serve (serve, deploy, chat), cli_jobs (submit, jobs) and
cli_registry; this module only names them. A user error exits 2 with one message (cluster.cli_common); every
stage command prints its output folder as the last line of its output.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from cluster import cli_jobs, cli_monitor, cli_plan, cli_registry, cli_serve, cli_stages, stages
from cluster.cli_common import guarded

if os.environ.get("LORAFORGE_VERBOSE") != "1":
    # Import-time warnings of a backend transformers probes, about nothing the user runs: torchao's CUDA kernels that
    # a CPU machine cannot load and torch's deprecation of the way torchao registers its enums. Commands without a
    # log (--dry-run, validate, plan) printed them before their own output.
    for _name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(_name).setLevel(logging.ERROR)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Ray-native LoRA fine-tuning and serving.")


def stage_commands() -> dict:
    """Each stage's command, from the stage table: its own (cli_stages, cli_serve) where it has options, else
    the generic one."""
    out = {}
    for stage in stages.STAGES:
        if stage.command:
            name = stage.command.replace("-", "_")
            own = getattr(cli_stages, name, None) or getattr(cli_serve, name, None)
            out[stage.command] = own or cli_stages.stage_command(stage)
    return out


COMMANDS = {
    "run": cli_stages.run, "curate": cli_stages.curate, **stage_commands(),
    "score": cli_stages.score, "validate": cli_stages.validate, "config-schema": cli_stages.config_schema,
    "plan": cli_plan.plan, "deploy": cli_serve.deploy, "chat": cli_serve.chat, "submit": cli_jobs.submit,
    "monitor": cli_monitor.monitor,
}
REGISTRY = {"list": cli_registry.registry_list, "show": cli_registry.registry_show,
            "promote": cli_registry.registry_promote, "rollback": cli_registry.registry_rollback}
JOBS = {"status": cli_jobs.jobs_status, "logs": cli_jobs.jobs_logs, "stop": cli_jobs.jobs_stop,
        "list": cli_jobs.jobs_list}

for _name, _command in COMMANDS.items():
    app.command(_name)(guarded(_command))
for _name, _command in REGISTRY.items():
    cli_registry.registry_app.command(_name)(guarded(_command))
for _name, _command in JOBS.items():
    cli_jobs.jobs_app.command(_name)(guarded(_command))
app.add_typer(cli_registry.registry_app, name="registry")
app.add_typer(cli_jobs.jobs_app, name="jobs")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
