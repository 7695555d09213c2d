"""Stages that turn data into artifacts. Importing this package imports nothing heavy."""
