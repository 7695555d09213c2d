"""Ray Tune sweeps (rank / alpha / learning rate, ASHA early stopping) over the SFT trainer: `space` (the `tune:`
config section), `sweep` (the stage). Imports `pipelines` only, never `cluster` or `serve`.
"""
