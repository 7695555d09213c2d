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


def judge_scores(cfg, questions: list[str], refs: list[str], preds: list[str]) -> float:
    """Mean judge score over up to cfg.max_samples rows (unparseable replies are skipped); nan if none parsed."""
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
    return sum(got) / len(got) if got else float("nan")
