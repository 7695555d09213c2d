"""The rl: section as the run config reads it: defaults, refusals naming the key, a user reward by import path
checked when the config is read (`loraforge validate` exits 2 naming it), and the rows the prompt reader keeps."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.config import load_config
from pipelines.schema import ConfigError


def _config(tmp_path, rl: str) -> str:
    f = tmp_path / "run.yaml"
    f.write_text(f"name: t\nmodel: {{name: {tmp_path}}}\nrl:\n{rl}")
    return str(f)


def test_defaults_and_a_user_reward_by_import_path(tmp_path):
    cfg = load_config(_config(tmp_path, "  prompts_path: p.jsonl\n  rewards:\n"
                                        "    - {fn: 'tests.unit.train.test_rewards:user_reward', weight: 0.5}\n"
                                        "    - {fn: exact_answer, args: {column: answer}}\n"
                                        "  columns: {prompt: question, answer: answer}\n"))
    rl = cfg.rl
    assert rl.num_generations == 8 and rl.epsilon == 0.2 and rl.epsilon_high is None and rl.kl_beta == 0.0
    assert rl.aggregation == "grpo" and rl.staleness == 0 and rl.sampling.max_new_tokens == 64
    assert [r.weight for r in rl.rewards] == [0.5, 1.0]
    loop = rl.optimisation(cfg.train)
    assert loop.max_steps == rl.steps and loop.lr == rl.lr and loop.num_workers == 1
    assert load_config(None).rl is None


@pytest.mark.parametrize("rl,message", [
    ("  rewards: [{fn: 'no_such_pkg_q.mod:reward'}]\n",
     "rl.rewards.0.fn: reward 'no_such_pkg_q.mod:reward': cannot import 'no_such_pkg_q.mod'"),
    ("  rewards: [{fn: 'exact_match'}]\n", "rl.rewards.0.fn: 'exact_match' is neither a built-in reward"),
    ("  columns: {question: q}\n", "rl: columns needs a 'prompt' entry"),
    ("  columns: {q: q}\n  prompt_template: '{q} {a}'\n", "prompt_template names ['a']"),
    ("  staleness: 2\n", "rl.staleness"),
    ("  aggregation: bnpo\n", "rl.aggregation"),
    ("  parity: {warn: 0.5, stop: 0.1}\n", "parity.stop (0.1) is below parity.warn (0.5)"),
    ("  num_generations: 1\n", "rl.num_generations"),
])
def test_refusals_name_the_key(tmp_path, rl, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(_config(tmp_path, rl))


def test_validate_exits_2_naming_a_bad_reward(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    out = CliRunner().invoke(app, ["validate", _config(tmp_path, "  rewards: [{fn: 'mypkg_missing:score'}]\n")])
    assert out.exit_code == 2, out.output
    assert "rl.rewards.0.fn" in out.output and "mypkg_missing" in out.output and "Traceback" not in out.output


def test_prompt_rows_kept_and_refused(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from pipelines.train.rl import read_prompts
    from pipelines.train.rl_config import RLSection

    f = tmp_path / "p.jsonl"
    rows = [{"q": {"text": "What is 2+2?"}, "a": "#### 4"}, {"q": {"text": ""}, "a": "1"}, {"a": "3"},
            {"q": {"text": "x " * 400}, "a": "2"}, {"q": {"text": "Name a city"}, "a": "Oslo"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RLSection(prompts_path=str(f), columns={"prompt": "q.text", "answer": "a"}, max_prompt_tokens=64,
                    system_prompt="Be brief.")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    kept, refused = read_prompts(cfg, tok)
    assert [r["columns"]["answer"] for r in kept] == ["#### 4", "Oslo"]
    assert kept[0]["prompt"].startswith("<|im_start|>system\nBe brief.") and kept[0]["prompt"].endswith(
        "<|im_start|>assistant\n")
    assert kept[0]["prompt_ids"] == tok(kept[0]["prompt"], add_special_tokens=False)["input_ids"]
    assert [(r["line"], r["reason"].split(":")[0]) for r in refused] == [(2, "empty_turn"), (3, "missing_field"),
                                                                          (4, "too_long")]
    templated = cfg.model_copy(update={"prompt_template": "Answer: {prompt} (say {answer})", "system_prompt": None})
    kept, _ = read_prompts(templated, tok)
    assert "<|im_start|>user\nAnswer: What is 2+2? (say #### 4)<|im_end|>" in kept[0]["prompt"]
