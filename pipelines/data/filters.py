"""Normalisation and quality filters on normalised records. Pure: no Ray, no torch.

Normalisation keeps meaning and layout (code indentation survives): Unicode NFC, CRLF → LF, exotic spaces →
space, zero-width characters removed, trailing spaces per line stripped, 3+ blank lines → 2, ends trimmed.
The de-duplication key is stricter (case-folded, all whitespace collapsed), so re-spaced copies still collide.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

from pipelines.data.config import FilterSection
from pipelines.data.rowformats import RowError

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000\t]+")
_TRAILING = re.compile(r"[ ]+\n")
_BLANKS = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+", re.UNICODE)


def normalise_text(s: str) -> str:
    s = unicodedata.normalize("NFC", s).replace("\r\n", "\n").replace("\r", "\n").translate(_ZERO_WIDTH)
    s = _SPACES.sub(" ", s)
    return _BLANKS.sub("\n\n", _TRAILING.sub("\n", s)).strip()


def normalise_record(kind: str, rec: dict[str, Any]) -> dict[str, Any]:
    """The same record with every text normalised; a turn that normalises to nothing is an empty_turn."""
    def norm(s: str, where: str) -> str:
        out = normalise_text(s)
        if not out:
            raise RowError("empty_turn", f"{where} is empty after normalisation")
        return out

    if kind == "text":
        return {"text": norm(rec["text"], "text")}
    if kind == "sft":
        return {"messages": [{"role": m["role"], "content": norm(m["content"], m["role"])} for m in rec["messages"]]}
    prompt = [{"role": m["role"], "content": norm(m["content"], m["role"])} for m in rec["prompt"]]
    if kind == "unpaired":
        return {"prompt": prompt, "completion": norm(rec["completion"], "completion"), "label": bool(rec["label"])}
    return {"prompt": prompt, "chosen": norm(rec["chosen"], "chosen"), "rejected": norm(rec["rejected"], "rejected")}


def answer_of(kind: str, rec: dict[str, Any]) -> str:
    """What the model learns to say: the last assistant turn, the chosen answer, or the raw text."""
    if kind == "sft":
        return next(m["content"] for m in reversed(rec["messages"]) if m["role"] == "assistant")
    if kind == "unpaired":
        return rec["completion"]
    return rec["chosen"] if kind == "preference" else rec["text"]


def full_text(kind: str, rec: dict[str, Any]) -> str:
    """Every text of the record, in order, one per line: what the quality filters and dedup keys look at."""
    if kind == "sft":
        return "\n".join(m["content"] for m in rec["messages"])
    if kind == "preference":
        return "\n".join([m["content"] for m in rec["prompt"]] + [rec["chosen"], rec["rejected"]])
    if kind == "unpaired":  # the label is not text: one (prompt, completion) with both labels is a duplicate
        return "\n".join([m["content"] for m in rec["prompt"]] + [rec["completion"]])
    return rec["text"]


def dedup_text(text: str) -> str:
    return " ".join(_WORD.findall(text.casefold()))


def exact_key(text: str, dtext: str | None = None) -> str:
    """16-byte hex digest of the de-duplication text (dtext: dedup_text(text), when the caller has it): equal
    keys = exact duplicates after normalisation."""
    return hashlib.blake2b((dedup_text(text) if dtext is None else dtext).encode(), digest_size=16).hexdigest()


def repeated_ngram_ratio(text: str, n: int = 3, dtext: str | None = None) -> float:
    """Share of word n-grams that repeat an earlier one (0 = all distinct); texts under 4n words count as 0."""
    words = (dedup_text(text) if dtext is None else dtext).split()
    if len(words) < 4 * n:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


_PUNCT = ".,;:!?'\"()-"
_ASCII_SPACE = bytes(c for c in range(128) if chr(c).isspace())
_ASCII_PLAIN = bytes(c for c in range(128) if chr(c).isalnum() or chr(c) in _PUNCT) + _ASCII_SPACE


def symbol_ratio(text: str) -> float:
    """Share of non-space characters that are neither letters, digits nor common punctuation. ASCII text (most
    rows) is counted by bytes.translate, in C; other text character by character, with the same result."""
    if text.isascii():
        raw = text.encode()
        nonspace = len(raw.translate(None, _ASCII_SPACE))
        return len(raw.translate(None, _ASCII_PLAIN)) / nonspace if nonspace else 0.0
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(1 for c in chars if not c.isalnum() and c not in _PUNCT) / len(chars)


def quality_reason(kind: str, rec: dict[str, Any], t: FilterSection, n_tokens: int | None = None,
                   max_tokens: int | None = None, dtext: str | None = None) -> str:
    """'' if the record passes, else the first failing filter's reason (length first, then content). dtext:
    dedup_text of the record's full text, when the caller has it."""
    text = full_text(kind, rec)
    if (t.max_chars is not None and len(text) > t.max_chars) or (
            max_tokens is not None and n_tokens is not None and n_tokens > max_tokens):
        return "too_long"
    if len(answer_of(kind, rec)) < t.min_answer_chars or (
            kind == "preference" and len(rec["rejected"]) < t.min_answer_chars):
        return "too_short_answer"
    if t.max_repeated_ngram_ratio is not None and repeated_ngram_ratio(text, dtext=dtext) > t.max_repeated_ngram_ratio:
        return "repeated_ngrams"
    if t.max_symbol_ratio is not None and symbol_ratio(text) > t.max_symbol_ratio:
        return "symbol_ratio"
    return ""
