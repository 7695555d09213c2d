"""Pure formatting: raw rows → chat messages → token ids with assistant-only labels. No Ray, no torch.

Labels are found by rendering prefixes of the conversation with the tokenizer's own chat template: the tokens
between "everything before assistant turn i, plus the generation prompt" and "everything through turn i" are
turn i's answer (its end-of-turn token included, so the model learns to stop). A template whose renderings are
not prefixes of each other would make that wrong, so it is checked rather than assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.data.rowformats import RowError

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                        return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding regardless
        ids = ids["input_ids"]
    return list(ids)


def tokenize_messages(tokenizer, messages: list[dict[str, str]], max_length: int) -> Tokenized:
    """Token ids of the whole conversation, labels only on assistant tokens (each turn's end token included).

    A conversation longer than max_length is refused (RowError 'too_long'), never cut: a cut answer would teach
    the model to stop mid-sentence, and a silently dropped answer would hide data loss.
    """
    full = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], generation_prompt=True)
        end = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if full[: len(start)] != start or full[: len(end)] != end:
            raise ValueError("the tokenizer's chat template does not render conversations as prefixes of each "
                             "other; assistant-only labels cannot be derived from it")
        labels[len(start): len(end)] = full[len(start): len(end)]
    if not any(t != IGNORE_INDEX for t in labels):
        raise RowError("no_assistant_tokens", "the conversation has no assistant turn to learn from")
    if len(full) > max_length:
        raise RowError("too_long", f"{len(full)} tokens > max_length {max_length}")
    return Tokenized(full, labels)


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, list[list[int]]]:
    """Right-pad a batch of (input_ids, labels): padding is masked out of attention and of the loss."""
    width = max(len(ids) for ids, _ in rows)
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for ids, labels in rows:
        pad = width - len(ids)
        out["input_ids"].append(list(ids) + [pad_id] * pad)
        out["labels"].append(list(labels) + [IGNORE_INDEX] * pad)
        out["attention_mask"].append([1] * len(ids) + [0] * pad)
    return out


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
