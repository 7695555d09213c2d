"""Quality signals of every answer, per adapter and version: mean token entropy, length, finish reason, empty and
refusal. Measured in the engine replica, on what vLLM already computes, without changing what the client gets.

The signals are defined in pipelines.artifacts.signals (the same the gate stores as a version's baseline). Entropy:
for each generated token vLLM returns the log-probs of the top k tokens (k = serve.signals.top_k, at most vLLM's
max_logprobs, 20); the token's entropy is that of the top-k distribution renormalised (nats), and an answer's signal
is the mean over its tokens. Entropy is measured on a deterministic sample of requests (serve.signals.sample_rate,
a hash of vLLM's request id; 0.25 by default; bench/serve_signals.py --sample-rate measures the cost: vLLM computes
log-probs for a whole batch step once any request in it asks, so the saving may be less than the rate suggests);
length, finish reason, empty and refusal are recorded for every answer, since they cost nothing. For a sampled
request the engine is asked for the top k whether or not the client asked for log-probs: when it did not, the
log-probs are computed without decoding the k candidate tokens (no tokenizer: the costly part) and dropped before
the OpenAI layer sees the output; when it asked for fewer than k, each position is cut back to exactly what vLLM
would have returned for its own number. Prompt log-probs are never requested (they crash the CPU engine with LoRA
on, STACK_NOTES).

Pure apart from `instrument`, which wraps one vLLM AsyncLLM's `generate` (and, once per process, gives vLLM's
LogprobsProcessor no tokenizer for the requests marked here).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pipelines.artifacts.registry import Registry, RegistryError
from pipelines.artifacts.signals import is_empty, is_refusal, topk_entropy
from serve.metrics import SignalMetrics
from serve.routing import bucket

HEAD_CHARS = 200  # how much of an answer's text is kept to judge empty / refusal
MARK = "loraforge_signals"  # extra_args key of a request whose log-probs were asked for here only
FINISH_REASONS = ("stop", "length", "abort", "error")
logger = logging.getLogger("loraforge.serve")


def labels(lora_name: str | None) -> tuple[str, str]:
    """(adapter, version) of an engine LoRA name: `base:city@4` -> (city, 4); `base:alpha` -> (alpha, ""); the base
    model (no LoRA) -> ("", "") -- the same label values as serve.metrics.tags_for."""
    if not lora_name:
        return "", ""
    ref = lora_name.split(":", 1)[1] if ":" in lora_name else lora_name
    name, _, version = ref.partition("@")
    return name, version


@dataclass
class Answer:
    """One finished answer's signals. entropy: mean top-k entropy per generated token (None without tokens or
    without log-probs)."""

    adapter: str
    version: str
    entropy: float | None
    tokens: int
    finish_reason: str
    empty: bool
    refusal: bool

    def row(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Tally:
    """What one choice (output index) of a request has produced so far."""

    __slots__ = ("entropy_sum", "positions", "tokens", "head", "finish", "seen")

    def __init__(self) -> None:
        self.entropy_sum, self.positions, self.tokens, self.head, self.finish, self.seen = 0.0, 0, 0, "", None, 0

    def add_positions(self, logprobs: Any, k: int) -> None:
        """Positions of vLLM sample log-probs (a list of {token_id: Logprob} or a FlatLogprobs)."""
        if hasattr(logprobs, "start_indices"):  # FlatLogprobs: flat lists, no Logprob objects
            total, n = flat_entropy(logprobs, k)
            self.entropy_sum += total
            self.positions += n
            return
        for pos in logprobs:
            if pos:
                self.entropy_sum += topk_entropy(lp.logprob for lp in pos.values() if (lp.rank or 0) <= k)
                self.positions += 1

    def answer(self, adapter: str, version: str, finish: str | None) -> Answer:
        return Answer(adapter, version, self.entropy_sum / self.positions if self.positions else None, self.tokens,
                      finish or self.finish or "abort", is_empty(self.head), is_refusal(self.head))


def flat_entropy(flat: Any, k: int) -> tuple[float, int]:
    """(sum of the top-k entropies, positions) of a FlatLogprobs asked for exactly k log-probs: each position holds
    the sampled token, then ranks 1..k in order (vLLM's layout), so the top k are its last k entries. Vectorised
    over the positions (numpy) when there are several, as a whole answer's are."""
    starts, ends, lps = flat.start_indices, flat.end_indices, flat.logprobs
    n = len(starts)
    if not n:
        return 0.0, 0
    if n > 4 and all(e - b == k + 1 for b, e in zip(starts, ends)) and ends[-1] - starts[0] == n * (k + 1):
        import numpy as np

        a = np.asarray(lps[starts[0]:ends[-1]], dtype=np.float64).reshape(n, k + 1)[:, 1:]
        a = a - a.max(axis=1, keepdims=True)
        w = np.exp(a)
        z = w.sum(axis=1)
        return float(np.maximum(np.log(z) - (w * a).sum(axis=1) / z, 0.0).sum()), n
    total = 0.0
    for b, e in zip(starts, ends):
        total += topk_entropy(lps[b + 1:e] if e - b == k + 1 else
                              [lps[i] for i in range(b, e) if (flat.ranks[i] or 0) <= k])
    return total, n


def cut_logprobs(logprobs: Any, asked: int) -> list[dict]:
    """Each position as vLLM builds it for `asked` log-probs: the sampled token first, then ranks 1..asked."""
    positions = (logprobs[i] for i in range(len(logprobs)))
    return [None if pos is None else
            {t: lp for i, (t, lp) in enumerate(pos.items()) if i == 0 or (lp.rank or 0) <= asked} for pos in positions]


def _install_logprobs_without_tokenizer() -> bool:
    """vLLM decodes each of the k candidate tokens of every position (the costly part of log-probs); requests
    marked with MARK get a LogprobsProcessor without a tokenizer instead. False when vLLM's internals moved (then
    the signals still work, only slower)."""
    try:
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:
        return False
    original = LogprobsProcessor.__dict__.get("from_new_request")
    if original is None or getattr(original, "_loraforge", False):
        return original is not None

    def from_new_request(cls: Any, tokenizer: Any, request: Any) -> Any:
        extra = getattr(getattr(request, "sampling_params", None), "extra_args", None) or {}
        return original.__func__(cls, None if extra.get(MARK) else tokenizer, request)

    from_new_request._loraforge = True  # type: ignore[attr-defined]
    LogprobsProcessor.from_new_request = classmethod(from_new_request)
    return True


def entropy_sampled(request_id: str, rate: float) -> bool:
    """Whether a request's entropy is measured (serve.signals.sample_rate): a hash of vLLM's request id, uniform
    in [0, 1), below the rate; the same id gets the same decision on every replica."""
    return rate >= 1 or (rate > 0 and bucket("signals", str(request_id)) < rate)


def instrument(engine: Any, k: int, on_answer: Callable[[Answer], None], sample_rate: float = 1.0) -> None:
    """Wrap `engine.generate` (a vLLM AsyncLLM, shared by every OpenAI serving object of the replica) so that each
    finished choice calls `on_answer` with its signals. k: top-k log-probs per token (0: entropy off); sample_rate:
    the share of requests whose entropy is measured (the others ask the engine for nothing extra; their length,
    finish reason, empty and refusal are still recorded, with entropy None)."""
    _install_logprobs_without_tokenizer()
    original = engine.generate
    from vllm.sampling_params import RequestOutputKind

    async def generate(prompt: Any, sampling_params: Any, request_id: str, *args: Any,
                       **kwargs: Any) -> AsyncGenerator[Any, None]:
        lora = kwargs.get("lora_request")
        adapter, version = labels(getattr(lora, "lora_name", None))
        asked = sampling_params.logprobs
        params = sampling_params
        measure = k > 0 and entropy_sampled(request_id, sample_rate) and \
            not getattr(sampling_params, "logprob_token_ids", None)
        if measure and (asked is None or asked < k):
            params = copy.copy(sampling_params)
            params.logprobs = k
            # Ours only: flat (no Logprob objects), not decoded, dropped below -- unless prompt log-probs were asked
            # for, which share both settings (a flat container has no None first position, and no tokenizer no text).
            if asked is None and sampling_params.prompt_logprobs is None:
                params.flat_logprobs = True
                params.extra_args = {**(sampling_params.extra_args or {}), MARK: True}
        cumulative = params.output_kind == RequestOutputKind.CUMULATIVE
        tallies: dict[int, _Tally] = {}
        failure: str | None = None
        try:
            async for out in original(prompt, params, request_id, *args, **kwargs):
                for o in out.outputs:
                    t = tallies.get(o.index) or tallies.setdefault(o.index, _Tally())
                    lps = o.logprobs
                    if lps is not None and measure:
                        t.add_positions(lps[t.seen:] if cumulative else lps, k)
                        if cumulative:
                            t.seen = len(lps)
                        if asked is None:
                            o.logprobs, o.cumulative_logprob = None, None
                        elif asked < k:
                            o.logprobs = cut_logprobs(lps, asked)
                    if cumulative:
                        t.tokens, t.head = len(o.token_ids), o.text[:HEAD_CHARS]
                    else:
                        t.tokens += len(o.token_ids)
                        if len(t.head) < HEAD_CHARS:
                            t.head += o.text[:HEAD_CHARS - len(t.head)]
                    if o.finish_reason:
                        t.finish = str(o.finish_reason)
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            failure = "abort"
            raise
        except Exception:
            failure = "error"
            raise
        finally:
            for t in tallies.values() or ([_Tally()] if failure else []):
                try:
                    on_answer(t.answer(adapter, version, failure if not t.finish else None))
                except Exception:  # noqa: BLE001 - a metrics failure must never fail a request
                    pass

    engine.generate = generate


class Recorder:
    """An engine replica's sink for answers: Prometheus metrics (serve.metrics.SignalMetrics); the baseline the gate
    stored with each registry version served (gauges, for the alert rules); and the answers of canaried adapters,
    sent in batches to the canary controller (serve.canary) every `flush_s`."""

    def __init__(self, controller: Any = None, watched: Iterable[str] = (), registry: str | None = None,
                 flush_s: float = 0.5):
        self.controller, self.watched, self.registry, self.flush_s = controller, set(watched), registry, flush_s
        self.metrics: Any = None
        self.buffer: list[dict[str, Any]] = []
        self.baselines: dict[tuple[str, str], Any] = {}
        self._task: Any = None

    def __call__(self, answer: Answer) -> None:
        if self.metrics is None:
            self.metrics = SignalMetrics.create()
        self.metrics.record(answer)
        key = (answer.adapter, answer.version)
        if self.registry and answer.version and key not in self.baselines:
            self.baselines[key] = asyncio.get_running_loop().create_task(self._baseline(key))
        if self.controller is not None and answer.adapter in self.watched:
            self.buffer.append(answer.row())
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _baseline(self, key: tuple[str, str]) -> None:
        """Export the version's `serve_baseline` (registry lineage) as gauges, once."""
        try:
            base = await asyncio.to_thread(stored_baseline, self.registry, *key)
            if base:
                self.metrics.set_baseline(key[0], key[1], base)
        except Exception as e:  # noqa: BLE001 - no gauge for this version; serving goes on
            logger.warning("loraforge: baseline of %s@%s not exported (%s)", key[0], key[1], e)

    async def _flush(self) -> None:
        await asyncio.sleep(self.flush_s)
        batch, self.buffer = self.buffer, []
        try:
            await self.controller.observe.remote(batch)
        except Exception as e:  # noqa: BLE001 - the canary loses these answers; serving goes on
            logger.warning("loraforge: %d answers not sent to the canary controller (%s)", len(batch), e)


def stored_baseline(registry: str, name: str, version: str) -> dict[str, Any] | None:
    """The `serve_baseline` the gate stored in version `version` of `name`'s lineage, or None."""
    try:
        info = Registry(registry).show(name)["versions"].get(str(version)) or {}
    except RegistryError:
        return None
    return (info.get("lineage") or {}).get("serve_baseline")
