"""Formatting and labels: assistant-only loss, the end-of-turn token learned, bad rows refused with a reason."""

from __future__ import annotations

import json

import pytest

from pipelines.artifacts.manifest import hash_path, read_manifest, write_manifest
from pipelines.data.chat import IGNORE_INDEX, pad_batch, tokenize_messages
from pipelines.data.rowformats import RowError, alpaca_to_messages


@pytest.fixture(scope="module")
def tokenizer():
    from pipelines.artifacts.models import build_tokenizer
    from pipelines.demo.generator import tokenizer_corpus

    return build_tokenizer(tokenizer_corpus())


def test_alpaca_with_and_without_input():
    m = alpaca_to_messages({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert m == [{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    m = alpaca_to_messages({"instruction": "Hi", "output": "Hello"}, system_prompt="Be brief.")
    assert m[0] == {"role": "system", "content": "Be brief."} and m[1]["content"] == "Hi"


@pytest.mark.parametrize("row,reason,field", [
    ({"input": "x", "output": "y"}, "missing_field", "instruction"),
    ({"instruction": "x"}, "missing_field", "output"),
    ({"instruction": 3, "output": "y"}, "wrong_type", "instruction"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "wrong_type", "input"),
    ({"instruction": "  ", "output": "y"}, "empty_turn", "instruction"),
    ({"instruction": "x", "output": ""}, "empty_turn", "output"),
])
def test_bad_rows_name_reason_and_field(row, reason, field):
    with pytest.raises(RowError) as e:
        alpaca_to_messages(row)
    assert e.value.reason == reason and repr(field) in str(e.value)


def test_labels_cover_exactly_the_answer_and_its_end_token(tokenizer):
    msgs = alpaca_to_messages({"instruction": "Extract the city.", "input": "Ana flies to Oslo on 3 May.",
                               "output": '{"city": "Oslo"}'}, system_prompt="You are terse.")
    tok = tokenize_messages(tokenizer, msgs, max_length=256)
    assert len(tok.input_ids) == len(tok.labels)
    learned = [t for t in tok.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == '{"city": "Oslo"}<|im_end|>\n'
    assert tokenizer.eos_token_id in learned  # the model is taught to stop
    # everything before the answer is masked, and the answer is one contiguous span at the end
    first = next(i for i, t in enumerate(tok.labels) if t != IGNORE_INDEX)
    assert all(t == IGNORE_INDEX for t in tok.labels[:first])
    assert tok.labels[first:] == tok.input_ids[first:]
    assert "Oslo on 3 May" in tokenizer.decode(tok.input_ids[:first])


def test_multi_turn_labels_every_assistant_turn(tokenizer):
    msgs = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"}, {"role": "assistant", "content": "four"}]
    tok = tokenize_messages(tokenizer, msgs, max_length=256)
    text = tokenizer.decode([t for t in tok.labels if t != IGNORE_INDEX])
    assert text == "two<|im_end|>\nfour<|im_end|>\n"


def test_too_long_is_refused_not_cut(tokenizer):
    msgs = alpaca_to_messages({"instruction": "word " * 200, "output": "ok"})
    with pytest.raises(RowError) as e:
        tokenize_messages(tokenizer, msgs, max_length=32)
    assert e.value.reason == "too_long"


def test_pad_batch_masks_padding():
    out = pad_batch([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_id=0)
    assert out["input_ids"] == [[1, 2, 3], [4, 0, 0]]
    assert out["labels"] == [[-100, 2, 3], [4, -100, -100]]
    assert out["attention_mask"] == [[1, 1, 1], [1, 0, 0]]


def test_manifest_round_trip_and_kind_check(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"a": 1}) + "\n")
    out = tmp_path / "stage"
    write_manifest(out, kind="tokenized_dataset", inputs={"train": str(src)}, config={"x": 1},
                   metrics={"rows_in": 1})
    doc = read_manifest(out, kind="tokenized_dataset")
    assert doc["inputs"]["train"]["hash"] == hash_path(src) and doc["metrics"]["rows_in"] == 1
    with pytest.raises(ValueError, match="expected an artifact of kind 'lora_adapter'"):
        read_manifest(out, kind="lora_adapter")
    src.write_text("changed\n")
    assert hash_path(src) != doc["inputs"]["train"]["hash"]
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(tmp_path / "nothing")


def test_tokenizer_hash_covers_the_tokenizer_files_not_the_weights(tmp_path):
    """The tokenized data's manifest records the tokenizer by tokenizer_hash: a change of the tokenizer or the
    chat template changes it, new weights do not (and are never read)."""
    from pipelines.data.chat import tokenizer_hash

    (tmp_path / "tokenizer.json").write_text('{"v": 1}')
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "a"}')
    (tmp_path / "model.safetensors").write_bytes(b"weights-1")
    first = tokenizer_hash(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"weights-2, retrained")
    assert tokenizer_hash(str(tmp_path)) == first
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "b"}')
    assert tokenizer_hash(str(tmp_path)) != first


def test_one_encode_labels_equal_the_prefix_encodes(tokenizer, shared_data):
    """encode_conversations encodes each conversation once and finds the answers by character offsets; on real
    rows (Alpaca, Dolly, GSM8K) and on multi-turn ones with leading spaces and newlines it gives the ids and
    labels that encoding every prefix rendering and comparing tokens gives (the way it replaced). Needs
    ../shared/data: the Alpaca (CC BY-NC 4.0) and Dolly (CC BY-SA 3.0) rows may not be copied into the repository."""
    from pipelines.data import chat

    convs = []
    for name in ("alpaca_5000.json", "gsm8k_train_alpaca.json", "dolly_151_alpaca.jsonl"):
        path = shared_data / "sft" / name
        rows = json.loads(path.read_text()) if name.endswith(".json") else [
            json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for r in rows[:400]:
            try:
                convs.append(alpaca_to_messages(r, system_prompt="Answer briefly." if len(convs) % 2 else None))
            except RowError:
                pass
    convs += [[{"role": "user", "content": m[-2]["content"]}, {"role": "assistant", "content": " spaced"},
               {"role": "user", "content": "more?\n"}, {"role": "assistant", "content": m[-1]["content"] + "\n"}]
              for m in convs[:200]]
    new = chat.encode_conversations(tokenizer, convs)
    full = [list(ids) for ids in chat._encode(tokenizer, [chat._render_text(tokenizer, m, False) for m in convs])]
    old = chat._labels_by_prefix_encodes(tokenizer, convs, full)
    assert len(new) == len(convs) > 1000
    assert [ids for ids, _ in new] == full
    assert [labels for _, labels in new] == old
    assert all(labels is not None and any(t != IGNORE_INDEX for t in labels) for _, labels in new)


def test_a_template_that_rewrites_earlier_turns_is_a_clear_data_error(tokenizer):
    """Labels come from renderings being prefixes of each other; a template where they are not (here: the full
    conversation gets a header the prompt rendering lacks) is refused as bad input (exit 2), naming the template."""
    import copy

    from pipelines.schema import DataError

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% if not add_generation_prompt %}FULL {% endif %}{% for m in messages %}"
                         "{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: "
                         "{% endif %}")
    with pytest.raises(DataError, match="chat_template"):
        tokenize_messages(tok, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], 64)


def test_a_conversation_the_template_cannot_render_is_refused_alone(tokenizer):
    """One assistant-first conversation among good ones: the template raises on its empty prefix; that row is
    refused as template_error with the template's message, and the others are tokenized as before."""
    from pipelines.data import chat

    good = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    odd = [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "ok"},
           {"role": "assistant", "content": "fine"}]
    out = chat.tokenize_conversations(tokenizer, [good, odd, good], 256)
    assert isinstance(out[1], RowError) and out[1].reason == "template_error", out[1]
    assert "cannot render this conversation" in out[1].detail
    assert out[0] == out[2] and not isinstance(out[0], RowError)
    assert out[0] == chat.tokenize_conversations(tokenizer, [good], 256)[0]
