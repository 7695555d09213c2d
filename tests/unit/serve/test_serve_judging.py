"""serve/judging.py (sampled judging of live traffic) and the canary's judge check, without Ray or an engine.

    .venv/bin/python -m pytest tests/unit/serve/test_serve_judging.py -q
"""

from __future__ import annotations

import json

import pytest

from pipelines.artifacts.judge import judge_prompt
from serve.canary import RAMPING, ROLLED_BACK, Canary, judge_figures
from serve.config import CanaryConfig, JudgeConfig, ServeConfig
from serve.judging import JudgeStore, Sampler, answer_text, opted_out, request_text, sampled
from serve.monitor import lines, live


def test_sample_is_deterministic_and_near_its_rate():
    keys = [request_text({"prompt": f"question {i}"})[0] for i in range(4000)]
    first = [sampled(k, 0.25) for k in keys]
    assert first == [sampled(k, 0.25) for k in keys]  # the same request, the same decision
    assert 0.22 < sum(first) / len(first) < 0.28
    assert all(sampled(k, 1.0) for k in keys[:50]) and not any(sampled(k, 0.0) for k in keys[:50])
    assert all(sampled(k, 0.5) for k, s in zip(keys, first) if s)  # a lower rate samples a subset of a higher one


def test_request_text_keys_questions_and_what_is_not_judged():
    chat = {"messages": [{"role": "user", "content": "Capital of France?"}]}
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}]}
    assert request_text(chat) == request_text(parts)  # the same text, the same key and question
    assert request_text(chat)[1] == "Capital of France?"
    multi = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    assert request_text(multi)[1] == "system: Be brief.\nuser: Hi"
    assert request_text({"prompt": "The sky is"})[1] == "The sky is"
    assert request_text({"prompt": ["The sky is"]}) == request_text({"prompt": "The sky is"})
    assert request_text({"prompt": [1, 2, 3]}) is None and request_text({"prompt": ["a", "b"]}) is None
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert request_text(image) is None
    assert request_text({"prompt": "a"})[0] != request_text({"messages": [{"role": "user", "content": "a"}]})[0]


def test_sampler_rates_per_adapter_and_the_opt_out_header():
    cfg = ServeConfig(judge={"store": "/tmp/unused", "sample_rate": 0.0, "rates": {"city": 1.0, "base": 1.0}})
    s = Sampler(cfg, handle=None)
    body = {"prompt": "Where is the meetup?"}
    row = s.sample(body, "city", "4", {})
    assert row["adapter"] == "city" and row["version"] == "4" and row["question"] == "Where is the meetup?"
    assert s.sample(body, "other", "1", {}) is None  # sample_rate 0 for adapters without a rate
    assert s.sample(body, "", "", {}) is not None  # the base, by its alias
    for value in ("off", "OFF", "0", "false", "no"):
        assert opted_out({"x-loraforge-judge": value}) and s.sample(body, "city", "4",
                                                                     {"x-loraforge-judge": value}) is None
    assert not opted_out({"x-loraforge-judge": "on"}) and not opted_out(None)
    assert s.sample(object(), "city", "4", {}) is None  # a shape not foreseen: not sampled, no error
    off = Sampler(ServeConfig(judge={"store": "/tmp/unused", "rates": {"city": 1.0}, "enabled": False}), None)
    assert not off.cfg.judge.active()


def test_answer_text_of_completions_and_chat():
    assert answer_text({"choices": [{"text": "Paris"}, {"text": "Lyon"}]}) == "Paris"
    assert answer_text({"choices": [{"message": {"role": "assistant", "content": "Paris"}}]}) == "Paris"
    assert answer_text({"choices": [{"message": {"role": "assistant", "content": None}}]}) == ""
    assert answer_text({"choices": []}) is None


def test_store_retention_drops_the_oldest_rows_and_old_ones(tmp_path):
    now = [1000.0]
    store = JudgeStore(tmp_path / "j", max_rows=5, max_age_h=1.0, clock=lambda: now[0])
    store.append([{"ts": 1000.0 + i, "n": i} for i in range(4)])
    store.append([{"ts": 1010.0 + i, "n": 10 + i} for i in range(3)])  # 7 rows > 5: compacted
    assert [r["n"] for r in store.rows()] == [2, 3, 10, 11, 12]
    now[0] = 1000.0 + 3600 + 5  # rows 2, 3 (ts 1002, 1003) are now older than an hour
    store.append([{"ts": now[0], "n": 99}])
    assert [r["n"] for r in store.rows()] == [10, 11, 12, 99]
    with (tmp_path / "j" / "judged.jsonl").open("a") as f:
        f.write('{"ts": 1, "cut by a cr')  # a torn last line is skipped, never fatal
    again = JudgeStore(tmp_path / "j", max_rows=5, max_age_h=None)
    assert [r["n"] for r in again.rows()] == [10, 11, 12, 99]
    kept = JudgeStore(tmp_path / "k", max_rows=3, max_age_h=None)
    kept.append([{"ts": float(i), "n": i} for i in range(3)])
    assert len(kept.rows()) == 3  # at the limit: kept as written


def test_judge_prompt_is_the_evaluation_one_without_a_reference():
    with_ref = judge_prompt("R", "Q", "A", "REF")
    assert with_ref == "R\n\nQuestion:\nQ\n\nReference answer:\nREF\n\nAnswer to score:\nA\n\nScore:"
    assert judge_prompt("R", "Q", "A") == "R\n\nQuestion:\nQ\n\nAnswer to score:\nA\n\nScore:"
    assert "reference" not in JudgeConfig().rubric.lower()


