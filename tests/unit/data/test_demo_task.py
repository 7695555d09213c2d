"""The demo task's held-out file measures the task, not memory: no city, sentence or demo prompt of it is in the
training file, it writes some dates in forms the training file never uses, and the files are what the generator
writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from pipelines.demo import generator

REPO = Path(__file__).resolve().parents[3]
MONTHS = "|".join(generator.MONTHS)


def rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cities(data: list[dict[str, str]]) -> set[str]:
    return {json.loads(r["output"])["city"] for r in data}


def mentions(sentence: str, names: set[str]) -> set[str]:
    return {c for c in names if re.search(rf"(?<!\w){re.escape(c)}(?!\w)", sentence)}


def date_form(date: str) -> str:
    """'4 June' -> 'D Month', 'June 4th' -> 'Month Dth', '4 June 2026' -> 'D Month YYYY'."""
    date = re.sub(rf"\b({MONTHS})\b", "Month", date)
    date = re.sub(r"\b\d{4}\b", "YYYY", date)
    return re.sub(r"\b\d{1,2}(st|nd|rd|th)\b", "Dth", re.sub(r"\b\d{1,2}\b", "D", date))


@pytest.fixture(scope="module")
def train():
    return rows(generator.DEMO_FILE)


@pytest.fixture(scope="module")
def test():
    return rows(generator.TEST_FILE)


@pytest.fixture(scope="module")
def demo_sentences():
    cfg = yaml.safe_load((REPO / "configs" / "quickstart-cpu.yaml").read_text())
    return [p.split("\n\n", 1)[1] for p in cfg["demo"]["prompts"]]


def test_rows_are_alpaca_with_the_spans_of_their_sentence(train, test):
    for r in train + test:
        assert set(r) == {"instruction", "input", "output"}
        answer = json.loads(r["output"])
        assert list(answer) == ["city", "date"] and r["output"] == json.dumps(answer)
        assert answer["city"] in r["input"] and answer["date"] in r["input"], r


def test_held_out_file_shares_no_city_and_no_sentence_with_the_training_file(train, test):
    seen = cities(train)
    assert len(seen) >= 100 and len(cities(test)) >= 20
    assert sum(" " in c for c in cities(test)) >= 5  # multi-word cities too
    assert not cities(test) & seen
    assert not [r["input"] for r in test if mentions(r["input"], seen)]
    assert not {r["input"] for r in test} & {r["input"] for r in train}


def test_held_out_file_writes_dates_in_forms_the_training_file_never_uses(train, test):
    train_forms = {date_form(json.loads(r["output"])["date"]) for r in train}
    test_forms = [date_form(json.loads(r["output"])["date"]) for r in test]
    assert len(train_forms) >= 4
    unseen = [f for f in test_forms if f not in train_forms]
    assert len(set(unseen)) >= 2 and len(unseen) >= len(test) // 4


def test_demo_prompts_ask_about_cities_and_sentences_the_training_file_never_has(train, demo_sentences):
    assert len(demo_sentences) == 3
    assert not [s for s in demo_sentences if mentions(s, cities(train))]
    assert not set(demo_sentences) & {r["input"] for r in train}
    assert {c for s in demo_sentences for c in mentions(s, set(generator.DEMO_CITIES))} == set(generator.DEMO_CITIES)


def test_files_are_what_the_generator_writes(train, test):
    assert train == generator.generate()
    assert test == generator.held_out()
    assert not set(generator.TRAIN_CITIES) & (set(generator.TEST_CITIES) | set(generator.DEMO_CITIES))
    assert not set(generator.TEST_CITIES) & set(generator.DEMO_CITIES)
