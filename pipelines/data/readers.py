"""Readers: a file, folder or glob (local or s3://) of JSONL / JSON arrays / Parquet / CSV → raw records. No Ray.

Every record keeps where it came from (file and line) so a refused row can be found again. A record is the row's
raw text (JSONL line, or the JSON of a Parquet/CSV/array row); parsing and validation happen in `rowformats`.
Object stores go through pyarrow's filesystems (S3 via `pyarrow.fs.S3FileSystem`, anything else via fsspec).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipelines.data.rowformats import RowError, parse_raw, to_canonical
from pipelines.schema import DataError, MissingInput

KINDS = (".jsonl", ".json", ".parquet", ".csv", ".arrow")  # .arrow: a Hugging Face `save_to_disk` folder's shards
HF_METADATA = ("state.json", "dataset_info.json", "dataset_dict.json")
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}  # streamed by pyarrow, never unpacked to disk
SUFFIXES = KINDS + tuple(k + c for k in (".jsonl", ".json", ".csv") for c in COMPRESSED)
_GLOB_CHARS = "*?["
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark some editors write: not part of the first row


@dataclass(frozen=True)
class Location:
    """A parsed path spec: `scheme` is '' for local paths; `path` has no scheme; `pattern` is a glob or ''."""

    scheme: str
    path: str
    pattern: str = ""

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.path}" if self.scheme else self.path


def parse_location(spec: str) -> Location:
    """'s3://b/dir/*.jsonl' → Location('s3', 'b/dir', '*.jsonl'); a spec without glob characters has no pattern."""
    scheme, sep, rest = spec.partition("://")
    if not sep:
        scheme, rest = "", spec
    if scheme and not rest.strip("/"):
        raise DataError(f"{spec!r}: no bucket or path after {scheme}://; name one, e.g. {scheme}://bucket/rows.jsonl")
    parts = rest.split("/")
    first_glob = next((i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS)), None)
    if first_glob is None:
        return Location(scheme.lower(), rest.rstrip("/") or rest)
    if first_glob != len(parts) - 1:
        raise DataError(f"{spec!r}: glob characters are supported in the last path component only; name the folders "
                        "and put the pattern in the file name, e.g. data/*.jsonl")
    return Location(scheme.lower(), "/".join(parts[:-1]) or ".", parts[-1])


def filesystem(loc: Location):
    """The pyarrow filesystem for a location: local, S3 (pyarrow's own), or any fsspec protocol."""
    import pyarrow.fs as pafs

    if not loc.scheme or loc.scheme == "file":
        return pafs.LocalFileSystem()
    if loc.scheme in ("s3", "s3a"):
        return pafs.S3FileSystem()
    import fsspec

    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(loc.scheme)))


HUB = "hf://datasets/"


