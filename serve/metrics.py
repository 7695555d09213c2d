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


# Quality signals of each answer (serve.signals), recorded by the engine replica that generated it.
SIGNAL_TAGS = ("adapter", "version")
ENTROPY_BOUNDS = [0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]  # nats; top-20 entropy is at most 3.0
ANSWER_TOKEN_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


@dataclass
class SignalMetrics:
    answers: Any
    flagged: Any
    entropy: Any
    entropy_nats: Any
    tokens: Any
    baseline: Any
    baseline_sd: Any

    @classmethod
    def create(cls) -> SignalMetrics:
        from ray.util.metrics import Counter, Gauge, Histogram

        return cls(
            answers=Counter("loraforge_answers_total", "Answers (choices) generated, by adapter version and finish "
                            "reason (stop, length, abort, error).", tag_keys=(*SIGNAL_TAGS, "finish_reason")),
            flagged=Counter("loraforge_answers_flagged_total", "Answers that were empty (flag=empty) or opened "
                            "with a refusal (flag=refusal).", tag_keys=(*SIGNAL_TAGS, "flag")),
            entropy=Histogram("loraforge_answer_entropy", "Mean top-k token entropy of each answer, in nats "
                              "(serve.signals.top_k).", boundaries=ENTROPY_BOUNDS, tag_keys=SIGNAL_TAGS),
            # Ray exports a histogram's _sum from its bucket midpoints: the exact sum is this counter, so
            # rate(ray_loraforge_answer_entropy_nats_total) / rate(ray_loraforge_answer_entropy_count) is the mean.
            entropy_nats=Counter("loraforge_answer_entropy_nats_total", "Sum of the answers' mean token entropies "
                                 "(nats).", tag_keys=SIGNAL_TAGS),
            tokens=Histogram("loraforge_answer_tokens", "Generated tokens per answer.",
                             boundaries=ANSWER_TOKEN_BOUNDS, tag_keys=SIGNAL_TAGS),
            baseline=Gauge("loraforge_baseline_entropy", "Mean answer entropy of the version on its evaluation "
                           "prompts, frozen by the gate (registry lineage serve_baseline).", tag_keys=SIGNAL_TAGS),
            baseline_sd=Gauge("loraforge_baseline_entropy_sd", "Standard deviation of the per-answer entropy of the "
                              "version's baseline.", tag_keys=SIGNAL_TAGS))

    def set_baseline(self, adapter: str, version: str, base: dict[str, Any]) -> None:
        t = {"adapter": adapter, "version": version}
        if base.get("entropy_mean") is not None:
            self.baseline.set(float(base["entropy_mean"]), tags=t)
        if base.get("entropy_sd") is not None:
            self.baseline_sd.set(float(base["entropy_sd"]), tags=t)

    def record(self, answer: Any) -> None:
        """One serve.signals.Answer."""
        t = {"adapter": answer.adapter, "version": answer.version}
        self.answers.inc(1, tags={**t, "finish_reason": answer.finish_reason})
        for flag in ("empty", "refusal"):
            if getattr(answer, flag):
                self.flagged.inc(1, tags={**t, "flag": flag})
        if answer.entropy is not None:
            self.entropy.observe(answer.entropy, tags=t)
            self.entropy_nats.inc(answer.entropy, tags=t)
        self.tokens.observe(answer.tokens, tags=t)


# Judge scores of sampled live answers (serve.judging), recorded by the judge replica.
JUDGE_BOUNDS = [1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5]  # one bucket per integer score 1-10
JUDGE_OUTCOMES = ("scored", "no_score", "error", "dropped")


@dataclass
class JudgeMetrics:
    sampled: Any
    judged: Any
    score: Any
    score_points: Any

    @classmethod
    def create(cls) -> JudgeMetrics:
        from ray.util.metrics import Counter, Histogram

        return cls(
            sampled=Counter("loraforge_judge_sampled_total", "Requests sampled for judging (serve.judge), by adapter "
                            "version.", tag_keys=SIGNAL_TAGS),
            judged=Counter("loraforge_judged_total", "Sampled answers by outcome: scored (the judge's reply held a "
                           "1-10 score), no_score, error (the judge call failed), dropped (queue full).",
                           tag_keys=(*SIGNAL_TAGS, "outcome")),
            score=Histogram("loraforge_judge_score", "Judge score (1-10) of sampled live answers.",
                            boundaries=JUDGE_BOUNDS, tag_keys=SIGNAL_TAGS),
            # the exact sum (a Ray histogram's _sum is built from bucket midpoints): mean = points / score_count
            score_points=Counter("loraforge_judge_score_points_total", "Sum of the judge scores of sampled answers.",
                                 tag_keys=SIGNAL_TAGS))

    def record(self, adapter: str, version: str, outcome: str, score: float | None = None) -> None:
        t = {"adapter": adapter, "version": version}
        self.judged.inc(1, tags={**t, "outcome": outcome})
        if score is not None:
            self.score.observe(score, tags=t)
            self.score_points.inc(score, tags=t)


# Every metric the app exports, as Prometheus sees it (Ray prefixes `ray_`; a histogram adds _bucket, _sum and
# _count): what the shipped alert rules and dashboard may name (tests/unit/serve/test_monitoring.py checks).
EXPORTED = {
    "ray_loraforge_requests_total": "counter", "ray_loraforge_prompt_tokens_total": "counter",
    "ray_loraforge_completion_tokens_total": "counter", "ray_loraforge_request_latency_s": "histogram",
    "ray_loraforge_time_to_first_token_s": "histogram", "ray_loraforge_time_per_output_token_s": "histogram",
    "ray_loraforge_answers_total": "counter", "ray_loraforge_answers_flagged_total": "counter",
    "ray_loraforge_answer_entropy": "histogram", "ray_loraforge_answer_entropy_nats_total": "counter",
    "ray_loraforge_answer_tokens": "histogram",
    "ray_loraforge_canary_percent": "gauge", "ray_loraforge_canary_state": "gauge",
    "ray_loraforge_baseline_entropy": "gauge", "ray_loraforge_baseline_entropy_sd": "gauge",
    "ray_loraforge_judge_sampled_total": "counter", "ray_loraforge_judged_total": "counter",
    "ray_loraforge_judge_score": "histogram", "ray_loraforge_judge_score_points_total": "counter",
}
