"""Row formats → one normalised form per kind. Pure: no Ray, no torch.

kind "sft":        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}  (from Alpaca,
                   OpenAI role/content, ShareGPT from/value, TRL prompt/completion: strings or turn lists)
kind "text":       {"text": str}                                                              (raw text)
kind "preference": {"prompt": [messages], "chosen": str, "rejected": str}                     (prompt/chosen/
                   rejected pairs, and dialogue pairs whose chosen/rejected hold the whole conversation)
kind "unpaired":   {"prompt": [messages], "completion": str, "label": bool}                   (KTO's unpaired
                   feedback: prompt/completion/label, label true = desirable; thumbs-up fields via columns.label)

Every refusal is a `RowError` with a short reason that the curation report counts.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal


class RowError(ValueError):
    """A row that cannot be used, with a short machine-readable reason (counted in the stage report)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def alpaca_to_messages(row: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """instruction (+ input) → user turn, output → assistant turn. Raises RowError naming the bad field."""
    for field in ("instruction", "output"):
        if field not in row or row[field] is None:
            raise RowError("missing_field", f"field {field!r} is missing")
        if not isinstance(row[field], str):
            raise RowError("wrong_type", f"field {field!r} is {type(row[field]).__name__}, expected string")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise RowError("wrong_type", f"field 'input' is {type(extra).__name__}, expected string")
    instruction, output = row["instruction"].strip(), row["output"].strip()
    if not instruction:
        raise RowError("empty_turn", "field 'instruction' is empty")
    if not output:
        raise RowError("empty_turn", "field 'output' is empty")
    user = instruction + ("\n\n" + extra.strip() if extra.strip() else "")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


Format = Literal["auto", "alpaca", "messages", "prompt_completion", "preference", "dialogue", "unpaired", "text"]
KIND = {"alpaca": "sft", "messages": "sft", "prompt_completion": "sft", "text": "text", "preference": "preference",
        "dialogue": "preference", "unpaired": "unpaired"}
SUPPORTED = ("alpaca (instruction/input/output), messages or conversations (role/content, from/value), "
             "prompt + completion (strings or turn lists), prompt + chosen + rejected, chosen + rejected holding "
             "whole dialogues, prompt + completion + label (unpaired feedback, for KTO), text")
# What a label field may say: true / 1 / "up" ... = desirable, false / 0 / "down" ... = undesirable.
_LABELS = {**dict.fromkeys(("true", "1", "yes", "up", "thumbs_up", "good", "desirable", "positive", "accept",
                            "accepted", "chosen", "+1", "\U0001f44d"), True),
           **dict.fromkeys(("false", "0", "no", "down", "thumbs_down", "bad", "undesirable", "negative", "reject",
                            "rejected", "-1", "\U0001f44e"), False)}
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "model": "assistant", "bot": "assistant"}
# Anthropic HH style: one string holding the whole dialogue ("\n\nHuman: ...\n\nAssistant: ...").
_HH_TURN = re.compile(r"\n\n(Human|Assistant|System):[ ]?")


# data.columns: our roles -> a path into the file's row: `field`, `a.b`, `instances[0].input` (dots between
# names, [i] to take the i-th element of a list).
ROLES = ("instruction", "input", "output", "prompt", "completion", "chosen", "rejected", "label", "messages", "text")
_PATH = re.compile(r"[A-Za-z_][\w-]*(?:\[\d+\])*(?:\.[A-Za-z_][\w-]*(?:\[\d+\])*)*")
_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def check_columns(columns: dict[str, str]) -> None:
    """ValueError naming the first unknown role or malformed path of a data.columns mapping."""
    for role, path in columns.items():
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: the roles are {', '.join(ROLES)}")
        if not isinstance(path, str) or not _PATH.fullmatch(path):
            raise ValueError(f"{role}: {path!r} is not a field path (write e.g. question, a.b or instances[0].input)")


def apply_columns(row: dict[str, Any], columns: dict[str, str], key: str = "data.columns") -> dict[str, Any]:
    """The row with each mapped role set from its path (the row's other fields kept); RowError missing_field
    naming the config key, role and path when the row lacks it."""
    if not columns:
        return row
    out = dict(row)
    for role, path in columns.items():
        value: Any = row
        for name, index in _STEP.findall(path):
            try:
                value = value[name] if name else value[int(index)]
            except (KeyError, IndexError, TypeError):
                raise RowError("missing_field", f"{key}.{role}: {path!r} is not in the row (fields "
                                                f"{sorted(row)[:8]})") from None
        out[role] = value
    return out


PROMPT_FIELDS = ("question", "query", "prompt", "problem", "instruction", "input", "context", "source")
ANSWER_FIELDS = ("answer", "response", "completion", "output", "solution", "target", "reply", "label_text")