def hub_files(name: str, split: str = "train") -> list[str]:
    """A Hugging Face dataset (a hub id, or a local folder `datasets.load_dataset` reads) → the Arrow files of
    its `split` in the datasets cache: `datasets` resolves, downloads (once, with the usual HF_TOKEN /
    HF_HUB_OFFLINE) and converts it; the rows are then read from those files like any other input."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError) as e:
        raise MissingInput(f"{name!r} (split {split!r}): Hugging Face datasets cannot load it: {e}") from None
    files = [f["filename"] for f in ds.cache_files]
    if not files:
        raise MissingInput(f"{name!r} (split {split!r}): loaded in memory only, with no cache files to stream")
    return files


def _hub_spec(spec: str) -> tuple[str, str] | None:
    """'hf://datasets/owner/name[:split]' → (id, split); None for any other spec (deeper hf:// paths name files
    in a dataset repository and are read through fsspec's HfFileSystem like any remote file)."""
    if not spec.startswith(HUB):
        return None
    name, _, split = spec[len(HUB):].partition(":")
    return (name.strip("/"), split or "train") if len(name.strip("/").split("/")) <= 2 else None


def expand_paths(spec: str | list[str]) -> list[str]:
    """A file, folder (its data files, recursively) or glob, or a list of them → sorted explicit file URIs.
    'hf://datasets/<owner>/<name>[:split]' is a Hugging Face dataset (hub_files)."""
    if isinstance(spec, list):
        return [p for s in spec for p in expand_paths(s)]
    if hub := _hub_spec(spec):
        return hub_files(*hub)
    import pyarrow.fs as pafs

    loc = parse_location(spec)
    fs = filesystem(loc)
    base = str(Path(loc.path).expanduser().resolve()) if not loc.scheme else loc.path
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File and not loc.pattern:
        files = [base]
    elif info.type == pafs.FileType.Directory:
        found = fs.get_file_info(pafs.FileSelector(base, recursive=not loc.pattern))
        files = sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(SUFFIXES)
                       and (not loc.pattern or fnmatch.fnmatch(f.base_name, loc.pattern)))
        shards = {str(Path(f).parent) for f in files if f.endswith(".arrow")}  # Hugging Face save_to_disk folders:
        files = [f for f in files if not (Path(f).name in HF_METADATA and str(Path(f).parent) in shards)]  # data only
    else:
        files = []
    if not files:
        raise MissingInput(f"{spec!r}: no such file, or no {'/'.join(SUFFIXES)} files there")
    return [f"{loc.scheme}://{f}" if loc.scheme else f for f in files]


def file_kind(path: str) -> str:
    """jsonl / json / parquet / csv, from the name, a compression suffix (.gz, .zst, .bz2) looked through."""
    return file_format(path)[0]


def file_format(path: str) -> tuple[str, str | None]:
    """(kind, compression or None) from the file name."""
    name = path.lower()
    compression = next((c for suffix, c in COMPRESSED.items() if name.endswith(suffix)), None)
    if compression:
        name = name.rsplit(".", 1)[0]
    for suffix in KINDS:
        if name.endswith(suffix) and not (compression and suffix in (".parquet", ".arrow")):
            return suffix[1:], compression
    raise DataError(f"{path}: unknown file type; give a file ending in one of {', '.join(SUFFIXES)}")


@dataclass
class RawRecord:
    """One row as read: `raw` is its text, or None with `error` set when the bytes are not UTF-8."""

    line: int
    raw: str | None
    error: str = ""
    ordinal: int = 0  # JSON arrays: the element's number (1-based), unique where line is not (a one-line array)


MAX_CELL_BYTES = 16 << 20  # a CSV cell larger than this refuses its row (Python's csv default is 128 KiB)


def iter_records(path: str, byte_range: tuple[int, int, int] | None = None) -> Iterator[RawRecord]:
    """Every record of one file, with its 1-based line number (for JSON arrays: the line the element starts on).
    byte_range (start, end, line of start) reads one slice of a plain local JSONL file (see jsonl_ranges).

    A file that cannot be read (a truncated Parquet file, a .gz that is not gzip) is a DataError naming it and
    what is wrong when nothing of it was read; when rows were read before the damage, they are kept and one more
    record, refused as `unreadable`, says where reading stopped: never a silent stop, never a traceback."""
    loc = parse_location(path)
    kind, compression = file_format(path)
    if byte_range is not None:
        yield from _jsonl_slice(loc.path, *byte_range)
        return
    last = 0
    try:
        for rec in _records(filesystem(loc), loc.path, kind, compression):
            last = rec.line
            yield rec
    except (OSError, EOFError, ValueError, RuntimeError) as e:  # pyarrow's ArrowInvalid/ArrowIOError, zlib, gzip
        what = f"{kind}{f' ({compression})' if compression else ''}"
        why = " ".join(str(e).split())[:300] or type(e).__name__
        if not last:
            raise DataError(f"{path}: cannot be read as {what}: {why}; check the file (a partial copy or a "
                            "wrong suffix?) or leave it out of the input") from None
        yield RawRecord(last + 1, None, f"unreadable: reading stopped after line {last}: {why}")


