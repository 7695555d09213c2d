"""An OpenAI stream read as server-sent events while it passes to the client. Pure: no Ray, no vLLM.

The text arrives in chunks cut anywhere. An event ends at a blank line (`\\n\\n`, or `\\r\\n\\r\\n`); its
`data:` lines (the one space after the colon dropped, several lines joined by a newline) hold one JSON object,
or `[DONE]` at the end of the stream. An incomplete event waits for the rest; complete events pass on unchanged
and in order, and whatever is left when the stream ends passes on as it is.

From the JSON objects the meter takes what the request metrics need: when the first and the last event carrying
choices (generated text) arrived, the token counts of the latest `usage` object, and whether the engine sent an
`error` object. A usage-only event (empty `choices`) the client did not ask for is dropped.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

DONE = "[DONE]"
_EVENT_END = re.compile(r"\r?\n\r?\n")
_LINE_END = re.compile(r"\r\n|\r|\n")  # SSE's line ends only (str.splitlines also splits at U+2028 in a text)


def event_data(event: str) -> str | None:
    """The data of one event (its `data:` lines joined), None when it has none."""
    lines = [line[5:].removeprefix(" ") for line in _LINE_END.split(event) if line.startswith("data:")]
    return "\n".join(lines) if lines else None


def event_json(event: str) -> Any:
    """The data of one event as JSON: a dict for an OpenAI chunk, DONE for the end, None for anything else."""
    data = event_data(event)
    if data is None:
        return None
    if data.strip() == DONE:
        return DONE
    try:
        return json.loads(data)
    except ValueError:
        return None


class EventSplitter:
    """Chunks of SSE text in, complete events out (each with its terminating blank line, as received)."""

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, text: str) -> list[str]:
        self._buffer += text
        events, start = [], 0
        for end in _EVENT_END.finditer(self._buffer):
            events.append(self._buffer[start:end.end()])
            start = end.end()
        self._buffer = self._buffer[start:]
        return events

    def rest(self) -> str:
        """What is left after the last complete event (an event the stream ended without terminating)."""
        rest, self._buffer = self._buffer, ""
        return rest


class StreamMeter:
    """Pass an OpenAI SSE stream through (`feed` each chunk, `close` at the end, forward what they return) and
    note what the request metrics need: `first` and `last` (clock times of events carrying choices), `usage`
    (the latest usage object), `failed` (the engine sent an error object), `done` (`[DONE]` arrived)."""

    def __init__(self, keep_usage: bool, clock: Callable[[], float] = time.monotonic):
        self.keep_usage, self._clock = keep_usage, clock
        self._events = EventSplitter()
        self.usage: dict[str, int] = {}
        self.first: float | None = None
        self.last: float | None = None
        self.failed = self.done = False
        self.text: list[str] | None = None  # set to [] to gather the first choice's text (serve.judging)

    def feed(self, text: str) -> str:
        return "".join(e for e in self._events.feed(text) if self._keep(e))

    def close(self) -> str:
        rest = self._events.rest()
        return rest if rest and self._keep(rest) else ""

    def _keep(self, event: str) -> bool:
        """Note what the event says; False for a usage-only event the client did not ask for."""
        data = event_json(event)
        if data == DONE:
            self.done = True
            return True
        if not isinstance(data, dict):
            return True
        if data.get("error") is not None:
            self.failed = True
        choices = data.get("choices")
        if choices:
            self.last = self._clock()
            self.first = self.first if self.first is not None else self.last
            if self.text is not None:
                self.text += [c.get("text") or (c.get("delta") or {}).get("content") or "" for c in choices
                              if isinstance(c, dict) and c.get("index", 0) == 0]
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]
            return self.keep_usage or choices != []
        return True

    def tokens(self) -> tuple[int, int]:
        """(prompt tokens, completion tokens) of the stream's usage; zeros without one."""
        return self.usage.get("prompt_tokens", 0), self.usage.get("completion_tokens", 0)
