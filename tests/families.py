"""Tiny random models of each model family, built in code from transformers configs, each with a chat template of
its family's shape on the project's tiny locally trained tokenizer (its family's markers added as special tokens).

The templates are written here after each family's public chat template, keeping what matters to labels and
roles: Llama-3's header tokens and trimmed content, Qwen2's ChatML with a default system turn, Qwen3's empty
reasoning block on the final answer (and none on earlier ones), Mistral v0.1's strict user/assistant alternation
with no system role, Gemma 2's "model" role, no system role and trimmed content, Phi-3's <|user|>…<|end|> with
the EOS token after a finished conversation, OLMo 2's <|user|>/<|assistant|> turns, GPT-NeoX in OpenAssistant's
<|prompter|> shape, GPT-2 in DialoGPT's (turns separated by EOS). Shapes: 2 layers, hidden 128, head_dim 32 (the
smallest vLLM's CPU attention takes), so a folder also serves.

    build_family(FAMILIES["gemma2"], folder) -> folder (config + safetensors + tokenizer with the template)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
         "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN3 = ("{%- set ns = namespace(last_query=-1) -%}{%- for m in messages -%}{%- if m.role == 'user' -%}"
         "{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}"
         "{%- for m in messages -%}{%- if m.role == 'assistant' -%}"
         "{%- if loop.index0 > ns.last_query and loop.last -%}"
         "{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m.content + '<|im_end|>\n' -}}"
         "{%- else -%}{{- '<|im_start|>assistant\n' + m.content + '<|im_end|>\n' -}}{%- endif -%}"
         "{%- else -%}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}{%- endif -%}{%- endfor -%}"
         "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}"
         "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}"
         "{%- endif -%}{%- endif -%}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index % 2 == 1) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
          "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim "
          "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
        "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
OLMO2 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
         "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
         "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}"
         "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
         "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}{% endif %}"
         "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}")
NEOX = ("{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ '<|system|>' + message['content'] + eos_token }}{% elif message['role'] == 'user' %}"
        "{{ '<|prompter|>' + message['content'] + eos_token }}{% else %}"
        "{{ '<|assistant|>' + message['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
GPT2 = "{% for message in messages %}{{ message['content'] + eos_token }}{% endfor %}"

DECODER = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 1024}


@dataclass(frozen=True)
class Family:
    """One model family: its transformers model_type and config fields, chat template and marker tokens, the text
    its template puts around an answer (what the labels must be), and whether vLLM is asked to serve it here."""

    name: str
    model_type: str
    config: dict
    template: str
    specials: tuple[str, ...]
    eos: str
    bos: str | None = None
    answer_end: str = ""  # after the answer's text, in every learned turn
    last_prefix: str = ""  # before the final answer's text only (Qwen3's empty reasoning block)
    last_end: str = ""  # after the final answer's end (Phi-3's EOS after a finished conversation)
    earlier_learned: bool = True  # answers before the last user turn are learned (False: the template rewrites them)
    trim: bool = False  # the template trims an answer
    eos_ids: tuple[str, ...] = field(default=())  # generation stops at these tokens too
    tied: bool = False  # the output head is the input embedding (Gemma: vLLM's Gemma 2 has no lm_head of its own)

    def label_texts(self, answers: list[str]) -> list[str]:
        """The text each learned answer's labels decode to, in order (answers: the conversation's, in order)."""
        out = []
        for i, a in enumerate(answers):
            last = i == len(answers) - 1
            if not last and not self.earlier_learned:
                continue
            text = a.strip() if self.trim else a
            out.append((self.last_prefix if last else "") + text + self.answer_end + (self.last_end if last else ""))
        return out


FAMILIES = {f.name: f for f in [
    Family("llama", "llama", DECODER, LLAMA3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                               "<|eot_id|>"), "<|eot_id|>", "<|begin_of_text|>", "<|eot_id|>",
           trim=True),
    Family("qwen2", "qwen2", DECODER, QWEN2, (), "<|im_end|>", answer_end="<|im_end|>\n"),
    Family("qwen3", "qwen3", {**DECODER, "head_dim": 32}, QWEN3, ("<think>", "</think>"), "<|im_end|>",
           answer_end="<|im_end|>\n", last_prefix="<think>\n\n</think>\n\n", earlier_learned=False),
    Family("mistral", "mistral", DECODER, MISTRAL, ("<s>", "</s>", "[INST]", "[/INST]"), "</s>", "<s>", "</s>"),
    Family("gemma2", "gemma2", {**DECODER, "head_dim": 32, "query_pre_attn_scalar": 32,
                                "attn_logit_softcapping": None, "final_logit_softcapping": None},
           GEMMA2, ("<bos>", "<start_of_turn>", "<end_of_turn>"), "<end_of_turn>", "<bos>", "<end_of_turn>\n",
           trim=True, tied=True),
    Family("phi3", "phi3", DECODER, PHI3, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|endoftext|>",
           answer_end="<|end|>\n", last_end="<|endoftext|>", earlier_learned=False, eos_ids=("<|end|>",)),
    Family("olmo2", "olmo2", DECODER, OLMO2, ("<|system|>", "<|user|>", "<|assistant|>"), "<|endoftext|>",
           "<|endoftext|>", "<|endoftext|>"),
    Family("gpt_neox", "gpt_neox", {k: v for k, v in DECODER.items() if k != "num_key_value_heads"}, NEOX,
           ("<|system|>", "<|prompter|>", "<|assistant|>"), "<|endoftext|>", answer_end="<|endoftext|>"),
    Family("gpt2", "gpt2", {"n_embd": 128, "n_layer": 2, "n_head": 4, "n_positions": 1024}, GPT2, (),
           "<|endoftext|>", answer_end="<|endoftext|>"),
    Family("qwen2_moe", "qwen2_moe", {**DECODER, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128,
                                      "num_experts": 4, "num_experts_per_tok": 2}, QWEN2, (), "<|im_end|>",
           answer_end="<|im_end|>\n"),
]}


def family_tokenizer(family: Family, base=None):
    """The tiny local tokenizer (pipelines.artifacts.models.build_tokenizer) with the family's markers as special
    tokens, its EOS/BOS and its chat template. base: an already built tiny tokenizer to copy (saves retraining)."""
    import copy

    from pipelines.artifacts.models import build_tokenizer
    from pipelines.demo.generator import tokenizer_corpus

    tok = copy.deepcopy(base) if base is not None else build_tokenizer(tokenizer_corpus())
    if family.specials:
        tok.add_special_tokens({"additional_special_tokens": list(family.specials)})
    tok.eos_token = family.eos
    if family.bos:
        tok.bos_token = family.bos
    tok.chat_template = family.template
    return tok


def build_family(family: Family, out: str | Path, seed: int = 0, tokenizer=None) -> str:
    """A tiny random model of the family with its tokenizer, saved as a Hugging Face safetensors folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = family_tokenizer(family, tokenizer)
    ids = {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
           "bos_token_id": tok.bos_token_id}
    config = AutoConfig.for_model(family.model_type, **ids, **family.config)
    config.tie_word_embeddings = family.tied  # else an output head of its own, as build_tiny_model's
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    stops = [tok.eos_token_id, *tok.convert_tokens_to_ids(list(family.eos_ids))]
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = tok.pad_token_id
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)
