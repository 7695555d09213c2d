"""Regenerate tests/data from ../shared/data: small samples of the permissively licensed (MIT, Apache-2.0) files
the tests read, under the same sub-paths, plus their licence texts. Deterministic (first N rows, no randomness),
so anyone with ../shared/data can check the samples' provenance:

    .venv/bin/python tests/data/make_samples.py            # rewrite tests/data from ../shared/data
    .venv/bin/python tests/data/make_samples.py --check    # exit 1 if a committed sample differs from a regeneration

The rule (../shared/data/MANIFEST.md): only MIT / Apache-2.0 files are sampled here, each with its licence text and
its source named in tests/data/README.md; the Alpaca (CC BY-NC 4.0) and Dolly (CC BY-SA 3.0) files and the WMT data
are never copied into the repository. Tests needing those keep reading ../shared/data (the `shared_data` fixture).
The whole of tests/data stays under 2 MB (tests/unit/test_layout.py checks it).
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "data"  # ../shared/data beside the checkout

# (sub-path, how many rows are kept) for each sampled file; None: the whole file (it is small)
GSM8K_ROWS = 500     # tests/unit/data/test_curate.py reads 500; tests/integration/test_eval.py 8 (general text)
PAIRS_ROWS = 100     # test_dpo.py: 64 for the run (max_pairs=64 must still cut the file) and the first 12
MMLU_ROWS = 8        # test_eval.py: mmlu_subjects=["marketing"], mmlu_per_subject=8
MMLU_SUBJECTS = ("marketing",)
WHOLE = ("sft/alpaca_seed_tasks.jsonl", "metrics/rouge/rouge155_expected.json", "metrics/rouge/testdata/target.txt",
         "metrics/rouge/testdata/prediction.txt", "metrics/rouge/testdata/pyrouge_files/target_multi.0.txt",
         "metrics/rouge/testdata/pyrouge_files/prediction_multi.0.txt")
LICENSES = {  # copied byte for byte from ../shared/data/licenses/
    "grade-school-math_LICENSE_MIT.txt": "grade-school-math_LICENSE_MIT.txt",
    "hendrycks_test_MMLU_LICENSE_MIT.txt": "hendrycks_test_MMLU_LICENSE_MIT.txt",
    "FineGrainedRLHF_LICENSE_Apache-2.0.txt": "FineGrainedRLHF_LICENSE_Apache-2.0.txt",
    "self-instruct_LICENSE_Apache-2.0.txt": "self-instruct_LICENSE_Apache-2.0.txt",
    "stanford_alpaca_CODE_LICENSE_Apache-2.0.txt": "stanford_alpaca_CODE_LICENSE_Apache-2.0.txt",
    # ../shared/data/licenses holds no google-research file: the unmodified Apache License 2.0 text it ships
    # (byte-identical to the FineGrainedRLHF, self-instruct and sacrebleu copies there)
    "Apache-2.0.txt": "self-instruct_LICENSE_Apache-2.0.txt",
}


def first_lines(path: Path, n: int) -> bytes:
    """The first n lines of a JSONL file, byte for byte."""
    with open(path, "rb") as fh:
        return b"".join(fh.readline() for _ in range(n))


def first_csv_records(path: Path, n: int) -> bytes:
    """The header and the first n records of a CSV file, byte for byte (a quoted field may span lines)."""
    with open(path, encoding="utf-8", newline="") as fh:
        lines = fh.readlines()
    reader = csv.reader(iter(lines))
    for _ in range(n + 1):
        next(reader)
    return "".join(lines[:reader.line_num]).encode()


def build(source: Path, out: Path) -> list[Path]:
    """Write every sample and licence under `out`; the paths written, relative to it."""
    written = []

    def put(rel: str, data: str | bytes) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        written.append(Path(rel))

    gsm = json.loads((source / "sft" / "gsm8k_train_alpaca.json").read_text())[:GSM8K_ROWS]
    put("sft/gsm8k_train_alpaca.json", json.dumps(gsm, indent=4) + "\n")  # the source's own layout
    rel = "preference/qa_feedback_pairs.jsonl"
    put(rel, first_lines(source / rel, PAIRS_ROWS))
    for subject in MMLU_SUBJECTS:
        rel = f"benchmark/mmlu/test/{subject}_test.csv"
        put(rel, first_csv_records(source / rel, MMLU_ROWS))
    for rel in WHOLE:
        put(rel, (source / rel).read_bytes())
    for name, src in LICENSES.items():
        put(f"licenses/{name}", (source / "licenses" / src).read_bytes())
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SHARED, help="the shared data folder (default: ../shared/data)")
    ap.add_argument("--check", action="store_true", help="compare the committed samples with a regeneration")
    args = ap.parse_args()
    if not args.source.is_dir():
        print(f"{args.source} is not here: the samples are made from the project's ../shared/data", file=sys.stderr)
        return 2
    if not args.check:
        for rel in build(args.source, HERE):
            print(f"{rel}  {(HERE / rel).stat().st_size} bytes")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        differ = [str(rel) for rel in build(args.source, Path(tmp))
                  if not (HERE / rel).is_file() or not filecmp.cmp(Path(tmp) / rel, HERE / rel, shallow=False)]
    if differ:
        print("differ from a regeneration: " + ", ".join(differ), file=sys.stderr)
        return 1
    print("tests/data equals its regeneration from " + str(args.source))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
