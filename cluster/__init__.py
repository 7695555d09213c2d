"""The top layer: the run config that composes every section, the job graph, the CLI. Imports nothing heavy."""
