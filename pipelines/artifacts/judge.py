"""The LLM judge's prompt and score parsing, defined once: the evaluation stage's judge (pipelines.eval.judge, a
reference answer beside each answer) and the sampled judging of live traffic (serve.judging, no reference) ask the
same way and read the same score. Pure apart from the OpenAI client `ask_judge` is given.
"""

from __future__ import annotations

import re

_SCORE = re.compile(r"\b(10|[1-9])\b")


def parse_score(text: str) -> float | None:
    """The first integer 1-10 in the judge's reply, or None."""
    m = _SCORE.search(text or "")
    return float(m.group(1)) if m else None


def judge_prompt(rubric: str, question: str, answer: str, reference: str | None = None) -> str:
    """What the judge is asked: the rubric, the question, the reference answer (left out when there is none, as
    for live traffic) and the answer to score."""
    ref = "" if reference is None else f"Reference answer:\n{reference}\n\n"
    return f"{rubric}\n\nQuestion:\n{question}\n\n{ref}Answer to score:\n{answer}\n\nScore:"


SCORES = [str(i) for i in range(1, 11)]  # the replies a constrained judge may give


def ask_judge(client, model: str, content: str, constrained: bool = False) -> tuple[float | None, str]:
    """One judge call through an OpenAI client, greedy and short: (the parsed 1-10 score or None, the reply).
    constrained: the reply is one of 1..10 (vLLM's structured outputs, `structured_outputs.choice`; other
    OpenAI-compatible servers may refuse the field), so even a small judge answers with a score."""
    extra = {"extra_body": {"structured_outputs": {"choice": SCORES}}} if constrained else {}
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                           temperature=0, max_tokens=8, **extra)
    text = reply.choices[0].message.content or ""
    return parse_score(text), text
