"""Which adapter a request gets: model-name parsing and weighted, sticky A/B splits. Pure: no Ray, no vLLM.

A split maps a public name to versions with weights, e.g. `{"city": {"city@3": 80, "city@4": 20}}`. The choice
hashes (split name, caller) into [0, 1) and walks the cumulative weights, so the same caller always lands on
the same version while the weights stay put, on every replica, without shared state.
"""

from __future__ import annotations

import hashlib

from serve.errors import APIError

ANONYMOUS = "anonymous"


def adapter_part(requested: str, alias: str) -> str | None:
    """`base` -> None (the base model); `base:x` and `x` -> `x`; another base's prefix is a 404."""
    if requested == alias:
        return None
    if requested.startswith(alias + ":"):
        return requested[len(alias) + 1:]
    if ":" in requested:
        raise APIError(404, f"The model {requested!r} does not exist: this app serves base {alias!r} "
                            f"('{alias}' or '{alias}:<adapter>')")
    return requested


def caller_key(user: str | None, api_key: str | None, fallback: str | None = None) -> str:
    """Who is asking, for stickiness: the request's `user`, else the API key (hashed, never kept), else the
    client address; callers with none of these share one bucket."""
    if user:
        return "user:" + user
    if api_key:
        return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]
    return "addr:" + fallback if fallback else ANONYMOUS


def bucket(split_name: str, caller: str) -> float:
    """A uniform number in [0, 1) fixed by (split, caller): salted by the split so A/B tests are independent."""
    digest = hashlib.sha256(f"{split_name}\0{caller}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def choose(split_name: str, weights: dict[str, float], caller: str) -> str:
    """The target of `weights` (ref -> weight > 0) this caller is assigned to."""
    targets = sorted(weights)  # a stable order: dict order must not change assignments across replicas
    total = sum(weights[t] for t in targets)
    point, acc = bucket(split_name, caller) * total, 0.0
    for t in targets:
        acc += weights[t]
        if point < acc:
            return t
    return targets[-1]  # float rounding at the very top


def route(name: str, splits: dict[str, dict[str, float]], caller: str) -> str:
    """The adapter reference to serve for the requested adapter `name`: a split's pick, or `name` itself."""
    weights = splits.get(name)
    return name if not weights else choose(name, weights, caller)
