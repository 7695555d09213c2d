"""OpenAI error bodies and model cards in the shapes OpenAI clients parse. Pure: no Ray, no vLLM.

Requests and responses themselves are vLLM's protocol models, through Ray's ingress (serve.ingress).
"""

from __future__ import annotations

from typing import Any

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               500: "internal_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error the client caused or should see, rendered as an OpenAI error body with its status code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "code": status}}


def model_card(model_id: str, created: int, parent: str | None = None) -> dict[str, Any]:
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "loraforge"}
    if parent is not None:
        card["parent"] = parent
    return card
