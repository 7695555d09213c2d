"""Ray Serve application: one base model plus LoRA adapters on vLLM, behind an OpenAI-compatible API.

Importing this package imports neither Ray nor vLLM; `build_app`, `start` and `shutdown` load `serve.app`
(and with it Ray Serve and FastAPI) on first use.
"""

from __future__ import annotations

from typing import Any

from serve.config import ServeConfig

__all__ = ["ServeConfig", "build_app", "start", "shutdown"]


def __getattr__(name: str) -> Any:
    if name in ("build_app", "start", "shutdown"):
        from serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'serve' has no attribute {name!r}")
