"""Chat templates that would break labels or roles (issue 36 item 3), on the families' templates of tests/families.py:
each case handled by chat.py's documented rule, or the row refused with a reason (the others go on), never a
crash; the labels are exactly the answers' tokens."""

from __future__ import annotations

import json

import pytest

from pipelines.data import chat
from pipelines.data.packing import IGNORE_INDEX
from pipelines.data.rowformats import RowError
from tests.families import FAMILIES, Family, family_tokenizer


@pytest.fixture(scope="module")
def base():
    from pipelines.artifacts.models import build_tokenizer
    from pipelines.demo.generator import tokenizer_corpus

    return build_tokenizer(tokenizer_corpus())


def tok_of(base, name: str, template: str | None = None):
    family = FAMILIES[name]
    tok = family_tokenizer(family, base)
    if template is not None:
        tok.chat_template = template
    return tok


def learned(tok, labels: list[int]) -> list[str]:
    """The label runs, decoded."""
    runs, cur = [], []
    for t in labels + [IGNORE_INDEX]:
        if t == IGNORE_INDEX:
            if cur:
                runs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    return runs


def one(tok, messages):
    return chat.tokenize_conversations(tok, [messages], 512)[0]


SYS = {"role": "system", "content": "Answer in one word."}
U1, A1 = {"role": "user", "content": "Where is Oslo?"}, {"role": "assistant", "content": "Norway."}
U2, A2 = {"role": "user", "content": "And Lima?"}, {"role": "assistant", "content": "Peru."}


@pytest.mark.parametrize("name", ["gemma2", "mistral"])
def test_a_system_message_is_folded_into_the_first_user_turn_where_the_template_has_no_system_role(base, name):
    tok = tok_of(base, name)
    with pytest.raises(Exception, match="System role not supported|must alternate"):
        tok.apply_chat_template([SYS, U1, A1], tokenize=False)  # the template's own refusal
    res = one(tok, [SYS, U1, A1])
    assert not isinstance(res, RowError), res
    text = tok.decode(res.input_ids)
    assert "Answer in one word.\n\nWhere is Oslo?" in text  # as Gemma 3's template folds it
    assert learned(tok, res.labels) == [FAMILIES[name].label_texts(["Norway."])[0]]


