"""The demo task, written by this project: pull the city and the date out of a sentence as strict JSON.

Small models answer this loosely (prose, wrong keys, extra words); a few minutes of LoRA make them answer
`{"city": "...", "date": "..."}` and nothing else, which is easy to see and to check exactly. The answer's date
is the date as the sentence writes it, so the task is copying two spans, not knowing a list.

    python -m pipelines.demo.generator           # rewrites city_date.jsonl and city_date_test.jsonl (deterministic)

city_date_test.jsonl is the held-out split the quickstart evaluates and gates on, and it measures the task, not
memory: its cities are never in the training file (TEST_CITIES is disjoint from TRAIN_CITIES, single- and
multi-word), some of its rows write the date in a form the training file never uses (TEST_DATE_FORMS), and some
use sentence templates the training file never uses (TEST_TEMPLATES). DEMO_CITIES, the cities of the demo
prompts in configs/quickstart-cpu.yaml, are in neither file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DEMO_FILE = Path(__file__).parent / "city_date.jsonl"
TEST_FILE = Path(__file__).parent / "city_date_test.jsonl"

TRAIN_CITIES = [
    "Lisbon", "Nairobi", "Lima", "Hanoi", "Toronto", "Krakow", "Osaka", "Denver", "Seville", "Tunis", "Perth",
    "Bergen", "Quito", "Dublin", "Manila", "Porto", "Ghent", "Cairo", "Lyon", "Zurich", "Mumbai", "Helsinki",
    "Tallinn", "Accra", "Boston", "Malmo", "Split", "Berlin", "Madrid", "Vienna", "Prague", "Budapest", "Warsaw",
    "Athens", "Istanbul", "Dubai", "Doha", "Karachi", "Dhaka", "Bangkok", "Jakarta", "Seoul", "Taipei",
    "Shanghai", "Beijing", "Sydney", "Melbourne", "Auckland", "Wellington", "Vancouver", "Montreal", "Chicago",
    "Seattle", "Miami", "Atlanta", "Dallas", "Houston", "Phoenix", "Bogota", "Caracas", "Havana", "Montevideo",
    "Asuncion", "Lagos", "Kampala", "Dakar", "Casablanca", "Marrakesh", "Algiers", "Riga", "Vilnius", "Minsk",
    "Kyiv", "Bucharest", "Sofia", "Belgrade", "Zagreb", "Ljubljana", "Bratislava", "Munich", "Hamburg",
    "Cologne", "Frankfurt", "Antwerp", "Rotterdam", "Utrecht", "Geneva", "Basel", "Milan", "Turin", "Naples",
    "Palermo", "Marseille", "Bordeaux", "Toulouse", "Nantes", "Valencia", "Bilbao", "Granada", "Glasgow",
    "Edinburgh", "Cardiff", "Belfast", "Leeds", "Manchester", "Liverpool", "Gothenburg", "Uppsala", "Aarhus",
    "Tampere", "Trondheim", "Chennai", "Pune", "Jaipur", "Kolkata", "Colombo", "Kathmandu", "Almaty",
    "Tashkent", "Baku", "Tbilisi", "Yerevan", "Amman", "Beirut", "Muscat", "Manaus", "Recife", "Cusco",
    "New York", "Buenos Aires", "Cape Town", "Rio de Janeiro", "San Francisco", "Kuala Lumpur", "Tel Aviv",
    "Mexico City", "Hong Kong", "New Delhi", "Los Angeles", "San Diego", "Las Palmas", "Port Louis",
    "Santo Domingo", "Dar es Salaam", "Le Havre", "Den Haag", "Novi Sad", "Saint Petersburg",
    "Panama City", "Puerto Vallarta", "Santa Fe", "El Paso", "New Orleans", "Kansas City", "Cluj Napoca",
]
TEST_CITIES = [
    "Windhoek", "Ulaanbaatar", "Tromso", "Bamako", "Nouakchott", "Thimphu", "Paramaribo", "Valletta",
    "Yaounde", "Lusaka", "Hobart", "Darwin", "Akureyri", "Sapporo", "Busan", "Chiang Mai", "Luang Prabang",
    "Ho Chi Minh City", "Addis Ababa", "Salt Lake City", "Abu Dhabi", "Sao Paulo", "Port Moresby",
    "Santa Cruz de Tenerife", "Bandar Seri Begawan", "Kota Kinabalu",
]
DEMO_CITIES = ["Oslo", "Reykjavik", "Kyoto"]

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
NAMES = ["Ana", "Ben", "Chidi", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena",
         "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tariq", "Uma", "Viktor", "Wen", "Yara",
         "Aiko", "Bruno", "Carmen", "Deniz", "Elif", "Femi", "Greta", "Hugo", "Ines", "Jonas", "Kofi", "Lucia"]
EVENTS = ["conference", "wedding", "team offsite", "product launch", "marathon", "book fair", "workshop",
          "board meeting", "concert", "hackathon", "trade show", "family reunion", "film festival", "job interview",
          "chess tournament", "design review", "cooking class", "jazz night", "science fair", "sales kickoff"]


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


# How a date is written; the answer's date is exactly this text.
TRAIN_DATE_FORMS = {
    "D Month": lambda d, m, y: f"{d} {m}",
    "Month D": lambda d, m, y: f"{m} {d}",
    "Dth of Month": lambda d, m, y: f"{_ordinal(d)} of {m}",
    "D Month YYYY": lambda d, m, y: f"{d} {m} {y}",
    "Month D, YYYY": lambda d, m, y: f"{m} {d}, {y}",
}
TEST_DATE_FORMS = {
    "Month Dth": lambda d, m, y: f"{m} {_ordinal(d)}",
    "Dth Month": lambda d, m, y: f"{_ordinal(d)} {m}",
}

TRAIN_TEMPLATES = [
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
    "{city} hosts the {event} on {date} this year.",
    "Tickets for the {event} ({city}, {date}) sell out fast.",
    "{name} lands in {city} on {date} for the {event}.",
    "From {date}, {name} works from the office in {city}.",
    "The {event} is in {city} on {date}, so {name} needs a visa.",
    "Reminder for {name}: {event}, {city}, {date}.",
    "{name} moved the {event} to {date} and to {city}.",
    "Is the {event} in {city} still on {date}?",
    "{name} takes the night train to {city} on {date}.",
    "We open a new shop in {city} on {date}.",
]
TEST_TEMPLATES = [
    "Heads up: {name} is flying out to {city} on {date} for a {event}.",
    "The organisers confirmed {city} as the venue for the {event} on {date}.",
    "I will be in {city} on {date}, call me there.",
    "Postcard from {name}: arrived in {city}, home again on {date}.",
]
INSTRUCTIONS = [
    "Extract the city and the date from the sentence. Answer with JSON only.",
    "Return the city and the date mentioned below as a JSON object.",
    "What city and what date does this sentence mention? Reply in JSON.",
]


def _row(rng: random.Random, city: str, templates: list[str], forms: dict) -> dict[str, str]:
    name, event = rng.choice(NAMES), rng.choice(EVENTS)
    form = forms[rng.choice(sorted(forms))]
    date = form(rng.randint(1, 28), rng.choice(MONTHS), rng.randint(2024, 2028))
    sentence = rng.choice(templates).format(name=name, city=city, date=date, event=event)
    return {"instruction": rng.choice(INSTRUCTIONS), "input": sentence,
            "output": json.dumps({"city": city, "date": date})}


def generate(n: int = 600, seed: int = 0) -> list[dict[str, str]]:
    """n training rows (Alpaca: instruction, input, output) with exact JSON answers: TRAIN_CITIES,
    TRAIN_TEMPLATES and TRAIN_DATE_FORMS only."""
    rng = random.Random(seed)
    return [_row(rng, rng.choice(TRAIN_CITIES), TRAIN_TEMPLATES, TRAIN_DATE_FORMS) for _ in range(n)]


def held_out(n: int = 40, seed: int = 1000) -> list[dict[str, str]]:
    """n held-out rows, TEST_CITIES only: a quarter each of (training template, training date form),
    (test-only template, training date form), (training template, test-only date form) and (test-only
    template, test-only date form), interleaved so that any first rows mix all four; every test city is used
    before one repeats."""
    rng = random.Random(seed)
    cities = [c for _ in range(n // len(TEST_CITIES) + 1) for c in rng.sample(TEST_CITIES, len(TEST_CITIES))]
    kinds = [(TRAIN_TEMPLATES, TRAIN_DATE_FORMS), (TEST_TEMPLATES, TRAIN_DATE_FORMS),
             (TRAIN_TEMPLATES, TEST_DATE_FORMS), (TEST_TEMPLATES, TEST_DATE_FORMS)]
    return [_row(rng, cities[i], *kinds[i % len(kinds)]) for i in range(n)]


CORPUS_FILE = Path(__file__).parent / "tokenizer_corpus.txt"


def tokenizer_corpus() -> list[str]:
    """Text to train the tiny test tokenizer on: 300 city/date sentences with their instructions and answers
    (tokenizer_corpus.txt, fixed: the tiny model every test builds must not change when the demo rows do) plus
    generic English words."""
    rows = CORPUS_FILE.read_text().splitlines()
    extra = ("The quick brown fox jumps over the lazy dog. Answer the question. Write a short poem about the sea. "
             "Explain why the sky is blue. Summarize the following text. Translate to French. You are a helpful "
             "assistant. What is two plus two? The answer is four. Give three reasons. user system assistant")
    return rows + [extra] * 20


def write(path: Path = DEMO_FILE, n: int = 600, seed: int = 0, rows: list[dict[str, str]] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in rows if rows is not None else generate(n, seed):
            fh.write(json.dumps(row) + "\n")
    return path


if __name__ == "__main__":
    assert not set(TRAIN_CITIES) & (set(TEST_CITIES) | set(DEMO_CITIES)), "a held-out city is a training city"
    assert not set(TEST_CITIES) & set(DEMO_CITIES), "a demo prompt's city is a test city"
    print(write())
    print(write(TEST_FILE, rows=held_out()))
