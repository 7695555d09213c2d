"""Per-adapter, per-version request metrics, exported through Ray's Prometheus endpoint (ray.util.metrics).

Ray prefixes every name with `ray_`: e.g. `ray_loraforge_requests_total{adapter="city",version="3"}`.
The metric objects are created in the replica on first use; ray.util.metrics needs a connected worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TAGS = ("model", "adapter", "version", "status")
LATENCY_BOUNDS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]
TOKEN_BOUNDS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]


@dataclass
class RequestMetrics:
    requests: Any
    prompt_tokens: Any
    completion_tokens: Any
    latency: Any
    ttft: Any
    tpot: Any

    @classmethod
    def create(cls) -> RequestMetrics:
        from ray.util.metrics import Counter, Histogram

        return cls(
            requests=Counter("loraforge_requests_total", "Requests answered, by adapter version and status.",
                             tag_keys=TAGS),
            prompt_tokens=Counter("loraforge_prompt_tokens_total", "Prompt tokens processed.", tag_keys=TAGS),
            completion_tokens=Counter("loraforge_completion_tokens_total", "Tokens generated.", tag_keys=TAGS),
            latency=Histogram("loraforge_request_latency_s", "Request wall time in seconds (to last token).",
                              boundaries=LATENCY_BOUNDS_S, tag_keys=TAGS),
            ttft=Histogram("loraforge_time_to_first_token_s", "Streamed requests: seconds from arrival at the "
                           "ingress to the first generated token.", boundaries=LATENCY_BOUNDS_S, tag_keys=TAGS),
            tpot=Histogram("loraforge_time_per_output_token_s", "Streamed requests: seconds per generated token "
                           "after the first ((last - first) / (tokens - 1)).", boundaries=TOKEN_BOUNDS_S,
                           tag_keys=TAGS))

    def record(self, tags: dict[str, str], status: int, latency_s: float, prompt: int = 0, completion: int = 0,
               ttft_s: float | None = None, tpot_s: float | None = None) -> None:
        """One answered request; ttft_s / tpot_s only for streamed ones (a non-streaming answer arrives whole at
        the ingress: it has no first-token time there)."""
        t = {**tags, "status": str(status)}
        self.requests.inc(1, tags=t)
        if prompt:
            self.prompt_tokens.inc(prompt, tags=t)
        if completion:
            self.completion_tokens.inc(completion, tags=t)
        self.latency.observe(latency_s, tags=t)
        if ttft_s is not None:
            self.ttft.observe(ttft_s, tags=t)
        if tpot_s is not None:
            self.tpot.observe(tpot_s, tags=t)


def tags_for(model: str, adapter: str | None, version: str | None) -> dict[str, str]:
    """Label values: the base model has adapter "" so dashboards can separate it; unversioned sources ""."""
    return {"model": model, "adapter": adapter or "", "version": version or ""}
