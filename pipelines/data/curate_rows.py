"""Per-block work of curation, as Ray Data callables: read files → parse, validate, normalise, filter, sign.

Pure enough to unit-test without Ray: `ParseRows(job)(batch)` is a plain function of a column dict.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.data.chat import encode_conversations, load_tokenizer
from pipelines.data.config import DataConfig, FilterSection
from pipelines.data.dedup import signatures
from pipelines.data.engine import cached
from pipelines.data.filters import dedup_text, exact_key, full_text, normalise_record, quality_reason
from pipelines.data.packing import IGNORE_INDEX
from pipelines.data.readers import record_batches
from pipelines.data.rowformats import RowError, apply_columns, check_decodable, parse_raw, to_canonical

PARSED_COLUMNS = ("row_id", "source", "line", "origin", "kind", "category", "reason", "detail", "raw", "record",
                  "dtext", "exact_key", "split_key", "sig", "n_tokens", "input_ids", "labels", "n_label_tokens")
TIMING_COLUMNS = ("t_parse", "t_count", "t_filter", "t_sign")
# A conversation's token ids and labels (chat template, assistant-only labels) are computed here, where its
# length is counted anyway, and travel with the kept row to the curated split: the tokenize pass reuses them
# when its tokenizer is the one they came from (curated manifest's token_columns), instead of encoding again.
# Empty lists (and n_label_tokens -1) where there are none: not a conversation, no tokenizer, or a template whose
# renderings are not prefixes of each other (the tokenize pass then takes its own way and says so).
TOKEN_TYPES = {"input_ids": pa.list_(pa.int32()), "labels": pa.list_(pa.int32()), "n_label_tokens": pa.int64()}
_TYPES = {"row_id": pa.int64(), "line": pa.int64(), "n_tokens": pa.int64(), "sig": pa.binary(), **TOKEN_TYPES}
PARSED_SCHEMA = pa.schema([(c, _TYPES.get(c, pa.string())) for c in PARSED_COLUMNS]
                          + [(c, pa.float64()) for c in TIMING_COLUMNS])


def read_files(batch: dict[str, Any], chunk: int = 2048):
    """Ray Data generator UDF: one batch of (path, fid) rows → record batches, streamed chunk by chunk."""

    ranges = None
    if "start" in batch:
        ranges = [None if int(s) < 0 else (int(s), int(e), int(n))
                  for s, e, n in zip(batch["start"], batch["end"], batch["first_line"])]
    yield from record_batches(list(batch["path"]), [int(f) for f in batch["fid"]], chunk, ranges)


@dataclass(frozen=True)
class ParseJob:
    """What every parse task is given: the row format rules, the filters and signing, and the tokenizer."""

    fmt: str  # data.format (auto: per row, where file_formats has no format for the row's file)
    system_prompt: str | None
    filters: FilterSection
    num_perm: int
    category_field: str | None
    mix_fids: tuple[int, ...]  # file ids of data.mix.path's files
    model_dir: str | None = None  # the tokenizer counting tokens (None: characters / 4)
    max_tokens: int | None = None  # longer rows are refused (too_long); None: the tokenize pass decides
    columns: dict[str, str] = field(default_factory=dict)  # data.columns
    file_formats: dict[int, str] = field(default_factory=dict)  # file id → the format decided for that file
    max_row_chars: int = 4 << 20  # data.max_row_chars: longer raw rows are refused before parsing
    max_turns: int = 512  # data.max_turns
    columns_key: str = "data.columns"  # the config key a missing mapped field is reported under (dpo.columns)

    @classmethod
    def of(cls, cfg: DataConfig, formats: list[str], n_main: int, model_dir: str | None, section: str = "data"
           ) -> "ParseJob":
        """The job of a curation over files whose formats (in file-id order) are decided; the files from
        n_main on are data.mix.path's. section: the config section the rows come from (data, dpo)."""
        return cls(cfg.format, cfg.system_prompt, cfg.filters, cfg.dedup.num_perm, cfg.category_field,
                   tuple(range(n_main, len(formats))), model_dir,
                   cfg.max_length if cfg.truncation == "reject" else None, cfg.columns, dict(enumerate(formats)),
                   max_row_chars=cfg.max_row_chars, max_turns=cfg.max_turns, columns_key=f"{section}.columns")


def parse_batch(batch: dict[str, Any], job: ParseJob) -> pa.Table:
    """Ray Data task UDF around ParseRows, as a table of PARSED_SCHEMA: typed here, not inferred per block (a
    block of refused rows has only empty token lists, which Ray would type list<null>, unlike its neighbours)."""
    return pa.Table.from_pydict(cached(ParseRows, job)(batch), schema=PARSED_SCHEMA)


