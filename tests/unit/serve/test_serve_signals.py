"""serve/signals.py (per-answer quality signals) and serve/canary.py's policy, without Ray or an engine.

    .venv/bin/python -m pytest tests/unit/serve/test_serve_signals.py -q
"""

from __future__ import annotations

import math

import pytest

from pipelines.artifacts.signals import band, baseline, figures, is_refusal, topk_entropy
from serve.canary import PROMOTED, ROLLED_BACK, WAITING, Canary, breaches, public_splits
from serve.config import CanaryConfig, ServeConfig
from serve.routing import choose
from serve.signals import _Tally, cut_logprobs, labels


class Lp:  # the shape of vllm.logprobs.Logprob (logprob, rank)
    def __init__(self, logprob: float, rank: int):
        self.logprob, self.rank = logprob, rank


def test_topk_entropy_is_the_renormalised_entropy():
    assert topk_entropy([0.0]) == 0.0  # a certain token
    assert topk_entropy([]) == 0.0
    assert math.isclose(topk_entropy([math.log(0.01)] * 20), math.log(20))  # k equal candidates: log k
    p = [0.5, 0.3, 0.1]  # not summing to 1: renormalised over the top k
    q = [x / sum(p) for x in p]
    assert math.isclose(topk_entropy(map(math.log, p)), -sum(x * math.log(x) for x in q))
    assert topk_entropy([0.0, -math.inf]) == 0.0


def test_refusal_labels_and_empty():
    assert is_refusal("I'm sorry, but I can't help with that") and is_refusal("  I cannot do this.")
    assert is_refusal("As an AI, I") and not is_refusal("Paris is the capital") and not is_refusal("")
    assert labels("base:city@4") == ("city", "4") and labels("base:alpha") == ("alpha", "")
    assert labels(None) == ("", "")
    t = _Tally()
    t.head = "  \n"
    a = t.answer("city", "4", None)
    assert a.empty and a.finish_reason == "abort" and a.entropy is None


def test_cut_logprobs_is_what_vllm_returns_for_fewer():
    """Asked for 2 while the engine computed 5: the sampled token first, then ranks 1..2, nothing else."""
    pos = {7: Lp(-3.0, 4), 1: Lp(-0.5, 1), 2: Lp(-1.0, 2), 3: Lp(-2.0, 3), 5: Lp(-2.5, 5)}  # sampled rank 4
    cut = cut_logprobs([pos, None], 2)
    assert list(cut[0]) == [7, 1, 2] and cut[1] is None
    top1 = {1: Lp(-0.5, 1), 2: Lp(-1.0, 2), 3: Lp(-2.0, 3)}  # greedy: sampled = rank 1, one key
    assert list(cut_logprobs([top1], 0)[0]) == [1]


def test_tally_uses_the_top_k_only():
    t = _Tally()
    pos = {9: Lp(-9.0, 30), 1: Lp(math.log(0.5), 1), 2: Lp(math.log(0.5), 2)}  # the sampled token ranks 30th
    t.add_positions([pos, pos], k=2)
    assert t.positions == 2 and math.isclose(t.entropy_sum / 2, math.log(2))


def rows(version: int, n: int, entropy: float, finish: str = "stop") -> list[dict]:
    return [{"adapter": "city", "version": str(version), "entropy": entropy + 0.01 * (i % 3), "finish_reason": finish,
             "empty": False, "refusal": False} for i in range(n)]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


CFG = CanaryConfig(incumbent=3, candidate=4, steps=[10, 50, 100], step_window_s=10, min_answers=5)


def test_canary_ramps_step_by_step_while_the_candidate_holds():
    clock = Clock()
    c = Canary("city", CFG, clock)
    assert c.state == WAITING and c.weights() == {"city@3": 100.0}
    assert c.start(ready=False) is None
    assert c.start(ready=True).action == "canary_start" and c.weights() == {"city@3": 90.0, "city@4": 10.0}
    seen = []
    for _ in range(3):
        for r in rows(3, 6, 1.0) + rows(4, 6, 1.05):
            c.observe(r)
        assert c.decide() is None  # the window has not passed
        clock.t += 11
        d = c.decide()
        seen.append((d.action, d.percent))
        assert d.figures["candidate"]["answers"] == 6 and not d.reasons
    assert seen == [("canary_step", 50.0), ("canary_step", 100.0), ("canary_promote", 100.0)]
    assert c.state == PROMOTED and c.weights() == {"city@4": 100.0}


def test_canary_rolls_back_on_an_entropy_breach_before_the_window_ends():
    c = Canary("city", CFG, Clock())
    c.start(ready=True)
    for r in rows(3, 6, 1.0) + rows(4, 4, 2.9):
        c.observe(r)
    assert c.decide() is None  # too few candidate answers to judge
    for r in rows(4, 2, 2.9):
        c.observe(r)
    d = c.decide()
    assert d.action == "canary_rollback" and d.percent == 0 and c.state == ROLLED_BACK
    assert "entropy" in d.reasons[0] and d.figures["candidate"]["entropy_mean"] > 2.8
    assert c.weights() == {"city@3": 100.0}
    c.observe(rows(4, 1, 0.0)[0])  # answers after the rollback change nothing
    assert c.decide() is None and c.served["candidate"] == 6