CANARY = CanaryConfig(incumbent=1, candidate=2, steps=[50, 100], step_window_s=10, min_answers=4, min_judged=5,
                      max_judge_drop=1.0, max_entropy_increase=0.5)


def _answer(version: int, entropy: float | None = 1.0) -> dict:
    return {"adapter": "city", "version": str(version), "entropy": entropy, "tokens": 8, "finish_reason": "stop",
            "empty": False, "refusal": False}


def test_judge_figures_breach_only_with_enough_samples():
    few = judge_figures([2.0] * 4, [9.0] * 10, CANARY)
    assert not few["counts"] and few["breach"] is None and "does not block" in few["note"]
    worse = judge_figures([2.0, 3.0, 2.0, 3.0, 2.0], [8.0, 9.0, 8.0, 9.0, 8.0], CANARY)
    assert worse["counts"] and "judge score 2.40 vs incumbent 8.40" in worse["breach"]
    close = judge_figures([7.0, 8.0, 7.0, 8.0, 7.0], [8.0, 8.0, 7.0, 8.0, 8.0], CANARY)
    assert close["counts"] and close["breach"] is None  # 0.4 below: within max_judge_drop
    noisy = judge_figures([1.0, 10.0, 1.0, 10.0, 2.0], [10.0, 1.0, 10.0, 9.0, 10.0], CANARY)
    assert noisy["breach"] is None  # 3.2 points below, but within 3 standard errors (2.8 each)
    unset = judge_figures([1.0] * 9, [10.0] * 9, CANARY.model_copy(update={"max_judge_drop": None}))
    assert not unset["counts"] and unset["breach"] is None


def test_canary_rolls_back_on_judge_scores_and_records_them():
    clock = [0.0]
    c = Canary("city", CANARY, clock=lambda: clock[0])
    c.start(True)
    for _ in range(4):
        c.observe(_answer(1))
        c.observe(_answer(2))
    for s in (2.0, 3.0, 2.0, 3.0):
        c.observe_judged({"version": "2", "score": s})
        c.observe_judged({"version": "1", "score": 9.0})
    assert c.decide() is None and c.state == RAMPING  # 4 judged a side: the judge does not block, the window runs
    c.observe_judged({"version": "2", "score": 2.0})
    c.observe_judged({"version": "1", "score": 8.0})
    c.observe_judged({"version": "3", "score": 1.0})  # another version: ignored
    d = c.decide()
    assert d.action == "canary_rollback" and c.state == ROLLED_BACK and "judge score" in d.reasons[0]
    assert d.figures["judge"]["candidate"] == {"judged": 5, "mean": 2.4, "sd": 0.548}
    assert d.figures["judge"]["incumbent"]["judged"] == 5 and d.figures["judge"]["counts"]


def test_canary_waits_for_sampled_entropy_but_not_when_entropy_is_off():
    """serve.signals.sample_rate measures a sample: a step needs min_answers answers WITH an entropy a side."""
    clock = [0.0]
    c = Canary("city", CANARY, clock=lambda: clock[0])
    c.start(True)
    for i in range(12):  # 12 answers a side, 3 of them with an entropy (a 25% sample)
        c.observe(_answer(1, 1.0 if i % 4 == 0 else None))
        c.observe(_answer(2, 3.0 if i % 4 == 0 else None))
    clock[0] = 11.0
    assert c.decide() is None  # the window passed, but 3 < min_answers entropies: waiting, no step, no breach
    c.observe(_answer(1, 1.0))
    c.observe(_answer(2, 3.0))
    d = c.decide()
    assert d.action == "canary_rollback" and "entropy" in d.reasons[0]
    off = Canary("city", CANARY, clock=lambda: clock[0], entropy=False)
    off.start(True)
    for _ in range(4):
        off.observe(_answer(1, None))
        off.observe(_answer(2, None))
    clock[0] = 30.0
    assert off.decide().action == "canary_step"  # no entropy measured at all: the step does not wait for one


def export() -> str:
    lab = 'adapter="city",version="4"'
    return "\n".join([
        "# TYPE ray_loraforge_answers_total counter", f'ray_loraforge_answers_total{{{lab},finish_reason="stop"}} 20',
        "# TYPE ray_loraforge_judged_total counter", f'ray_loraforge_judged_total{{{lab},outcome="scored"}} 6',
        f'ray_loraforge_judged_total{{{lab},outcome="error"}} 2',
        f'ray_loraforge_judged_total{{{lab},outcome="no_score"}} 1',
        "# TYPE ray_loraforge_judge_score histogram", f'ray_loraforge_judge_score_bucket{{{lab},le="+Inf"}} 6',
        f"ray_loraforge_judge_score_count{{{lab}}} 6", f"ray_loraforge_judge_score_sum{{{lab}}} 42",
        "# TYPE ray_loraforge_judge_score_points_total counter",
        f"ray_loraforge_judge_score_points_total{{{lab}}} 45"]) + "\n"


def test_monitor_reads_judge_scores_per_version():
    figs = live(export())[("city", "4")]
    assert figs["judged"] == 6 and figs["judge_mean"] == pytest.approx(7.5) and figs["judge_failed"] == 2
    assert figs["judge_no_score"] == 1
    rep = {"versions": [{"adapter": "city", "version": "4", **figs, "band": None, "judgement": "no baseline",
                         "reasons": []}], "canaries": []}
    assert "7.50 (6, 2)" in lines(rep)[1]
    json.dumps(rep)
