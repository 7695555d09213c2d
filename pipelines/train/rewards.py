"""Rewards for the rl stage, as plain functions in TRL's convention:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

one value per completion (None: this function does not apply to it). `columns` are the prompt rows' other fields
(rl.columns: the reference answer, a schema, ...), one list entry per completion, plus `completion_ids` (the
sampled token ids). A user's function is named by import path, `package.module:function`; the built-ins by name:

- `exact_answer`: the completion's final answer (`#### N` or the last `\\boxed{...}`; else its last number when
  the reference is a number, its whole text when not) equals the reference's (`#### N` in the reference is read
  the same way); numbers compare as numbers (`1,000` = `1000.0` = `$1000`), anything else as trimmed, case-folded
  text. 1.0 or 0.0.
- `json_match`: the completion (fenced or bare) parses as a JSON object, is valid against `schema` (JSON Schema,
  when given), and the share of the reference object's fields it equals. 0.0 for invalid JSON or schema.
- `regex`: 1.0 when `pattern` is found (mode=search) or matches the whole completion (mode=fullmatch), else 0.0.
- `length_penalty`: 0 up to `max_chars` characters, then -(extra characters / scale) (default scale: max_chars),
  at most -1.

`RewardSpec` (one entry of rl.rewards) binds a function, its keyword arguments and its weight; `load` resolves
it, so a wrong import path is a config error naming it, before anything starts.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import math
import re
from typing import Any, Callable

from pydantic import Field, field_validator, model_validator

from pipelines.schema import Section

Reward = Callable[..., list]

_NUMBER = re.compile(r"[-+]?\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_HASHES = re.compile(r"####\s*(.+)")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def final_answer(text: str) -> str | None:
    """The answer a text ends on: after the last `####`, inside the last `\\boxed{}`, else its last number."""
    if text is None:
        return None
    text = str(text)
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip().splitlines()[0].strip() if hashes[-1].strip() else None
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def normalise(answer: str | None) -> float | str | None:
    """A number as a float (commas, $, spaces, a trailing period and \\text{} wrappers dropped); else trimmed,
    case-folded text."""
    if answer is None:
        return None
    a = re.sub(r"\\text\{([^}]*)\}", r"\1", str(answer)).strip().rstrip(".").strip()
    number = a.replace(",", "").replace("$", "").replace(" ", "")
    number = number[:-1] if number.endswith("%") else number
    try:
        value = float(number)
        return value if math.isfinite(value) else a.casefold()
    except ValueError:
        return " ".join(a.casefold().split())


def exact_answer(prompts: list, completions: list, *, column: str = "answer", **columns) -> list[float | None]:
    """1.0 when the completion's final answer equals the reference's (rl.columns role `column`), else 0.0;
    None where the row has no reference."""
    refs = columns.get(column)
    if refs is None:
        raise KeyError(f"exact_answer reads the reference from column {column!r}, which the prompts do not have "
                       f"(columns: {sorted(k for k in columns if k != 'completion_ids')}); map it in rl.columns")
    out: list[float | None] = []
    for completion, ref in zip(completions, refs):
        want = normalise(final_answer(ref) if isinstance(ref, str) and ("####" in ref or "\\boxed" in ref)
                         else (str(ref) if ref is not None else None))
        if want is None:
            out.append(None)
            continue
        text = str(completion)
        marked = _HASHES.search(text) or _boxed(text) is not None
        # a numeric reference: the completion's marked answer, else its last number; a text reference: the marked
        # answer, else the whole completion
        got = normalise(final_answer(text) if marked or isinstance(want, float) else text)
        if isinstance(want, float) and isinstance(got, float):
            out.append(1.0 if math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-9) else 0.0)
        else:
            out.append(1.0 if got == want else 0.0)
    return out


def _json_object(text: str) -> Any:
    fenced = _FENCE.search(text)
    body = (fenced.group(1) if fenced else text).strip()
    try:
        return json.loads(body)
    except ValueError:
        start, end = body.find("{"), body.rfind("}")
        if 0 <= start < end:
            try:
                return json.loads(body[start:end + 1])
            except ValueError:
                return None
        return None


def json_match(prompts: list, completions: list, *, column: str = "reference", schema: dict | None = None,
               **columns) -> list[float | None]:
    """0.0 unless the completion holds a JSON object valid against `schema`; then the share of the reference
    object's fields (rl.columns role `column`, an object or its JSON text) it has with equal values (1.0 without a
    reference)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema) if schema else None
    refs = columns.get(column) or [None] * len(completions)
    out: list[float | None] = []
    for completion, ref in zip(completions, refs):
        got = _json_object(str(completion))
        if not isinstance(got, dict) or (validator is not None and not validator.is_valid(got)):
            out.append(0.0)
            continue
        if isinstance(ref, str):
            ref = _json_object(ref)
        if not isinstance(ref, dict) or not ref:
            out.append(1.0)
            continue
        out.append(sum(1.0 for k, v in ref.items() if k in got and got[k] == v) / len(ref))
    return out