def test_breach_rules_rates_errors_and_noise():
    inc = figures(rows(3, 20, 1.0))
    assert breaches(figures(rows(4, 20, 1.1)), inc, CFG) == []  # within max_entropy_increase
    assert "length rate" in breaches(figures(rows(4, 20, 1.0, "length")), inc, CFG)[0]
    assert "error rate" in breaches(figures(rows(4, 19, 1.0) + rows(4, 1, 1.0, "error") * 2), inc, CFG)[-1]
    noisy = [{"entropy": e, "finish_reason": "stop"} for e in (0.0, 3.0, 0.2, 2.9, 1.5)]  # big mean shift, big SE
    assert breaches(figures(noisy), figures([{"entropy": 1.0}, {"entropy": 1.01}]),
                    CFG.model_copy(update={"max_entropy_increase": 0.1, "z": 3})) == []


def test_split_is_sticky_and_only_grows_for_a_caller():
    c = Canary("city", CFG, Clock())
    c.start(ready=True)
    callers = [f"user:{i}" for i in range(400)]
    before = {u for u in callers if choose("city", c.weights(), u) == "city@4"}
    c.step = 1
    after = {u for u in callers if choose("city", c.weights(), u) == "city@4"}
    assert before < after and 20 <= len(before) <= 60 and 160 <= len(after) <= 240
    assert set(public_splits({"city": c})) == {"city", "city@production"}


def test_canary_config_is_checked():
    with pytest.raises(ValueError, match="increasing"):
        CanaryConfig(incumbent=1, candidate=2, steps=[50, 25, 100])
    with pytest.raises(ValueError, match="both version"):
        CanaryConfig(incumbent=2, candidate=2)
    with pytest.raises(ValueError, match="serve.registry"):
        ServeConfig(canary={"city": {"incumbent": 1, "candidate": 2}})
    with pytest.raises(ValueError, match="top_k"):
        ServeConfig(signals={"top_k": 21})
    with pytest.raises(ValueError, match="alias 'Prod'"):
        CanaryConfig(incumbent=1, candidate=2, alias="Prod")
    with pytest.raises(ValueError, match="not a registry name"):
        ServeConfig(registry="r", canary={"../x": {"incumbent": 1, "candidate": 2}})
    with pytest.raises(ValueError, match="either a split or a canary"):
        ServeConfig(registry="r", canary={"x": {"incumbent": 1, "candidate": 2}}, splits={"x": {"a": 1}})


def test_baseline_and_its_band():
    b = baseline(rows(3, 10, 1.0) + [{"entropy": None, "finish_reason": "length", "empty": True, "tokens": 4}])
    assert b["answers"] == 11 and b["empty_rate"] == round(1 / 11, 4) and b["top_k"] == 20
    assert 1.0 < b["entropy_mean"] < 1.02 and b["entropy_sd"] > 0
    lo, hi = band({"entropy_mean": 1.0, "entropy_sd": 0.5}, 25, z=3)
    assert (lo, hi) == (0.7, 1.3)
    assert band({"entropy_mean": 1.0, "entropy_sd": 0.0}, 25, z=3) == (0.95, 1.05)  # the floor
    assert band({"entropy_mean": 1.0}, 25, z=3) is None


def test_canary_resumes_from_the_audit_log():
    for action, percent, state, weights in (("canary_step", 50.0, "ramping", {"city@3": 50.0, "city@4": 50.0}),
                                            ("canary_rollback", 0.0, ROLLED_BACK, {"city@3": 100.0}),
                                            ("canary_promote", 100.0, PROMOTED, {"city@4": 100.0})):
        c = Canary("city", CFG, Clock())
        c.resume(action, percent)
        assert c.state == state and c.weights() == weights


def test_flat_entropy_vectorised_equals_the_rule():
    """vLLM's flat log-prob layout (sampled token, then ranks 1..k per position): the vectorised sum over a whole
    answer and the one-position path both equal topk_entropy of each position's top k."""
    import random

    from vllm.logprobs import FlatLogprobs

    from serve.signals import flat_entropy

    rng, flat, k = random.Random(0), FlatLogprobs(), 5
    for _ in range(9):
        top = sorted((rng.gauss(-3, 1) for _ in range(k)), reverse=True)
        flat.append_fast(list(range(k + 1)), [rng.gauss(-9, 1), *top], iter([40, *range(1, k + 1)]), [None] * (k + 1))
    expected = [topk_entropy(flat.logprobs[b + 1:e]) for b, e in zip(flat.start_indices, flat.end_indices)]
    total, n = flat_entropy(flat, k)
    assert n == 9 and math.isclose(total, sum(expected), rel_tol=1e-9)
    assert math.isclose(flat_entropy(flat[2:3], k)[0], expected[2], rel_tol=1e-9)
