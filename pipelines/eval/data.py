"""Pure data helpers of the evaluate stage: test rows, few-shot prompts, MMLU items, general text. No Ray."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.data.rowformats import RowError, alpaca_to_messages, parse_raw
from pipelines.schema import DataError

log = logging.getLogger(__name__)


@dataclass
class RowsRead:
    """What one row file gave: the usable rows and every refused one with its reason (rows_in = kept + rejected)."""

    path: str
    rows: list[dict[str, Any]]
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {"line" or "row", "reason", "detail", "record"}

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(r["reason"] for r in self.rejected).items()))

    def counts(self) -> dict[str, Any]:
        """rows_in / rows_kept / rows_rejected / rejected_by_reason, as the other stages report them."""
        return {"path": self.path, "rows_in": len(self.rows) + len(self.rejected), "rows_kept": len(self.rows),
                "rows_rejected": len(self.rejected), "rejected_by_reason": self.by_reason}


def read_rows(path: str) -> RowsRead:
    """Alpaca-style rows from JSONL or a JSON list. A row that cannot be evaluated (broken JSON, not an object,
    instruction/output missing, not strings or empty) is refused with a RowError reason, not dropped; a file
    with no usable row at all is a DataError naming the file and the first reasons."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        try:
            items = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        where = "row"
    else:
        items = [(i, line) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
        where = "line"
    got = RowsRead(path, [])
    for n, item in items:
        try:
            if where == "line":  # a JSONL line, still text: the same parse (and reasons) as curation's
                item = parse_raw(item)
            elif not isinstance(item, dict):
                raise RowError("not_an_object", f"a JSON {type(item).__name__}, expected an object")
            alpaca_to_messages(item)  # the checks curation makes on an Alpaca row
        except RowError as e:
            got.rejected.append({where: n, "reason": e.reason, "detail": e.detail, "record": item})
            continue
        got.rows.append(item)
    if not got.rows:
        first = "; ".join(f"{where} {r[where]}: {r['reason']} ({r['detail']})" for r in got.rejected[:3])
        raise DataError(f"{path}: no usable row (instruction + output) among {len(got.rejected)}"
                        + (f": {first}" if first else ""))
    return got


def load_rows(path: str) -> list[dict[str, Any]]:
    """The usable rows of `read_rows(path)`; the refused ones are logged with their count by reason (callers that
    report on their data use read_rows, which keeps them)."""
    got = read_rows(path)
    if got.rejected:
        log.warning("%s: %d of %d rows refused %s", path, len(got.rejected), len(got.rejected) + len(got.rows),
                    got.by_reason)
    return got.rows


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