def test_a_template_that_drops_the_system_text_silently_gets_it_folded(base):
    only_turns = ("{% for m in messages %}{% if m.role in ['user', 'assistant'] %}{{ '<|im_start|>' + m.role + '\n' "
                  "+ m.content + '<|im_end|>\n' }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok = tok_of(base, "qwen2", only_turns)
    res = one(tok, [SYS, U1, A1])
    assert "Answer in one word.\n\nWhere is Oslo?" in tok.decode(res.input_ids)
    assert learned(tok, res.labels) == ["Norway.<|im_end|>\n"]


@pytest.mark.parametrize("name", ["gemma2", "mistral"])
def test_two_user_turns_in_a_row_are_merged_where_the_template_alternates_strictly(base, name):
    tok = tok_of(base, name)
    res = one(tok, [U1, {"role": "user", "content": "Answer briefly."}, A1, U2, A2])
    assert not isinstance(res, RowError), res
    assert "Where is Oslo?\n\nAnswer briefly." in tok.decode(res.input_ids)
    assert learned(tok, res.labels) == FAMILIES[name].label_texts(["Norway.", "Peru."])
    # a template that takes them as they are (Llama-3) is left alone: no merge
    llama = tok_of(base, "llama")
    text = llama.decode(one(llama, [U1, {"role": "user", "content": "Answer briefly."}, A1]).input_ids)
    assert "Where is Oslo?<|eot_id|><|start_header_id|>user" in text


def test_a_generation_prompt_that_differs_from_the_rendered_turn(base):
    """Qwen3's "no thinking" prompt adds an empty reasoning block that the rendered earlier turns lack: the answer
    starts after the part of the prompt the turn shares (the assistant header), and is learned exactly."""
    no_think = FAMILIES["qwen3"].template.replace(
        "{%- if enable_thinking is defined and enable_thinking is false -%}", "{%- if true -%}").replace(
        "{%- if loop.index0 > ns.last_query and loop.last -%}", "{%- if false -%}")
    tok = tok_of(base, "qwen3", no_think)
    prompt = tok.apply_chat_template([U1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    full = tok.apply_chat_template([U1, A1], tokenize=False)
    assert not full.startswith(prompt)
    res = one(tok, [U1, A1, U2, A2])
    assert learned(tok, res.labels) == ["Norway.<|im_end|>\n", "Peru.<|im_end|>\n"]


def test_qwen3_learns_the_final_answer_and_keeps_earlier_ones_as_context(base):
    """Qwen3's template renders the final answer with an empty reasoning block and earlier ones without: the
    earlier answers' renderings change once a later turn exists, so they are context; the final one is learned
    (it used to refuse the whole pass)."""
    tok = tok_of(base, "qwen3")
    res = one(tok, [U1, A1, U2, A2])
    assert learned(tok, res.labels) == ["<think>\n\n</think>\n\nPeru.<|im_end|>\n"]
    assert "Norway." in tok.decode(res.input_ids)
    phi3 = tok_of(base, "phi3")  # Phi-3: the EOS after a finished conversation only
    assert learned(phi3, one(phi3, [U1, A1, U2, A2]).labels) == ["Peru.<|end|>\n<|endoftext|>"]


def test_rows_no_rule_can_render_are_refused_alone_with_the_templates_reason(base, tmp_path):
    """Mistral: a tool turn ('Only user and assistant roles'), a conversation starting with the assistant: each
    refused as template_error with the template's words, in the tokenize stage's rows (reason, detail and the
    row written out for rejected/), the good rows beside them tokenized; counts add up."""
    from pipelines.data.config import DataConfig
    from pipelines.data.tokenize_rows import TokenizeJob, TokenizeRows

    tok = tok_of(base, "mistral")
    tok.save_pretrained(tmp_path)
    rows = [[U1, A1], [U1, {"role": "tool", "content": "42"}, A1], [A1, U2, A2], [SYS, U1, A1, U2, A2]]
    out = TokenizeRows(TokenizeJob(str(tmp_path), DataConfig(train_path="x.jsonl", max_length=512)))(
        [{"messages": m, "source": "x.jsonl", "line": i + 1} for i, m in enumerate(rows)], "messages", "train")
    assert out["reason"] == ["", "template_error", "template_error", ""]
    assert "Only user and assistant roles" in out["detail"][1] and "must alternate" in out["detail"][2]
    assert json.loads(out["row"][1]) == rows[1] and out["row"][0] == ""  # the refused rows are written out whole
    assert sum(1 for r in out["reason"] if not r) + sum(1 for r in out["reason"] if r) == len(rows)
    assert learned(tok, out["labels"][3]) == ["Norway.</s>", "Peru.</s>"]


def test_a_template_that_locates_no_answer_is_still_a_data_error(base):
    """The rules never hide a template that cannot give labels at all: one whose prompt renderings share nothing
    with the whole conversation's stays the clear DataError for the pass (NOT_PREFIX)."""
    from pipelines.schema import DataError

    broken = Family("broken", "llama", {}, "{% if not add_generation_prompt %}FULL {% endif %}{% for m in messages %}"
                    "{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
                    (), "<|im_end|>")
    with pytest.raises(DataError, match="chat_template"):
        chat.tokenize_messages(family_tokenizer(broken, base), [U1, A1], 64)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_familys_labels_are_its_answers(base, name):
    tok = tok_of(base, name)
    for conv in ([U1, A1], [SYS, U1, A1], [U1, A1, U2, A2]):
        res = one(tok, conv)
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        assert learned(tok, res.labels) == FAMILIES[name].label_texts(answers), (name, tok.decode(res.input_ids))
