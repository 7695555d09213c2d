"""Manifests, the one atomic folder publish, the registry, model resolution: the only wing serve/ reads."""
