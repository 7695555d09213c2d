"""tests/data, the data the tests carry in the repository (issue 37 item 6): small first-rows samples of the MIT /
Apache-2.0 files of ../shared/data, each listed in tests/data/README.md with its source and licence, the licence
texts beside them, at most 2 MB in all. The Alpaca (CC BY-NC 4.0) and Dolly (CC BY-SA 3.0) files and the WMT data
never come here: the tests that read them keep the `shared_data` fixture (../shared/data)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
OWN = {"README.md", "make_samples.py"}  # the folder's own files, not samples
LIMIT = 2 * 1024 * 1024
FORBIDDEN = re.compile(r"alpaca_5000|dolly|wmt|sacrebleu|cc-by", re.IGNORECASE)


def files() -> list[Path]:
    return sorted(p for p in DATA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def listed() -> dict[str, tuple[str, list[str]]]:
    """README table rows: sample path -> (licence name, licence files named in that row)."""
    out = {}
    for line in (DATA / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        paths = re.findall(r"`([^`]+)`", cells[0])
        folder = paths[0].rsplit("/", 1)[0]
        licence = cells[4].split()[0]
        for p in paths:
            out[p if "/" in p else f"{folder}/{p}"] = (licence, re.findall(r"`([^`]+)`", cells[4]))
    return out


def test_tests_data_stays_under_2_mb():
    total = sum(p.stat().st_size for p in files())
    assert total <= LIMIT, f"tests/data holds {total} bytes, over {LIMIT}: sample fewer rows"


def test_every_sample_is_listed_with_a_permissive_licence_whose_text_is_beside_it():
    rows = listed()
    samples = {p.relative_to(DATA).as_posix() for p in files()
               if p.name not in OWN and p.relative_to(DATA).parts[0] != "licenses"}
    assert samples, "no samples found"
    assert samples == set(rows), f"in tests/data but not in its README: {samples - set(rows)}; " \
                                 f"in the README but not here: {set(rows) - samples}"
    for path, (licence, texts) in rows.items():
        assert licence in ("MIT", "Apache-2.0"), (path, licence)
        assert texts, f"{path}: no licence file named"
        for name in texts:
            text = (DATA / "licenses" / name).read_text()
            assert ("MIT License" in text) if licence == "MIT" else ("Apache License" in text and "2.0" in text), name


def test_no_non_commercial_share_alike_or_wmt_file_is_here():
    bad = [p.relative_to(DATA).as_posix() for p in files() if FORBIDDEN.search(p.relative_to(DATA).as_posix())]
    assert not bad, f"never copied into the repository (MANIFEST.md): {bad}"
    for p in (DATA / "licenses").iterdir():
        assert "Creative Commons" not in p.read_text(), p.name


def test_samples_equal_their_regeneration_from_shared_data(shared_data):
    """Provenance: make_samples.py regenerates tests/data byte for byte from ../shared/data (so this one needs it;
    without it it skips, under CI=true it fails)."""
    out = subprocess.run([sys.executable, str(DATA / "make_samples.py"), "--check", "--source", str(shared_data)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
