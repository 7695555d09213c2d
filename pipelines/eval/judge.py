"""LLM-as-judge through any OpenAI-compatible endpoint: a rubric, a reference, an answer -> a 1-10 score.

A weak judge is still a judge with a known bias: on CPU the judge may be our own served small model, whose
scores are noisy and favour long, fluent answers. Report it beside the reference metrics, never alone.
"""

from __future__ import annotations

import os
import re

_SCORE = re.compile(r"\b(10|[1-9])\b")


def parse_score(text: str) -> float | None:
    """The first integer 1-10 in the judge's reply, or None."""
    m = _SCORE.search(text or "")
    return float(m.group(1)) if m else None


def judge_scores(cfg, questions: list[str], refs: list[str], preds: list[str]) -> dict[str, float | int]:
    """Judge up to cfg.max_samples rows: {"mean": mean score of the parsed replies (nan if none), "asked",
    "parsed"}. A reply without a score is counted, never guessed."""
    from openai import OpenAI

    client = OpenAI(base_url=cfg.url, api_key=os.environ.get(cfg.api_key_env) or "unused")
    got = []
    for q, r, p in list(zip(questions, refs, preds))[: cfg.max_samples]:
        content = f"{cfg.rubric}\n\nQuestion:\n{q}\n\nReference answer:\n{r}\n\nAnswer to score:\n{p}\n\nScore:"
        reply = client.chat.completions.create(model=cfg.model, messages=[{"role": "user", "content": content}],
                                               temperature=0, max_tokens=8)
        score = parse_score(reply.choices[0].message.content or "")
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
