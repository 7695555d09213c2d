"""Pure formatting: raw rows → chat messages → token ids with assistant-only labels. No Ray, no torch.

Labels are found by rendering prefixes of the conversation with the tokenizer's own chat template: the tokens
between "everything before assistant turn i, plus the generation prompt" and "everything through turn i" are
turn i's answer (its end-of-turn token included, so the model learns to stop). A template whose renderings are
not prefixes of each other would make that wrong, so it is checked rather than assumed.

Model families' templates differ in ways that would break that; each is handled by one rule, per row, or the row
is refused (RowError 'template_error', with the template's own message: written to rejected/ with the reason):
- no system role (Gemma: "System role not supported", Mistral v0.1: roles must alternate from the user): when the
  template refuses a conversation that starts with a system message, or renders it without the system text, the
  system text is folded into the first user turn ("<system>\n\n<user>"), as Gemma 3's own template does;
- strict alternation (Mistral, Gemma): when the template still refuses the conversation and it has two turns of
  one role in a row, each such run is merged into one turn, the contents joined by a blank line;
- a generation prompt that differs from the assistant turn's rendering (a "no thinking" prompt that adds an empty
  <think></think> block the rendered turn lacks): the answer starts after the longest part of the generation
  prompt the rendered turn begins with;
- a turn that the whole conversation's rendering renders otherwise than the conversation ending with it (Qwen3
  drops the reasoning block of answers before the last user turn, Phi-3 puts its EOS token after the last turn
  only): that turn is context, not learned; the others are (Qwen3, Phi-3: the last answer). A conversation in
  which no answer can be located is a template problem, not a row's: a DataError (NOT_PREFIX) for the whole pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.artifacts.manifest import hash_path
from pipelines.data.packing import IGNORE_INDEX
from pipelines.data.rowformats import RowError
from pipelines.schema import DataError


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


# Tokenizer classes that are exactly the `tokenizers` backend driven by tokenizer.json: loading them through their
# own class skips AutoTokenizer's import of the model registry (torch, generation utils, sklearn), most of what a
# fresh worker spends before its first row. Any other class goes through AutoTokenizer.
_PLAIN_FAST = {"TokenizersBackend", "PreTrainedTokenizerFast"}


_TOKENIZERS: dict[str, Any] = {}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5", ".ckpt", ".onnx")


def tokenizer_hash(model_dir: str) -> str:
    """hash_path over a model folder's files other than weights: what tokenization depends on (tokenizer files,
    chat template, config), without reading gigabytes of weights the tokenized data does not depend on."""
    root = Path(model_dir)
    return hash_path(root, keep=lambda f: not f.name.endswith(WEIGHT_SUFFIXES)
                     and ".cache" not in f.relative_to(root).parts)


def load_tokenizer(model_dir: str):
    """The model folder's tokenizer (one instance per process and folder), as AutoTokenizer would load it,
    importing as little as possible."""
    key = str(Path(model_dir).resolve())
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _load_tokenizer(model_dir)
    return _TOKENIZERS[key]


def _load_tokenizer(model_dir: str):
    cfg = Path(model_dir, "tokenizer_config.json")
    cls = json.loads(cfg.read_text()).get("tokenizer_class") if cfg.is_file() else None
    if cls in _PLAIN_FAST and Path(model_dir, "tokenizer.json").is_file():
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        return TokenizersBackend.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def tokenize_messages(tokenizer, messages: list[dict[str, str]], max_length: int) -> Tokenized:
    """Token ids of the whole conversation, labels only on assistant tokens (each turn's end token included).

    A conversation longer than max_length is refused (RowError 'too_long'), never cut: a cut answer would teach
    the model to stop mid-sentence, and a silently dropped answer would hide data loss.
    """
    res = tokenize_conversations(tokenizer, [messages], max_length)[0]
    if isinstance(res, RowError):
        raise res
    return res


def _render_text(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """One fast-tokenizer call for many texts: what apply_chat_template(tokenize=True) does for one."""
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else []


def tokenize_conversations(tokenizer, conversations: list[list[dict[str, str]]], max_length: int
                           ) -> list[Tokenized | RowError]:
    """tokenize_messages for many conversations, in one batched encode: one result per row (too long or without
    an assistant turn: the RowError that refuses it)."""
    return [r if isinstance(r, RowError) else _judged(*r, max_length)
            for r in encode_conversations(tokenizer, conversations)]


NOT_PREFIX = ("the model's chat template (chat_template.jinja, or chat_template in tokenizer_config.json) does "
              "not render a conversation's earlier turns as a prefix of the whole (a template that rewrites past "
              "turns, e.g. drops their reasoning, does that), so assistant-only labels cannot be derived from it; "
              "give the model a template that renders each turn once and leaves it unchanged after (model.name: a "
              "folder with that chat_template.jinja)")


def encode_conversations(tokenizer, conversations: list[list[dict[str, str]]]
                         ) -> list[tuple[list[int], list[int] | None] | RowError]:
    """(input_ids, labels) of each rendered conversation, labels only on assistant tokens; labels None where no
    answer of the conversation can be located in its rendering (tokenize_conversations raises); RowError
    'template_error' with the template's own message for a conversation the template refuses to render even after
    the module's rules (one that starts with the assistant, a role it does not know): that row is refused, the
    rest go on.

    Each conversation is encoded once, with its character-to-token maps: turn i's answer is the tokens of the full
    encoding that lie between the characters of "everything before turn i + the generation prompt" and "everything
    through turn i" (as transformers' assistant-token masks are found). Where a token straddles such a boundary,
    that row's prefixes are encoded too and compared token by token (_labels_by_prefix_encodes). A tokenizer
    without offsets (not a fast one) takes that way for every row."""
    if not conversations:
        return []
    refused: dict[int, RowError] = {}
    rows = []
    for i, m in enumerate(conversations):
        try:
            rows.append(_char_spans(tokenizer, *renderable(tokenizer, m)))
        except Exception as e:  # noqa: BLE001 - jinja's raise_exception, transformers' checks: this row's refusal
            refused[i] = RowError("template_error", f"the chat template cannot render this conversation: "
                                                    f"{' '.join(str(e).split())[:300]}")
    good = [i for i in range(len(conversations)) if i not in refused]
    enc = tokenizer([full for full, _ in rows], add_special_tokens=False) if rows else {"input_ids": []}
    fast = getattr(enc, "encodings", None) is not None  # a Rust tokenizer: char ↔ token maps without offset lists
    out: list = [None] * len(conversations)
    for i, error in refused.items():
        out[i] = error
    slow: list[tuple[int, list[tuple[str, str]]]] = []
    for r, (i, (full, spans), ids) in enumerate(zip(good, rows, enc["input_ids"])):
        ids = list(ids)
        bounds = _token_bounds(enc, r, len(ids), spans) if fast and spans is not None else None
        if spans is not None and bounds is None:
            slow.append((i, spans))
        out[i] = (ids, None if bounds is None else _labels(ids, bounds))
    if slow:  # each distinct prefix rendering of those rows encoded once, in one call
        for (i, _), labels in zip(slow, _labels_by_prefix_encodes(tokenizer, [conversations[i] for i, _ in slow],
                                                                 [out[i][0] for i, _ in slow],
                                                                 [spans for _, spans in slow])):
            out[i] = (out[i][0], labels)
    return out


def renderable(tokenizer, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """The conversation as the template renders it, by the module's rules, and its rendering: the system text
    folded into the first user turn where the template refuses a system message or drops its text, then runs of
    one role merged where it still refuses the conversation. Raises the template's own error when no rule makes
    it render."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    try:
        full = _render_text(tokenizer, messages, False)
    except Exception as e:  # noqa: BLE001 - the template's refusal: try the rules, else it stands
        for attempt in (_fold_system(messages), _merge_runs(_fold_system(messages))):
            if attempt != messages:
                try:
                    return attempt, _render_text(tokenizer, attempt, False)
                except Exception:  # noqa: BLE001, S112 - this rule does not help: the next, else the first error
                    continue
        raise e
    if system and system.strip() not in full and (folded := _fold_system(messages)) != messages:
        return folded, _render_text(tokenizer, folded, False)  # a template that drops the system text silently
    return messages, full


def _fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """A leading system message folded into the first user turn ("<system>\n\n<user>"); as given without one."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return messages
    first = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
    return [first, *messages[2:]]


def _merge_runs(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Consecutive turns of one role merged into one, contents joined by a blank line."""
    out: list[dict[str, str]] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{m['content']}"}
        else:
            out.append(dict(m))
    return out


def _char_spans(tokenizer, messages: list[dict[str, str]], full: str | None = None
                ) -> tuple[str, list[tuple[str, str]] | None]:
    """The full rendering (given, or rendered here) and, per located assistant turn, the prefixes of it that end
    before and after its answer (the module's rules); None when the conversation has answers and none can be
    located."""
    full = _render_text(tokenizer, messages, False) if full is None else full
    spans, answers = [], 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        answers += 1
        prompt = _render_text(tokenizer, messages[:i], True)
        through = full if i == len(messages) - 1 else _render_text(tokenizer, messages[:i + 1], False)
        if not full.startswith(through):
            continue  # the whole rendering rewrites this turn (Qwen3's earlier reasoning): context, not learned
        start = len(prompt) if full.startswith(prompt) else _prompt_shared(tokenizer, messages[:i], full,
                                                                             msg["content"])
        if start is not None and len(through) >= start:
            spans.append((full[:start], through))
    return full, (spans if spans or not answers else None)


def _prompt_shared(tokenizer, before: list[dict[str, str]], full: str, answer: str) -> int | None:
    """Where the answer starts when the generation prompt differs from the rendered turn: after the longest run
    of the prompt's own tokens (its part after the conversation so far) that the full rendering repeats, where
    the answer's text follows (blanks aside); None when it does not, or when the rendering without the prompt is
    not a prefix of the full one."""
    head = _render_text(tokenizer, before, False)
    prompt = _render_text(tokenizer, before, True)
    if not (full.startswith(head) and prompt.startswith(head)):
        return None
    tail, rest = prompt[len(head):], full[len(head):]
    try:
        ends = [e for _, e in tokenizer(tail, add_special_tokens=False, return_offsets_mapping=True)
                ["offset_mapping"]]
    except (NotImplementedError, KeyError, TypeError):  # a slow tokenizer: no offsets, characters then
        ends = list(range(len(tail) + 1))
    start = len(head) + max([e for e in ends if rest.startswith(tail[:e])], default=0)
    return start if full[start:].lstrip().startswith(answer.strip()) else None


def _token_bounds(enc, r: int, n: int, spans: list[tuple[str, str]]) -> list[tuple[int, int]] | None:
    """Token index ranges of row r's answers, or None where a boundary falls inside a token. A boundary at
    character c is clean when the token holding c starts at c and the one before ends at c (offsets may be trimmed
    of whitespace, which only moves them inward: both conditions together still pin the true boundary)."""
    out = []
    for a, b in spans:
        pair = []
        for c in (len(a), len(b)):
            k = enc.char_to_token(r, c)
            k = n if k is None else k  # past the last token (or on a character none holds: the check below fails)
            if (k < n and enc.token_to_chars(r, k).start != c) or (enc.token_to_chars(r, k - 1).end != c if k
                                                                    else c != 0):
                return None
            pair.append(k)
        out.append((pair[0], pair[1]))
    return out


def _labels(ids: list[int], bounds: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in bounds:
        labels[a:b] = ids[a:b]
    return labels


def _labels_by_prefix_encodes(tokenizer, conversations, full_ids, spans=None) -> list[list[int] | None]:
    """Labels from encoding every prefix rendering (each distinct one once) and comparing tokens: None where a
    prefix's tokens are not a prefix of the full encoding's. spans: each row's (_char_spans), else found here."""
    texts: dict[str, int] = {}

    def index(text: str) -> int:
        return texts.setdefault(text, len(texts))

    if spans is None:
        spans = [_char_spans(tokenizer, *renderable(tokenizer, m))[1] or [] for m in conversations]
    turns = [[(index(a), index(b)) for a, b in row] for row in spans]
    ids = _encode(tokenizer, list(texts))
    out: list[list[int] | None] = []
    for full, row in zip(full_ids, turns):
        pairs = [(ids[a], ids[b]) for a, b in row]
        if any(full[: len(s)] != s or full[: len(e)] != e for s, e in pairs):
            out.append(None)
        else:
            out.append(_labels(full, [(len(s), len(e)) for s, e in pairs]))
    return out


def _judged(ids: list[int], labels: list[int] | None, max_length: int) -> Tokenized | RowError:
    if labels is None:
        raise DataError(NOT_PREFIX)
    if not any(t != IGNORE_INDEX for t in labels):
        return RowError("no_assistant_tokens", "the conversation has no assistant turn to learn from")
    if len(ids) > max_length:
        return RowError("too_long", f"{len(ids)} tokens > max_length {max_length}")
    return Tokenized(ids, labels)


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


def tokenize_records(tokenizer, body: str, recs: list[Any], max_length: int, truncation: str
                     ) -> list[tuple[list, list, int] | RowError]:
    """tokenize_record over a batch, the chat renderings encoded in one call; a row too long under
    drop_oldest_turns is retried alone (rare: it needs the shorter renderings)."""
    if body == "text":
        out: list = []
        for rec in recs:
            try:
                out.append(tokenize_record(tokenizer, body, rec, max_length, truncation))
            except RowError as e:
                out.append(e)
        return out
    convs = [[{"role": m["role"], "content": m["content"]} for m in rec] for rec in recs]
    res: list = []
    for conv, t in zip(convs, tokenize_conversations(tokenizer, convs, max_length)):
        if isinstance(t, RowError) and t.reason == "too_long" and truncation == "drop_oldest_turns":
            try:
                t = tokenize_record(tokenizer, body, conv, max_length, truncation)
            except RowError as e:
                t = e
        res.append((t.input_ids, t.labels, 0) if isinstance(t, Tokenized) else t)
    return res


def drop_oldest_exchange(messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """Remove the first user…assistant exchange after the system turns; None when only the last one is left."""
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= start]
    if len(assistants) < 2:
        return None
    return messages[:start] + messages[assistants[0] + 1:]
