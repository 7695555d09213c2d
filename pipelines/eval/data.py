"""Pure data helpers of the evaluate stage: test rows, few-shot prompts, MMLU items, general text. No Ray."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def load_rows(path: str) -> list[dict[str, Any]]:
    """Alpaca-style rows from JSONL or a JSON list; rows without instruction/output are skipped."""
    text = Path(path).read_text()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    return [r for r in rows if isinstance(r, dict) and str(r.get("instruction") or "").strip()
            and str(r.get("output") or "").strip()]


def split_shots(rows: list[dict], cfg, pool: list[dict] | None = None) -> tuple[list[dict], list[dict]]:
    """(few-shot examples, test rows): the first k of `pool`, or of the test rows (which then leave the test)."""
    k = cfg.few_shot_k
    if pool is not None:
        return pool[:k], rows
    return rows[:k], rows[k:]


def user_text(row: dict) -> str:
    extra = str(row.get("input") or "").strip()
    return row["instruction"].strip() + ("\n\n" + extra if extra else "")


def few_shot_messages(row: dict, shots: list[dict], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation for one test row: k solved examples as earlier turns, then the question."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for s in shots:
        msgs += [{"role": "user", "content": user_text(s)}, {"role": "assistant", "content": s["output"].strip()}]
    return msgs + [{"role": "user", "content": user_text(row)}]


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text the chat template makes, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def mmlu_items(folder: str, subjects: list[str], per_subject: int) -> list[tuple[str, int]]:
    """(zero-shot prompt ending in 'Answer:', correct index 0-3) from <folder>/test/<subject>_test.csv."""
    items = []
    for subject in subjects:
        path = Path(folder) / "test" / f"{subject}_test.csv"
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            rows = [r for r in reader if r and r[0] != "question"]
        for r in rows[:per_subject]:
            q, choices, answer = r[0], r[1:5], r[5]
            answer_idx = int(answer) if answer.strip().isdigit() else "ABCD".index(answer.strip())
            body = "\n".join(f"{letter}. {c}" for letter, c in zip("ABCD", choices))
            topic = subject.replace("_", " ")
            items.append((f"The following is a multiple choice question about {topic}.\n\n{q}\n{body}\nAnswer:",
                          answer_idx))
    return items


def general_texts(path: str, field: str, limit: int) -> list[str]:
    """Held-out general passages: a .txt (one per line) or JSON/JSONL rows with `field`."""
    p = Path(path)
    if p.suffix == ".txt":
        texts = [x.strip() for x in p.read_text().splitlines() if x.strip()]
    else:
        text = p.read_text()
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
        texts = [str(r.get(field) or "").strip() for r in rows if isinstance(r, dict)]
    return [t for t in texts if t][:limit]