def format_hint(rows: list[dict[str, Any]], fmt: str, columns: dict[str, str]) -> str:
    """What to write when rows do not fit: the fields seen in `rows` (a file's first objects), the formats
    tried, and a data.columns line guessed from the field names."""
    fields = sorted({k for r in rows for k in r})
    tried = SUPPORTED if fmt == "auto" else f"{fmt} only (data.format={fmt}; auto tries: {SUPPORTED})"
    prompt = next((f for f in PROMPT_FIELDS if f in fields), None)
    answer = next((f for f in ANSWER_FIELDS if f in fields and f != prompt), None)
    line = (f"data.columns: {{prompt: {prompt}, completion: {answer}}}" if prompt and answer else
            "data.columns: {prompt: <question field>, completion: <answer field>}")
    mapped = f" with data.columns={columns}" if columns else ""
    return f"fields seen {fields[:12]}; formats tried{mapped}: {tried}; to map your fields write e.g. `{line}`"


def parse_raw(raw: str) -> dict[str, Any]:
    """JSON text → object; RowError broken_json (also: nested too deep, a number of more digits than Python
    converts) / not_an_object."""
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RowError("broken_json", f"{e.msg} at column {e.colno}") from None
    except RecursionError:
        raise RowError("broken_json", "nested too deep") from None
    except ValueError as e:  # an integer of over 4300 digits (sys.set_int_max_str_digits)
        raise RowError("broken_json", " ".join(str(e).split())[:200]) from None
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"a JSON {type(row).__name__}, expected an object")
    return row


def detect_format(row: dict[str, Any]) -> str:
    if "messages" in row or "conversations" in row:
        return "messages"
    if "chosen" in row and "rejected" in row:
        conv = isinstance(row["chosen"], list) or (isinstance(row["chosen"], str) and _HH_TURN.search(row["chosen"]))
        return "dialogue" if conv and "prompt" not in row else "preference"
    if "completion" in row and "label" in row:
        return "unpaired"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    if "prompt" in row:
        raise RowError("unsupported_format", "prompt-only rows have no answer to learn; give each a completion "
                                             "(or chosen/rejected for DPO)")
    raise RowError("missing_field", f"no known format fits the fields {sorted(row)[:8]}")


def to_canonical(row: dict[str, Any], fmt: str, system_prompt: str | None = None) -> tuple[str, dict[str, Any]]:
    """A parsed row in format `fmt` ('auto' detects) → (kind, normalised record). Raises RowError."""
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "alpaca":
        try:
            return "sft", {"messages": alpaca_to_messages(row, system_prompt)}
        except RowError as e:
            if e.reason == "missing_field" and "instruction" not in row:
                try:
                    seen = detect_format(row)
                except RowError:
                    raise e from None
                raise RowError(e.reason, f"{e.detail}; the row looks like format {seen!r}: set data.format=auto "
                                         f"(or {seen})") from None
            raise
    if fmt == "messages":
        msgs = messages_of(row.get("messages", row.get("conversations")), "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise RowError("missing_field", "the conversation has no assistant turn")
        if system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system_prompt}] + msgs
        return "sft", {"messages": msgs}
    if fmt == "prompt_completion":
        return "sft", {"messages": prompt_completion_messages(row, system_prompt)}
    if fmt == "text":
        return "text", {"text": _text(row, "text")}
    if fmt in ("preference", "dialogue"):
        if fmt == "dialogue":
            pair = dialogue_pair(row)
        else:
            prompt = row.get("prompt")
            msgs = messages_of(prompt, "prompt") if isinstance(prompt, list) else [
                {"role": "user", "content": _text(row, "prompt")}]
            pair = {"prompt": msgs, "chosen": _answer(row, "chosen"), "rejected": _answer(row, "rejected")}
        if pair["chosen"].strip() == pair["rejected"].strip():
            raise RowError("identical_pair", "chosen and rejected are the same text")
        return "preference", pair
    if fmt == "unpaired":
        prompt = row.get("prompt")
        msgs = messages_of(prompt, "prompt") if isinstance(prompt, list) else [
            {"role": "user", "content": _text(row, "prompt")}]
        return "unpaired", {"prompt": msgs, "completion": _answer(row, "completion"), "label": label_of(row)}
    raise ValueError(f"unknown format {fmt!r}")


def label_of(row: dict[str, Any]) -> bool:
    """An unpaired row's label as desirable (True) or not: a boolean, 0/1, or a word such as up/down, good/bad,
    thumbs_up/thumbs_down (any case); RowError naming the value otherwise."""
    v = row.get("label")
    if v is None:
        raise RowError("missing_field", "field 'label' is missing")
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().casefold() in _LABELS:
        return _LABELS[v.strip().casefold()]
    raise RowError("wrong_type", f"field 'label' is {v!r}: expected true/false (or 1/0, up/down, good/bad, "
                                 "thumbs_up/thumbs_down)")