class ParseRows:
    """raw record → kind, normalised record JSON, reason, dedup text/key, MinHash signature, token count."""

    def __init__(self, job: ParseJob):
        self.job, self.mix_fids = job, set(job.mix_fids)
        self.tokenizer = load_tokenizer(job.model_dir) if job.model_dir else None

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        out: dict[str, list] = {k: [] for k in PARSED_COLUMNS if k != "sig"}
        parsed = [self.parse(str(raw), str(error), self.job.file_formats.get(int(row_id) >> 32, self.job.fmt))
                  for raw, error, row_id in zip(batch["raw"], batch["error"], batch["row_id"])]
        t1 = time.perf_counter()
        tokens = self.count_tokens([p for p in parsed if not isinstance(p, RowError)])
        t2 = time.perf_counter()
        for source, line, raw, row_id, p in zip(batch["source"], batch["line"], batch["raw"], batch["row_id"], parsed):
            n, ids, labels = (0, [], None) if isinstance(p, RowError) else next(tokens)
            if isinstance(labels, RowError):  # the chat template refused this conversation
                p, n, ids, labels = labels, 0, [], None
            r = self.finish(str(source), str(raw), p, None if isinstance(p, RowError) else n)
            keep = bool(ids) and not r["reason"]  # ids travel only with rows that can be kept
            r.update(input_ids=ids if keep else [], labels=labels if keep and labels is not None else [],
                     n_label_tokens=len(labels) - labels.count(IGNORE_INDEX) if keep and labels is not None
                     else -1)
            out["row_id"].append(int(row_id))
            out["source"].append(str(source))
            out["line"].append(int(line))
            out["origin"].append("mix" if (int(row_id) >> 32) in self.mix_fids else "main")
            for k, v in r.items():
                out[k].append(v)
        t3 = time.perf_counter()
        valid = [i for i, r in enumerate(out["reason"]) if not r]
        sig = signatures([out["dtext"][i] for i in valid], self.job.num_perm).astype(np.uint32)
        out["sig"] = [b""] * len(out["reason"])
        for j, i in enumerate(valid):
            out["sig"][i] = sig[j].tobytes()
        t4 = time.perf_counter()
        # task-seconds per phase, spread over the batch's rows (summed by the driver into the report)
        n = max(len(parsed), 1)
        for k, secs in (("t_parse", t1 - t0), ("t_count", t2 - t1), ("t_filter", t3 - t2), ("t_sign", t4 - t3)):
            out[k] = [secs / n] * len(parsed)
        return out

    def parse(self, raw: str, error: str, fmt: str) -> tuple[str, dict, dict] | RowError:
        """(kind, normalised record, the raw row) or the RowError that refuses it."""
        try:
            if error:
                reason, _, detail = error.partition(": ")
                raise RowError(reason, detail)
            if len(raw) > self.job.max_row_chars:
                raise RowError("too_long", f"{len(raw):,} characters > data.max_row_chars {self.job.max_row_chars:,}")
            row = apply_columns(parse_raw(raw), self.job.columns, self.job.columns_key)
            kind, rec = to_canonical(row, fmt, self.job.system_prompt)
            if kind == "sft" and len(rec["messages"]) > self.job.max_turns:
                raise RowError("too_long", f"{len(rec['messages'])} turns > data.max_turns {self.job.max_turns}")
            if not raw.isascii() or "\\u" in raw or self.job.system_prompt:  # else no lone surrogate or U+FFFD
                check_decodable(rec)
            return kind, normalise_record(kind, rec), row
        except RowError as e:
            return e

    def finish(self, source: str, raw: str, parsed: tuple[str, dict, dict] | RowError, n_tokens: int | None
               ) -> dict[str, Any]:
        res = {"kind": "", "category": "", "reason": "", "detail": "", "raw": raw, "record": "", "dtext": "",
               "exact_key": "", "split_key": "", "n_tokens": 0}
        if isinstance(parsed, RowError):
            res.update(reason=parsed.reason, detail=parsed.detail)
            return res
        kind, rec, row = parsed
        text = full_text(kind, rec)
        dtext = dedup_text(text)  # once: the n-gram filter, the exact key and MinHash all read it
        reason = quality_reason(kind, rec, self.job.filters, n_tokens, self.job.max_tokens, dtext=dtext)
        category = row.get(self.job.category_field) if self.job.category_field else None
        res.update(kind=kind, reason=reason, record=json.dumps(rec, ensure_ascii=False), n_tokens=n_tokens,
                   category=str(category) if category not in (None, "") else PurePosixPath(source).stem,
                   dtext=dtext, exact_key=exact_key(text, dtext))
        if kind in ("preference", "unpaired"):  # the rows of one prompt share a split (no prompt in two)
            res["split_key"] = exact_key("\n".join(m["content"] for m in rec["prompt"]))
        if not reason:
            res["raw"] = ""  # the record holds it; raw text is kept only for refused rows
        return res

    def count_tokens(self, parsed: list[tuple[str, dict, dict]]):
        """An iterator of (token count, input_ids, labels), one per parsed row: a conversation's from its chat
        template rendering (chat.encode_conversations: ids and assistant-only labels, one batched encode),
        other kinds' counted from one batched encode (no ids kept), or characters/4 without a tokenizer."""
        if self.tokenizer is None:
            return iter([(len(full_text(kind, rec)) // 4, [], None) for kind, rec, _ in parsed])
        tok = self.tokenizer
        out: list[tuple[int, list[int], list[int] | None]] = [(0, [], None)] * len(parsed)
        sft = [i for i, (kind, _, _) in enumerate(parsed) if kind == "sft"]
        convs = [[{"role": m["role"], "content": m["content"]} for m in parsed[i][1]["messages"]] for i in sft]
        for i, r in zip(sft, encode_conversations(tok, convs)):
            out[i] = (0, [], r) if isinstance(r, RowError) else (len(r[0]), *r)
        others = [i for i, (kind, _, _) in enumerate(parsed) if kind != "sft"]
        texts = [self._plain_text(*parsed[i][:2]) for i in others]
        for i, ids in zip(others, tok(texts, add_special_tokens=True)["input_ids"] if texts else []):
            out[i] = (len(ids) + 1, [], None)
        return iter(out)

    def _plain_text(self, kind: str, rec: dict[str, Any]) -> str:
        if kind == "text":
            return rec["text"]
        prompt = self.tokenizer.apply_chat_template(rec["prompt"], tokenize=False, add_generation_prompt=True)
        return prompt + max(rec["chosen"], rec["rejected"], key=len)
