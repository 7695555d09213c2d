"""Per-block work of curation, as Ray Data callables: read files → parse, validate, normalise, filter, sign.

Pure enough to unit-test without Ray: `ParseRows()(batch)` is a plain function of a column dict.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from pipelines.data.config import FilterSection
from pipelines.data.dedup import signatures
from pipelines.data.filters import dedup_text, exact_key, full_text, normalise_record, quality_reason
from pipelines.data.readers import record_batches
from pipelines.data.rowformats import RowError, apply_columns, check_decodable, parse_raw, to_canonical

PARSED_COLUMNS = ("row_id", "source", "line", "origin", "kind", "category", "reason", "detail", "raw", "record",
                  "dtext", "exact_key", "sig", "n_tokens")


def read_files(batch: dict[str, Any], chunk: int = 2048):
    """Ray Data generator UDF: one batch of (path, fid) rows → record batches, streamed chunk by chunk."""

    yield from record_batches(list(batch["path"]), [int(f) for f in batch["fid"]], chunk)


_CACHE: dict[tuple, Any] = {}


def cached(cls, *args):
    """One instance per worker process and arguments. Ray reuses task workers, so the tokenizer (and the
    transformers import, ~10-20 s on a small machine) is loaded once per worker, not once per stage's actor."""
    key = (cls.__name__, repr(args))
    if key not in _CACHE:
        _CACHE[key] = cls(*args)
    return _CACHE[key]


def parse_batch(batch: dict[str, Any], *args) -> dict[str, Any]:
    """Ray Data task UDF around ParseRows (args: ParseRows' constructor arguments)."""
    return cached(ParseRows, *args)(batch)


class ParseRows:
    """raw record → kind, normalised record JSON, reason, dedup text/key, MinHash signature, token count."""

    def __init__(self, fmt: str, system_prompt: str | None, filters: FilterSection, num_perm: int,
                 category_field: str | None, mix_fids: list[int], model_dir: str | None = None,
                 max_tokens: int | None = None, columns: dict[str, str] | None = None):
        self.fmt, self.system_prompt, self.num_perm, self.columns = fmt, system_prompt, num_perm, columns or {}
        self.thresholds = filters
        self.category_field, self.mix_fids, self.max_tokens = category_field, set(mix_fids), max_tokens
        self.tokenizer = None
        if model_dir:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, list] = {k: [] for k in PARSED_COLUMNS if k != "sig"}
        for source, line, raw, error, row_id in zip(batch["source"], batch["line"], batch["raw"], batch["error"],
                                                    batch["row_id"]):
            r = self.row(str(source), str(raw), str(error))
            out["row_id"].append(int(row_id))
            out["source"].append(str(source))
            out["line"].append(int(line))
            out["origin"].append("mix" if (int(row_id) >> 32) in self.mix_fids else "main")
            for k, v in r.items():
                out[k].append(v)
        valid = [i for i, r in enumerate(out["reason"]) if not r]
        sig = signatures([out["dtext"][i] for i in valid], self.num_perm).astype(np.uint32)
        out["sig"] = [b""] * len(out["reason"])
        for j, i in enumerate(valid):
            out["sig"][i] = sig[j].tobytes()
        return out

    def row(self, source: str, raw: str, error: str) -> dict[str, Any]:
        res = {"kind": "", "category": "", "reason": "", "detail": "", "raw": raw, "record": "", "dtext": "",
               "exact_key": "", "n_tokens": 0}
        try:
            if error:
                reason, _, detail = error.partition(": ")
                raise RowError(reason, detail)
            row = apply_columns(parse_raw(raw), self.columns)
            kind, rec = to_canonical(row, self.fmt, self.system_prompt)
            check_decodable(rec)
            rec = normalise_record(kind, rec)
            n_tokens = self.count_tokens(kind, rec)
            reason = quality_reason(kind, rec, self.thresholds, n_tokens, self.max_tokens)
        except RowError as e:
            res.update(reason=e.reason, detail=e.detail)
            return res
        text = full_text(kind, rec)
        category = row.get(self.category_field) if self.category_field else None
        res.update(kind=kind, reason=reason, record=json.dumps(rec, ensure_ascii=False), n_tokens=n_tokens,
                   category=str(category) if category not in (None, "") else PurePosixPath(source).stem,
                   dtext=dedup_text(text), exact_key=exact_key(text))
        if not reason:
            res["raw"] = ""  # the record holds it; raw text is kept only for refused rows
        return res

    def count_tokens(self, kind: str, rec: dict[str, Any]) -> int:
        """Tokens of the rendered conversation (the chat template's), or characters/4 without a tokenizer."""

        if self.tokenizer is None:
            return len(full_text(kind, rec)) // 4
        if kind == "sft":
            ids = self.tokenizer.apply_chat_template(rec["messages"], tokenize=True, return_dict=False)
            return len(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if kind == "text":
            return len(self.tokenizer(rec["text"])["input_ids"]) + 1
        prompt = self.tokenizer.apply_chat_template(rec["prompt"], tokenize=False, add_generation_prompt=True)
        longest = max(rec["chosen"], rec["rejected"], key=len)
        return len(self.tokenizer(prompt + longest)["input_ids"]) + 1