def _records(fs, path: str, kind: str, compression: str | None) -> Iterator[RawRecord]:
    if kind == "parquet":  # Parquet needs random access (its footer comes first)
        with fs.open_input_file(path) as f:
            yield from _parquet(f)
        return
    with fs.open_input_stream(path, compression=compression) as f:
        if kind == "arrow":
            yield from _arrow_stream(f)
        elif kind == "jsonl":
            yield from _jsonl(f)
        elif kind == "json":
            yield from _json_array(f.read())
        else:
            yield from _csv(f)


def _jsonl(f) -> Iterator[RawRecord]:
    import io

    for i, line in enumerate(io.BufferedReader(f), start=1):
        line = line.rstrip(b"\r\n")
        if i == 1:
            line = line.removeprefix(BOM)
        if not line.strip():
            continue  # blank lines are not rows
        try:
            yield RawRecord(i, line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield RawRecord(i, None, f"undecodable: {e.reason} at byte {e.start}")


def jsonl_ranges(path: str, target_bytes: int) -> list[tuple[int, int, int]]:
    """Slices of a plain (uncompressed, local) JSONL file of about target_bytes each, cut after a newline:
    (start, end, line number of the slice's first line). One pass counting newlines (C speed) on the driver, so
    every slice's rows keep their true line numbers; the slices are then read and parsed in parallel."""
    size = Path(path).stat().st_size
    if size <= target_bytes:
        return [(0, size, 1)]
    ranges, start, line = [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + target_bytes, size))
            f.readline()  # to the end of the line the cut falls in
            end = min(f.tell(), size)
            f.seek(start)
            n = f.read(end - start).count(b"\n")
            ranges.append((start, end, line))
            start, line = end, line + n
    return ranges


def _jsonl_slice(path: str, start: int, end: int, first_line: int) -> Iterator[RawRecord]:
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if start == 0:
        data = data.removeprefix(BOM)
    for i, line in enumerate(data.split(b"\n"), start=first_line):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            yield RawRecord(i, line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield RawRecord(i, None, f"undecodable: {e.reason} at byte {e.start}")


def _json_array(data: bytes) -> Iterator[RawRecord]:
    """Elements of a top-level JSON array one by one; a syntax error refuses the rest of the file as one row."""
    text = data.removeprefix(BOM).decode("utf-8", errors="surrogateescape")  # bad bytes refuse their element only
    dec = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if not text.startswith("[", pos):  # a single object file, or JSONL named .json
        yield from (RawRecord(i, s) for i, s in enumerate(text.splitlines(), 1) if s.strip())
        return
    pos = _skip_ws(text, pos + 1)
    counted, start_line, ordinal = 0, 1, 0  # newlines counted incrementally: O(file), not O(file x rows)
    while pos < len(text) and text[pos] != "]":
        start_line += text.count("\n", counted, pos)
        counted = pos
        try:
            _, end = dec.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError, ValueError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deep" if isinstance(
                e, RecursionError) else " ".join(str(e).split())[:200]
            yield RawRecord(start_line, _decodable(text[pos:pos + 2000]), f"broken_json: {why} (rest of the array "
                            "unread)", ordinal=ordinal + 1)
            return
        ordinal += 1
        element = text[pos:end]
        yield (RawRecord(start_line, element, ordinal=ordinal) if _decodable(element) == element else
               RawRecord(start_line, None, "undecodable: bytes that are not UTF-8", ordinal=ordinal))
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _parquet(f) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    line = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=2048):
        for row in batch.to_pylist():
            line += 1
            yield RawRecord(line, json.dumps(_jsonable(row), ensure_ascii=False))


def _arrow_stream(f) -> Iterator[RawRecord]:
    """An Arrow IPC stream, as `datasets.Dataset.save_to_disk` writes its data-*.arrow shards."""
    import pyarrow as pa

    line = 0
    for batch in pa.ipc.open_stream(f):
        for row in batch.to_pylist():
            line += 1
            yield RawRecord(line, json.dumps(_jsonable(row), ensure_ascii=False))