def regex(prompts: list, completions: list, *, pattern: str, mode: str = "search", **columns) -> list[float | None]:
    """1.0 when `pattern` is found in (search) or matches the whole (fullmatch) completion, else 0.0."""
    compiled = re.compile(pattern, re.S)
    test = compiled.fullmatch if mode == "fullmatch" else compiled.search
    return [1.0 if test(str(c)) else 0.0 for c in completions]


def length_penalty(prompts: list, completions: list, *, max_chars: int = 200, scale: int | None = None,
                   **columns) -> list[float | None]:
    """0 for a completion of at most max_chars characters; beyond, -(extra characters / scale) (scale: default
    max_chars), floored at -1."""
    per = scale or max_chars
    if per <= 0:
        raise ValueError("length_penalty needs max_chars > 0 or scale > 0")
    return [-min(1.0, max(0, len(str(c)) - max_chars) / per) for c in completions]


BUILTIN: dict[str, Reward] = {"exact_answer": exact_answer, "json_match": json_match, "regex": regex,
                              "length_penalty": length_penalty}
_IMPORT_PATH = re.compile(r"\A[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*\Z")


def resolve(name: str) -> Reward:
    """A built-in by name, or `module:function` imported; ValueError naming what is wrong."""
    if name in BUILTIN:
        return BUILTIN[name]
    if not _IMPORT_PATH.fullmatch(name):
        raise ValueError(f"{name!r} is neither a built-in reward ({', '.join(BUILTIN)}) nor an import path "
                         "'package.module:function'")
    module_name, attr = name.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's path or module
        raise ValueError(f"reward {name!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {name!r}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {name!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


class RewardSpec(Section):
    """One reward function of rl.rewards, its keyword arguments and its weight in the sum."""

    fn: str = Field(description=(
        f"A built-in ({', '.join(BUILTIN)}) or a user function by import path 'package.module:function', called "
        "as fn(prompts, completions, **columns, **args) -> list[float | None]."))
    weight: float = Field(1.0, description="Weight in the summed reward.")
    args: dict[str, Any] = Field(default_factory=dict, description=(
        "Keyword arguments bound to the function (exact_answer: column; json_match: column, schema; regex: "
        "pattern, mode; length_penalty: max_chars, scale)."))

    @field_validator("fn")
    @classmethod
    def _importable(cls, v: str) -> str:
        resolve(v)
        return v

    @model_validator(mode="after")
    def _args(self) -> "RewardSpec":
        fn = resolve(self.fn)
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return self
        # a built-in's **columns are the prompts' columns, not arguments: its own names only
        takes_any = self.fn not in BUILTIN and any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        unknown = [k for k in self.args if k not in sig.parameters and not takes_any]
        if unknown:
            raise ValueError(f"reward {self.fn!r} takes no argument {unknown[0]!r}")
        if self.fn == "regex":
            if "pattern" not in self.args:
                raise ValueError("reward 'regex' needs args.pattern")
            try:
                re.compile(self.args["pattern"])
            except re.error as e:
                raise ValueError(f"reward 'regex': args.pattern {self.args['pattern']!r} is not a regex ({e})") \
                    from None
        if self.fn == "json_match" and self.args.get("schema") is not None:
            import jsonschema

            try:
                jsonschema.Draft202012Validator.check_schema(self.args["schema"])
            except jsonschema.SchemaError as e:
                raise ValueError(f"reward 'json_match': args.schema is not a JSON Schema ({e.message})") from None
        return self

    def bound(self) -> Reward:
        return functools.partial(resolve(self.fn), **self.args) if self.args else resolve(self.fn)


def score(specs: list[RewardSpec], prompts: list[str], completions: list[str], columns: dict[str, list]
          ) -> list[list[float | None]]:
    """Each function's values, [function][completion]; a function that returns the wrong number of values, or
    something not a number or None, is a ValueError naming it."""
    out = []
    for spec in specs:
        values = list(spec.bound()(prompts, completions, **columns))
        if len(values) != len(completions):
            raise ValueError(f"reward {spec.fn!r} returned {len(values)} values for {len(completions)} completions")
        for v in values:
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise ValueError(f"reward {spec.fn!r} returned {v!r}: expected a finite number or None")
        out.append([None if v is None else float(v) for v in values])
    return out
