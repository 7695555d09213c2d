"""Ray Serve application: one base model plus LoRA adapters on vLLM, behind an OpenAI-compatible API.

Importing this package imports neither Ray nor vLLM; `build_app`, `start` and `shutdown` load `serve.app`
(and with it Ray Serve and FastAPI) on first use. Adapter sources (`StaticSource`, `FolderSource`,
`RegistrySource`) are pure and resolve `name`, `name@3` or `name@alias` to a folder on first use.
"""

from __future__ import annotations

from typing import Any

from serve.config import AutoscalingConfig, ServeConfig

__all__ = ["ServeConfig", "AutoscalingConfig", "build_app", "start", "shutdown", "AdapterSource", "StaticSource",
           "FolderSource", "RegistrySource"]


def __getattr__(name: str) -> Any:
    if name in ("build_app", "start", "shutdown"):
        from serve import app

        return getattr(app, name)
    if name in ("AdapterSource", "StaticSource", "FolderSource", "RegistrySource"):
        from serve import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module 'serve' has no attribute {name!r}")
