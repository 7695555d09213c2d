"""LLM-as-judge through any OpenAI-compatible endpoint: a rubric, a reference, an answer -> a 1-10 score.

A weak judge is still a judge with a known bias: on CPU the judge may be our own served small model, whose
scores are noisy and favour long, fluent answers. Report it beside the reference metrics, never alone.
"""

from __future__ import annotations

import os

from pipelines.artifacts.judge import ask_judge, judge_prompt, parse_score  # noqa: F401 - parse_score: the eval API


def judge_scores(cfg, questions: list[str], refs: list[str], preds: list[str]) -> dict[str, float | int]:
    """Judge up to cfg.max_samples rows: {"mean": mean score of the parsed replies (nan if none), "asked",
    "parsed"}. A reply without a score is counted, never guessed."""
    from openai import OpenAI

    client = OpenAI(base_url=cfg.url, api_key=os.environ.get(cfg.api_key_env) or "unused")
    got = []
    for q, r, p in list(zip(questions, refs, preds))[: cfg.max_samples]:
        score, _ = ask_judge(client, cfg.model, judge_prompt(cfg.rubric, q, p, r))
        if score is not None:
            got.append(score)
    asked = min(len(questions), cfg.max_samples)
    return {"mean": sum(got) / len(got) if got else float("nan"), "asked": asked, "parsed": len(got)}


def caveat(info: dict) -> str:
    """What the report says about the judge: who it was, how many replies held a score, how far to trust it."""
    parsed = ", ".join(f"{v}: {n['parsed']}/{n['asked']}" for v, n in info["replies"].items())
    return (f"LLM judge: model {info['model']!r} at {info['url']}; replies holding a 1-10 score: {parsed}. "
            "Treat it as a weak signal: a small judge (e.g. our own served model on CPU) scores noisily and favours "
            "long, fluent answers; read it beside the reference metrics, never alone.")