def _csv(f) -> Iterator[RawRecord]:
    """Rows of a CSV file: a byte-order mark is dropped; bytes that are not UTF-8 refuse their own row only (the
    rest of the file is read); a cell over MAX_CELL_BYTES refuses its row."""
    import csv
    import io

    csv.field_size_limit(MAX_CELL_BYTES)
    text = io.TextIOWrapper(io.BufferedReader(f), encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.DictReader(text)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # "field larger than field limit": the reader goes on at the next line
            yield RawRecord(reader.line_num, None, f"too_long: a cell over {MAX_CELL_BYTES:,} bytes ({e})")
            continue
        raw = json.dumps(row, ensure_ascii=False)
        yield (RawRecord(reader.line_num, raw) if _decodable(raw) == raw else
               RawRecord(reader.line_num, None, "undecodable: bytes that are not UTF-8"))


def _decodable(text: str) -> str:
    """text with the bytes `surrogateescape` kept (lone surrogates) replaced by U+FFFD."""
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)


def record_batches(paths: list[str], file_ids: list[int], chunk: int = 2048,
                   ranges: list[tuple[int, int, int] | None] | None = None) -> Iterator[dict[str, list]]:
    """Columnar batches of at most `chunk` records: source, line, raw, error, row_id (file id << 32 | the line,
    or for a JSON array the element's number: elements of a one-line array share their line)."""
    out: dict[str, list] = {"source": [], "line": [], "raw": [], "error": [], "row_id": []}
    for path, fid, byte_range in zip(paths, file_ids, ranges or [None] * len(paths)):
        for rec in iter_records(path, byte_range):
            out["source"].append(path)
            out["line"].append(rec.line)
            out["raw"].append(rec.raw if rec.raw is not None else "")
            out["error"].append(rec.error)
            out["row_id"].append((int(fid) << 32) | (rec.ordinal or rec.line))  # unique within the file
            if len(out["raw"]) >= chunk:
                yield out
                out = {k: [] for k in out}
    if out["raw"]:
        yield out


@dataclass
class Conversation:
    """One usable row as a chat conversation, with where it came from."""

    source: str
    line: int
    messages: list[dict[str, str]]


def read_conversations(spec: str | list[str], limit: int | None = None, *, answer_last: bool = False
                       ) -> tuple[list[Conversation], list[dict[str, Any]]]:
    """Chat conversations from any row format (rowformats, detected per row) and file type the data stage reads
    (a file, folder or glob; local or s3://; compressed), in order, and every refused row as {"source", "line",
    "reason", "detail", "record"}. Refused: rows that do not parse (their RowError reason), raw-text rows
    (`text_row`: no conversation) and, with `answer_last`, conversations whose last turn is not the assistant's
    (`no_final_answer`: nothing to score). A preference row is its prompt and the chosen answer. Reading stops at
    `limit` kept rows."""
    out: list[Conversation] = []
    rejected: list[dict[str, Any]] = []

    def refuse(path: str, rec: RawRecord, reason: str, detail: str) -> None:
        rejected.append({"source": path, "line": rec.line, "reason": reason, "detail": detail, "record": rec.raw})

    for path in expand_paths(spec):
        for rec in iter_records(path):
            if rec.raw is None or rec.error:
                reason, _, detail = (rec.error or "undecodable: no text").partition(": ")
                refuse(path, rec, reason, detail)
                continue
            try:
                kind, row = to_canonical(parse_raw(rec.raw), "auto")
            except RowError as e:
                refuse(path, rec, e.reason, e.detail)
                continue
            if kind == "sft":
                conv = row["messages"]
            elif kind == "preference":
                conv = row["prompt"] + [{"role": "assistant", "content": row["chosen"]}]
            else:
                refuse(path, rec, "text_row", "a raw-text row, not a conversation")
                continue
            if answer_last and conv[-1]["role"] != "assistant":
                refuse(path, rec, "no_final_answer", f"the last turn is the {conv[-1]['role']}'s")
                continue
            out.append(Conversation(path, rec.line, conv))
            if limit is not None and len(out) >= limit:
                return out, rejected
    return out, rejected
