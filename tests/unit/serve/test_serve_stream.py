"""Streams metered by their server-sent events (serve.stream), whatever the chunk boundaries: no Ray, no vLLM
(but for the last test, which runs the ingress's own `_metered` and imports it).

    .venv/bin/python -m pytest tests/unit/serve/test_serve_stream.py -q
"""

from __future__ import annotations

import asyncio
import itertools
import json
import types

import pytest

from serve.stream import DONE, EventSplitter, StreamMeter, event_data, event_json

# What the old metering searched the raw text for; a generated text may contain any of it.
TRAPS = '"choices":[{ "usage":{ "choices":[] data: {"error" data: [DONE]\n\n'
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def chunk(text: str, finish: str | None = None) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "model": "base:city",
            "choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": None}


def sse(obj: object, compact: bool = True) -> str:
    # Non-ASCII unescaped, as vLLM's pydantic models write it.
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":") if compact else None,
                                                       ensure_ascii=False)
    return f"data: {data}\n\n"


TEXT_EVENTS = [sse(chunk("Par")), sse(chunk(TRAPS)), sse(chunk("is é\u2028", "stop"))]
# json.dumps' default separators: `"choices": []`, which a search for `"choices":[]` misses.
USAGE_EVENT = sse({"id": "cmpl-1", "choices": [], "usage": USAGE}, compact=False)
STREAM = "".join(TEXT_EVENTS) + USAGE_EVENT + sse(DONE)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def run(pieces: list[str], keep_usage: bool) -> tuple[str, StreamMeter]:
    meter = StreamMeter(keep_usage, clock=Clock())
    out = "".join(meter.feed(p) for p in pieces) + meter.close()
    return out, meter


def splits(text: str, cuts: tuple[int, ...]) -> list[str]:
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def check(out: str, meter: StreamMeter, keep_usage: bool) -> None:
    assert out == (STREAM if keep_usage else STREAM.replace(USAGE_EVENT, ""))
    assert meter.usage == USAGE and meter.tokens() == (7, 3)
    assert meter.done and not meter.failed
    assert (meter.first, meter.last) == (1.0, 3.0)  # one clock reading per event with choices: three


@pytest.mark.parametrize("keep_usage", [True, False])
def test_every_single_cut_gives_the_same_events_and_metrics(keep_usage):
    for cut in range(len(STREAM) + 1):
        check(*run(splits(STREAM, (cut,)), keep_usage), keep_usage)


def test_awkward_cuts_two_at_a_time_and_one_character_chunks():
    """Inside `data:`, between the two newlines, inside the JSON, inside the usage object and `[DONE]`."""
    marks = sorted({STREAM.index(s) + k for s in ("data:", "\n\n", '"usage": {', "[DONE]", "\u2028", "é")
                    for k in (0, 1, 2, 3)})
    for cuts in itertools.combinations(marks, 2):
        check(*run(splits(STREAM, cuts), False), False)
    check(*run(list(STREAM), True), True)


def test_text_that_contains_the_searched_substrings_is_text():
    out, meter = run([sse(chunk(TRAPS))], keep_usage=False)
    assert out == sse(chunk(TRAPS))  # kept, not taken for a usage chunk
    assert meter.usage == {} and not meter.failed and not meter.done and meter.first == 1.0
    assert event_json(sse(chunk(TRAPS)))["choices"][0]["text"] == TRAPS


def test_an_error_after_the_headers_fails_the_stream():
    err = sse({"error": {"message": "EngineCore encountered an issue", "type": "internal_error", "code": 500}})
    out, meter = run([sse(chunk("a")), err[:9], err[9:], sse(DONE)], keep_usage=True)
    assert meter.failed and meter.done and out == sse(chunk("a")) + err + sse(DONE)


def test_event_fields_crlf_and_a_last_event_without_its_blank_line():
    assert event_data("event: x\r\ndata: {\"a\":\r\ndata:1}\r\n\r\n") == '{"a":\n1}'
    assert event_json(": comment\n\n") is None and event_json("data: not json\n\n") is None
    assert event_json("data:[DONE]") == DONE
    splitter = EventSplitter()
    assert splitter.feed("data: 1\r\n\r\ndata: 2\n") == ["data: 1\r\n\r\n"]
    assert splitter.feed("\ndata: 3") == ["data: 2\n\n"] and splitter.rest() == "data: 3"
    out, meter = run(["data: [DO", "NE]"], keep_usage=True)  # the stream ended without the blank line
    assert out == "data: [DONE]" and meter.done


def test_continuous_usage_takes_the_last_count_and_keeps_the_text_chunks():
    events = [sse({**chunk("a"), "usage": {"prompt_tokens": 7, "completion_tokens": 1}}),
              sse({**chunk("b"), "usage": {"prompt_tokens": 7, "completion_tokens": 2}}),
              sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}})]
    out, meter = run(events, keep_usage=False)
    assert out == events[0] + events[1] and meter.tokens() == (7, 2)


def test_the_ingress_records_what_the_stream_said():
    """LoRAIngress._metered: the events pass through, the usage event is dropped when not asked for, and the
    request is recorded once with its tokens, status (200, 500 after an engine error, 499 when the client left)
    and token times."""
    from serve.ingress import LoRAIngress, Target

    def meter(pieces: list[str], *, keep_usage: bool = False, leave_after: int | None = None):
        records: list[tuple] = []
        fake = types.SimpleNamespace(_record=lambda *a, **k: records.append((a, k)))

        async def events():
            for p in pieces:
                yield p

        async def consume() -> str:
            out = []
            gen = LoRAIngress._metered(fake, events(), Target("base:city"), 0.0, keep_usage)
            async for text in gen:
                out.append(text)
                if leave_after is not None and len(out) == leave_after:
                    await gen.aclose()  # what Starlette does when the client disconnects
                    break
            return "".join(out)

        return asyncio.run(consume()), records

    out, records = meter([STREAM[:50], STREAM[50:200], STREAM[200:]])
    assert out == STREAM.replace(USAGE_EVENT, "")
    [(args, kwargs)] = records
    assert args[1:] == (200, 0.0, 7, 3) and kwargs["ttft_s"] > 0 and kwargs["tpot_s"] >= 0
    err = sse({"error": {"message": "boom", "code": 500}})
    assert meter([sse(chunk("a")), err])[1][0][0][1] == 500
    out, records = meter(TEXT_EVENTS, leave_after=1)
    assert out == TEXT_EVENTS[0] and records[0][0][1] == 499
