"""The demo task, written by this project: pull the city and the date out of a sentence as strict JSON.

Small models answer this loosely (prose, wrong keys, extra words); a few minutes of LoRA make them answer
`{"city": "...", "date": "..."}` and nothing else, which is easy to see and to check exactly.

    python -m pipelines.demo.generator           # rewrites city_date.jsonl and city_date_test.jsonl (deterministic)

city_date_test.jsonl is the held-out split the quickstart evaluates and gates on: other seed, and no sentence
that is in the training file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DEMO_FILE = Path(__file__).parent / "city_date.jsonl"
TEST_FILE = Path(__file__).parent / "city_date_test.jsonl"

CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Toronto", "Krakow", "Osaka", "Denver", "Seville",
          "Tunis", "Perth", "Bergen", "Quito", "Dublin", "Manila", "Porto", "Ghent", "Austin", "Cairo",
          "Lyon", "Zurich", "Santiago", "Mumbai", "Helsinki", "Tallinn", "Accra", "Boston", "Malmo", "Split"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
NAMES = ["Ana", "Ben", "Chidi", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena",
         "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tariq", "Uma", "Viktor", "Wen", "Yara"]
EVENTS = ["conference", "wedding", "team offsite", "product launch", "marathon", "book fair", "workshop",
          "board meeting", "concert", "hackathon", "trade show", "family reunion"]
TEMPLATES = [
    "{name} will fly to {city} on {date} for the {event}.",
    "The {event} takes place in {city} on {date}.",
    "On {date}, {name} is giving a talk at the {event} in {city}.",
    "Please book a hotel in {city} for the night of {date}.",
    "Our {event} moved to {city}; the new date is {date}.",
    "{name} arrives in {city} on {date} and leaves two days later.",
    "Save the date: {date}, {city}, the annual {event}.",
    "Can you remind me that the {event} in {city} starts on {date}?",
    "{name} and the team meet in {city} on {date}.",
    "After the {event}, {name} stays in {city} until {date}.",
]
INSTRUCTIONS = [
    "Extract the city and the date from the sentence. Answer with JSON only.",
    "Return the city and the date mentioned below as a JSON object.",
    "What city and what date does this sentence mention? Reply in JSON.",
]


def generate(n: int = 600, seed: int = 0) -> list[dict[str, str]]:
    """n Alpaca-style rows (instruction, input, output) with exact JSON answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        city, name, event = rng.choice(CITIES), rng.choice(NAMES), rng.choice(EVENTS)
        date = f"{rng.randint(1, 28)} {rng.choice(MONTHS)}"
        sentence = rng.choice(TEMPLATES).format(name=name, city=city, date=date, event=event)
        rows.append({"instruction": rng.choice(INSTRUCTIONS), "input": sentence,
                     "output": json.dumps({"city": city, "date": date})})
    return rows


def tokenizer_corpus() -> list[str]:
    """Text to train the tiny test tokenizer on: the demo rows plus generic English words."""
    rows = generate(300, seed=1)
    extra = ("The quick brown fox jumps over the lazy dog. Answer the question. Write a short poem about the sea. "
             "Explain why the sky is blue. Summarize the following text. Translate to French. You are a helpful "
             "assistant. What is two plus two? The answer is four. Give three reasons. user system assistant")
    return [f"{r['instruction']} {r['input']} {r['output']}" for r in rows] + [extra] * 20


def held_out(n: int = 40, seed: int = 1000, train_n: int = 600, train_seed: int = 0) -> list[dict[str, str]]:
    """n rows from another seed whose sentence is not in the training rows."""
    seen = {r["input"] for r in generate(train_n, train_seed)}
    return [r for r in generate(n * 2, seed) if r["input"] not in seen][:n]


def write(path: Path = DEMO_FILE, n: int = 600, seed: int = 0, rows: list[dict[str, str]] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in rows if rows is not None else generate(n, seed):
            fh.write(json.dumps(row) + "\n")
    return path


if __name__ == "__main__":
    print(write())
    print(write(TEST_FILE, rows=held_out()))
