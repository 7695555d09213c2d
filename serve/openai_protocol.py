"""OpenAI model cards in the shape OpenAI clients parse. Pure: no Ray, no vLLM.

Requests and responses themselves are vLLM's protocol models, through Ray's ingress (serve.ingress); error
bodies and their statuses are serve.errors' (APIError is importable from here too).
"""

from __future__ import annotations

from typing import Any

from serve.errors import APIError

__all__ = ["APIError", "model_card"]


def model_card(model_id: str, created: int, parent: str | None = None) -> dict[str, Any]:
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "loraforge"}
    if parent is not None:
        card["parent"] = parent
    return card
