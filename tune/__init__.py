"""Ray Tune sweeps (rank / alpha / LR with ASHA) over the pipelines' trainers.

Not built yet: the foundation issue leaves this package empty on purpose; the sweep driver lands with its own
issue. It may import `pipelines` only (DESIGN.md §2).
"""
