"""Pure data helpers of the evaluate stage: test rows, few-shot prompts, MMLU items, general text. No Ray."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.data.readers import read_conversations
from pipelines.schema import DataError, MissingInput

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
    """Test rows from any row format and file type the data stage reads (pipelines.data.readers): Alpaca
    JSONL, TRL prompt/completion, messages, preference pairs (prompt + chosen), JSON arrays, Parquet (the curated
    split folder curate writes, e.g. `runs/x/data/curated/test`), compressed files; a folder or glob. Each row is
    {"context": the turns before the last answer, "output": that answer, "source", "line"}. A row that cannot be
    evaluated (broken, no final assistant answer, raw text) is refused with its reason, not dropped; no usable row
    at all is a DataError naming the data and the first reasons."""
    found, rejected = read_conversations(path, answer_last=True)
    got = RowsRead(path, [{"context": c.messages[:-1], "output": c.messages[-1]["content"].strip(),
                           "source": c.source, "line": c.line} for c in found], rejected)
    if not got.rows:
        first = "; ".join(f"{Path(r['source']).name} line {r['line']}: {r['reason']} ({r['detail']})"
                          for r in got.rejected[:3])
        raise DataError(f"{path}: no usable row (a prompt and its answer) among {len(got.rejected)}"
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
    """The question of a test row: its last user turn."""
    return next(m["content"] for m in reversed(row["context"]) if m["role"] == "user").strip()


def _turns(row: dict) -> list[dict[str, str]]:
    return [m for m in row["context"] if m["role"] != "system"]


def few_shot_messages(row: dict, shots: list[dict], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation for one test row: its own system turn (else `system_prompt`), k solved examples as
    earlier turns, then the row's turns up to its answer."""
    own = [m for m in row["context"][:1] if m["role"] == "system"]
    msgs = own or ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    for s in shots:
        msgs += _turns(s) + [{"role": "assistant", "content": s["output"]}]
    return msgs + _turns(row)


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text the chat template makes, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def mmlu_items(folder: str, subjects: list[str], per_subject: int) -> list[tuple[str, int]]:
    """(zero-shot prompt ending in 'Answer:', correct index 0-3) from <folder>/test/<subject>_test.csv (rows:
    question, four choices, the answer as A-D or 0-3). A missing file is MissingInput, a malformed row DataError,
    each naming eval.mmlu_dir / eval.mmlu_subjects."""
    items = []
    for subject in subjects:
        path = Path(folder) / "test" / f"{subject}_test.csv"
        if not path.is_file():
            raise MissingInput(f"eval.mmlu_dir={folder!r}: no {path} for subject {subject!r}; point eval.mmlu_dir at "
                               "an MMLU folder with test/<subject>_test.csv, or drop the subject from "
                               "eval.mmlu_subjects")
        with open(path, newline="") as fh:
            rows = [r for r in csv.reader(fh) if r and r[0] != "question"]
        for line, r in enumerate(rows[:per_subject], 1):
            answer = r[5].strip() if len(r) >= 6 else ""
            if not (answer in ("0", "1", "2", "3") or answer in ("A", "B", "C", "D")):
                raise DataError(f"{path}: row {line} is not question, four choices, answer (A-D or 0-3): {r[:6]!r}; "
                                "fix the file or drop the subject from eval.mmlu_subjects")
            q, choices = r[0], r[1:5]
            answer_idx = int(answer) if answer.isdigit() else "ABCD".index(answer)
            body = "\n".join(f"{letter}. {c}" for letter, c in zip("ABCD", choices))
            topic = subject.replace("_", " ")
            items.append((f"The following is a multiple choice question about {topic}.\n\n{q}\n{body}\nAnswer:",
                          answer_idx))
    return items


def general_texts(path: str, field: str, limit: int) -> list[str]:
    """Held-out general passages: a .txt (one per line) or JSON/JSONL rows with `field`. A missing file is
    MissingInput, unparsable JSON or no passage at all DataError, each naming eval.general_text_path."""
    p = Path(path)
    if not p.is_file():
        raise MissingInput(f"eval.general_text_path={path!r}: no such file; give a .txt (a passage per line) or "
                           "JSON/JSONL rows, or unset it to skip the general-text check")
    text = p.read_text()
    if p.suffix == ".txt":
        texts = [x.strip() for x in text.splitlines() if x.strip()]
    else:
        try:
            rows = json.loads(text) if text.lstrip().startswith("[") else \
                [json.loads(x) for x in text.splitlines() if x.strip()]
        except ValueError as e:
            raise DataError(f"eval.general_text_path={path!r}: not JSON or JSONL ({e}); give a .txt (a passage per "
                            "line) or JSON/JSONL rows") from None
        texts = [str(r.get(field) or "").strip() for r in rows if isinstance(r, dict)]
    texts = [t for t in texts if t][:limit]
    if not texts:
        raise DataError(f"eval.general_text_path={path!r}: no passage (no non-empty line, or no row with "
                        f"eval.general_text_field={field!r}); point it at text, or unset it")
    return texts
