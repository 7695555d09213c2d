"""The rl stage's reward functions, each on its own, their specs' validation, and the weighted sum."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipelines.train.rewards import (
    RewardSpec,
    exact_answer,
    final_answer,
    json_match,
    length_penalty,
    normalise,
    regex,
    score,
)


def test_final_answer_forms():
    assert final_answer("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert final_answer("so the total is \\boxed{\\frac{1}{2}} and done") == "\\frac{1}{2}"
    assert final_answer("first \\boxed{3} then \\boxed{42}") == "42"
    assert final_answer("I think it costs $1,250.50 in the end") == "$1,250.50"
    assert final_answer("no number here") is None
    assert final_answer("#### 12\nand some trailing text") == "12"


def test_numbers_normalise():
    assert normalise("1,000") == normalise("1000.0") == normalise("$1000") == normalise("1000.") == 1000.0
    assert normalise(" Paris ") == normalise("paris") == "paris"
    assert normalise("\\text{12}") == 12.0


def test_exact_answer_against_gsm8k_references():
    refs = ["Natalia sold 48/2 = 24 clips in May.\n#### 72", "#### 1,200", "\\boxed{5}", "Paris", None]
    completions = ["... so 48 + 24 = 72\n#### 72", "The answer is 1200", "#### 6", "Paris.", "#### 3"]
    assert exact_answer([""] * 5, completions, answer=refs) == [1.0, 1.0, 0.0, 1.0, None]
    with pytest.raises(KeyError, match="rl.columns"):
        exact_answer([""], ["1"], reference=["1"])
    assert exact_answer([""], ["#### 9"], column="gold", gold=[9]) == [1.0]  # a number as the reference
    assert exact_answer([""] * 2, ["It is paris.", "\\boxed{Paris}"], answer=["Paris"] * 2) == [0.0, 1.0]


def test_json_match_schema_and_reference():
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "date": {"type": "string"}},
              "required": ["city", "date"], "additionalProperties": False}
    ref = {"city": "Oslo", "date": "2024-06-04"}
    completions = ['{"city": "Oslo", "date": "2024-06-04"}',
                   'Sure:\n```json\n{"city": "Oslo", "date": "2024-06-05"}\n```',
                   '{"city": "Oslo"}',  # misses a required field: schema-invalid
                   'not json at all',
                   '{"city": "Oslo", "date": "2024-06-04", "extra": 1}']
    got = json_match([""] * 5, completions, schema=schema, reference=[ref, ref, ref, ref, '{"city": "Oslo"}'])
    assert got == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert json_match([""], ['{"a": 1}']) == [1.0]  # no schema, no reference: any JSON object


def test_regex_and_length_penalty():
    assert regex([""] * 3, ["abc 123", "abc", "123"], pattern=r"\d+") == [1.0, 0.0, 1.0]
    assert regex([""] * 2, ["123", "a123"], pattern=r"\d+", mode="fullmatch") == [1.0, 0.0]
    assert length_penalty([""] * 3, ["x" * 10, "x" * 15, "x" * 100], max_chars=10) == [0.0, -0.5, -1.0]
    assert length_penalty([""] * 2, ["x" * 8, "x" * 80], max_chars=0, scale=32) == [-0.25, -1.0]


def user_reward(prompts, completions, **columns):
    """A user's function, named by import path in the specs below."""
    return [None if "skip" in p else float(len(c)) for p, c in zip(prompts, completions)]


def test_specs_resolve_builtins_and_import_paths_and_sum():
    specs = [RewardSpec(fn="regex", args={"pattern": "b"}, weight=2.0),
             RewardSpec(fn="tests.unit.train.test_rewards:user_reward", weight=0.5)]
    values = score(specs, ["p", "skip"], ["ab", "a"], {"completion_ids": [[1], [2]]})
    assert values == [[1.0, 0.0], [2.0, None]]


@pytest.mark.parametrize("spec,message", [
    ({"fn": "no_such_builtin"}, "neither a built-in"),
    ({"fn": "no_such_module_xyz:f"}, "cannot import 'no_such_module_xyz'"),
    ({"fn": "pipelines.train.rewards:nope"}, "has no 'nope'"),
    ({"fn": "pipelines.train.rewards:BUILTIN"}, "not a function"),
    ({"fn": "regex"}, "needs args.pattern"),
    ({"fn": "regex", "args": {"pattern": "("}}, "not a regex"),
    ({"fn": "length_penalty", "args": {"max_char": 3}}, "no argument 'max_char'"),
    ({"fn": "json_match", "args": {"schema": {"type": 3}}}, "not a JSON Schema"),
])
def test_bad_specs_are_refused_naming_them(spec, message):
    with pytest.raises(ValidationError, match=message):
        RewardSpec.model_validate(spec)


def test_a_function_returning_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        score([RewardSpec(fn="tests.unit.train.test_rewards:_one")], ["a", "b"], ["x", "y"], {})
    with pytest.raises(ValueError, match="expected a finite number"):
        score([RewardSpec(fn="tests.unit.train.test_rewards:_nan")], ["a"], ["x"], {})


def _one(prompts, completions, **columns):
    return [1.0]


def _nan(prompts, completions, **columns):
    return [float("nan")]