def unpaired_view(pair: dict[str, Any]) -> list[dict[str, Any]]:
    """The KTO view of a normalised preference pair: its chosen answer desirable, its rejected one not."""
    return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]


def prompt_completion_messages(row: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """TRL's prompt-completion type: strings (standard) or turn lists (conversational) → one conversation whose
    completion is the assistant's part."""
    if isinstance(row.get("prompt"), list):
        msgs = messages_of(row["prompt"], "prompt")
    else:
        msgs = [{"role": "user", "content": _text(row, "prompt")}]
    if isinstance(row.get("completion"), list):
        answer = messages_of(row["completion"], "completion")
        if any(m["role"] != "assistant" for m in answer):
            raise RowError("wrong_type", "field 'completion' may hold assistant turns only")
    else:
        answer = [{"role": "assistant", "content": _text(row, "completion")}]
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs + answer


def messages_of(value: Any, field: str) -> list[dict[str, str]]:
    """OpenAI role/content or ShareGPT from/value turns → [{'role', 'content'}]; RowError on any bad turn."""
    if value is None:
        raise RowError("missing_field", f"field {field!r} is missing")
    if not isinstance(value, list):
        raise RowError("wrong_type", f"field {field!r} is {type(value).__name__}, expected a list of turns")
    if not value:
        raise RowError("empty_turn", f"field {field!r} has no turns")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowError("wrong_type", f"{field}[{i}] is {type(turn).__name__}, expected an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role is None or content is None:
            raise RowError("missing_field", f"{field}[{i}] needs role/content (or from/value)")
        if not isinstance(role, str) or not isinstance(content, str):
            raise RowError("wrong_type", f"{field}[{i}] role and content must be strings")
        if role.lower() not in _ROLES:
            raise RowError("wrong_type", f"{field}[{i}] has unknown role {role!r}")
        if not content.strip():
            raise RowError("empty_turn", f"{field}[{i}] ({role}) is empty")
        out.append({"role": _ROLES[role.lower()], "content": content})
    return out


def dialogue_pair(row: dict[str, Any]) -> dict[str, Any]:
    """chosen/rejected each hold a whole conversation: split both at their last assistant turn.

    The prompt is taken from `chosen` (the two prompts may differ slightly, e.g. in whitespace; that is allowed).
    """
    sides = {}
    for side in ("chosen", "rejected"):
        v = row.get(side)
        if v is None:
            raise RowError("missing_field", f"field {side!r} is missing")
        msgs = messages_of(v, side) if isinstance(v, list) else _hh_messages(v, side)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise RowError("missing_field", f"{side!r} has no assistant turn after a prompt")
        sides[side] = (msgs[:last], msgs[last]["content"])
    return {"prompt": sides["chosen"][0], "chosen": sides["chosen"][1], "rejected": sides["rejected"][1]}


def _hh_messages(value: Any, side: str) -> list[dict[str, str]]:
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field {side!r} is {type(value).__name__}, expected a conversation")
    parts = _HH_TURN.split(value if value.startswith("\n\n") else "\n\n" + value)
    turns = [{"role": _ROLES[r.lower()], "content": c.strip()}
             for r, c in zip(parts[1::2], parts[2::2])]
    if not turns:
        raise RowError("wrong_type", f"field {side!r} is not a Human:/Assistant: dialogue")
    for i, t in enumerate(turns):
        if not t["content"] and i != len(turns) - 1:
            raise RowError("empty_turn", f"{side}: turn {i} ({t['role']}) is empty")
    if not turns[-1]["content"]:
        raise RowError("empty_turn", f"{side}: the last turn is empty")
    return turns


def _text(row: dict[str, Any], field: str) -> str:
    v = row.get(field)
    if v is None:
        raise RowError("missing_field", f"field {field!r} is missing")
    if not isinstance(v, str):
        raise RowError("wrong_type", f"field {field!r} is {type(v).__name__}, expected string")
    if not v.strip():
        raise RowError("empty_turn", f"field {field!r} is empty")
    return v


def _answer(row: dict[str, Any], field: str) -> str:
    v = row.get(field)
    if isinstance(v, list):  # a single assistant turn given as messages
        msgs = messages_of(v, field)
        if msgs[-1]["role"] != "assistant":
            raise RowError("wrong_type", f"field {field!r} does not end with an assistant turn")
        return msgs[-1]["content"]
    return _text(row, field)


def check_decodable(record: dict[str, Any]) -> None:
    """Text that cannot be encoded (lone surrogates from bad \\u escapes) or carries U+FFFD (text decoded with
    errors upstream) is refused as undecodable."""
    for s in iter_strings(record):
        if "\ufffd" in s:
            raise RowError("undecodable", "contains U+FFFD (text was decoded with errors upstream)")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RowError("undecodable", f"{e.reason} at character {e.start}") from None


def iter_strings(v: Any):
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from iter_strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from iter_strings(x)
