"""Curated record → token ids + assistant-only labels, with a truncation policy that never cuts an answer. Pure."""

from __future__ import annotations

from typing import Any

from pipelines.formatting import IGNORE_INDEX, RowError, tokenize_messages


def tokenize_record(tokenizer, body: str, rec: Any, max_length: int, truncation: str) -> tuple[list, list, int]:
    """(input_ids, labels, exchanges dropped). body 'messages' → chat template with labels on assistant turns
    (EOS / end-of-turn included); body 'text' → the text's tokens + EOS, all learned. Raises RowError."""
    if body == "text":
        ids = list(tokenizer(rec, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        if len(ids) > max_length:
            raise RowError("too_long", f"{len(ids)} tokens > max_length {max_length}")
        return ids, [IGNORE_INDEX] + ids[1:], 0
    messages = [{"role": m["role"], "content": m["content"]} for m in rec]
    dropped = 0
    while True:
        try:
            tok = tokenize_messages(tokenizer, messages, max_length)
            return tok.input_ids, tok.labels, dropped
        except RowError as e:
            if e.reason != "too_long" or truncation != "drop_oldest_turns":
                raise
            shorter = drop_oldest_exchange(messages)
            if shorter is None:
                raise RowError("too_long", e.detail + " (even with only the last exchange)") from None
            messages, dropped = shorter, dropped + 1


def drop_oldest_exchange(messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """Remove the first user…assistant exchange after the system turns; None when only the last one is left."""
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= start]
    if len(assistants) < 2:
        return None
    return messages[:start] + messages[assistants[0] + 1:]
