"""serve.guard and the serve config's "closed by default" rules: keys, CORS, /docs, request caps, names. No engine:
the middleware runs in a bare FastAPI app (and in Ray's ingress app, to see its allow-every-origin CORS go).

    .venv/bin/python -m pytest tests/unit/serve/test_serve_guard.py -q
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.testclient import TestClient

from cluster.config import load_config
from pipelines.artifacts.registry import RegistryError, check_alias, check_name
from pipelines.artifacts.registry import parse_ref as registry_ref
from pipelines.schema import ConfigError
from serve.adapters import parse_ref
from serve.config import ServeConfig
from serve.errors import APIError, BadAdapterName
from serve.guard import InFlight, bearer_token, check_request, key_matches, prompt_count, secure

# ------------------------------------------------------------------------------------------------ config rules


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "serve.example.com"])
def test_non_loopback_host_without_key_is_refused(host):
    with pytest.raises(ValidationError, match=rf"serve.host={host} is reachable.*serve.api_key.*"
                                              "serve.allow_unauthenticated=true"):
        ServeConfig(host=host)
    assert ServeConfig(host=host, api_key="k1").host == host
    assert ServeConfig(host=host, allow_unauthenticated=True).allow_unauthenticated


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "localhost", "::1"])
def test_loopback_host_may_go_without_key(host):
    assert ServeConfig(host=host).api_key is None


@pytest.mark.parametrize("key", ["", " ", "k1 k2", "k1\n"])
def test_empty_or_whitespace_key_is_refused(key):
    with pytest.raises(ValidationError, match="api_key must be a non-empty string without whitespace"):
        ServeConfig(api_key=key)


@pytest.mark.parametrize("overrides, needles", [
    (["serve.host=0.0.0.0"], ["serve: serve.host=0.0.0.0 is reachable", "serve.allow_unauthenticated"]),
    (["serve.host=0.0.0.0", "serve.api_key="], ["serve.api_key: api_key must be a non-empty", "(got '')"]),
    (["serve.api_key="], ["serve.api_key: api_key must be a non-empty"]),
    (["serve.api_key=k1 secret"], ["serve.api_key", "(got '***')"]),
    (["serve.cors_origins=['*']"], ["serve.cors_origins", "no '*'"]),
    (["serve.limits.max_tokens=2048"], ["limits.max_tokens (2048) > max_model_len (1024)"]),
    (["serve.limits.max_n=0"], ["serve.limits.max_n"]),
])
def test_config_errors_are_one_line_naming_the_key(overrides, needles):
    """What the CLI prints (load_config's ConfigError, exit 2): one line, naming the key; a key is never echoed."""
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    message = str(e.value)
    assert "\n" not in message and "secret" not in message, message
    for needle in needles:
        assert needle in message, message


def test_opt_outs_validate():
    cfg = load_config(None, ["serve.host=0.0.0.0", "serve.allow_unauthenticated=true",
                             "serve.cors_origins=['https://app.example.com', 'http://localhost:3000']"])
    assert cfg.serve.allow_unauthenticated and cfg.serve.cors_origins[1] == "http://localhost:3000"
    assert load_config(None, ["serve.host=0.0.0.0", "serve.api_key=k1"]).serve.api_key == "k1"


def test_names_are_matched_to_the_end_of_the_string():
    """`$` matches before a trailing newline: every name grammar anchors with \\Z and matches the whole string."""
    for name in ("city\n", "city\n\n", "\ncity", "city\r"):
        with pytest.raises(RegistryError):
            check_name(name)
        with pytest.raises(RegistryError):
            registry_ref(f"ok@{name}")
        with pytest.raises(BadAdapterName):
            parse_ref(name)
    with pytest.raises(RegistryError, match="alias 'production\\\\n'"):
        check_alias("production\n")
    with pytest.raises(ValidationError, match="model_alias"):
        ServeConfig(model_alias="base\n")
    assert check_name("city") == "city" and check_alias("production") == "production"


# ------------------------------------------------------------------------------------------------ keys


@pytest.mark.parametrize("header, token", [
    ("Bearer k1", "k1"), ("bearer k1", "k1"), ("BEARER k1", "k1"), ("Bearer   k1 ", "k1"),
    ("k1", None), ("Basic k1", None), ("Bearer", None), ("", None), (None, None), ("Bearerk1", None)])
def test_bearer_scheme_is_case_insensitive_and_required(header, token):
    assert bearer_token(header) == token


def test_key_matches():
    assert key_matches(None, None) and key_matches("x", None)
    assert key_matches("k1", "k1") and not key_matches("k2", "k1") and not key_matches(None, "k1")


# ------------------------------------------------------------------------------------------------ request caps


def completion(**kw):
    return SimpleNamespace(**{"prompt": "hi", "n": 1, "max_tokens": 16, "logprobs": None, "prompt_logprobs": None,
                              **kw})


def chat(**kw):
    return SimpleNamespace(**{"messages": [{"role": "user", "content": "hi"}], "n": 1, "max_tokens": None,
                              "max_completion_tokens": None, "logprobs": False, "top_logprobs": 0,
                              "prompt_logprobs": None, **kw})


@pytest.mark.parametrize("body, message", [
    (completion(n=64), "n=64 exceeds the cap of 8 (serve.limits.max_n)"),
    (chat(n=9), "n=9 exceeds the cap of 8 (serve.limits.max_n)"),
    (completion(prompt=["a"] * 33), "prompts=33 exceeds the cap of 32 (serve.limits.max_prompts)"),
    (completion(prompt=[[1, 2]] * 40), "prompts=40 exceeds the cap of 32 (serve.limits.max_prompts)"),
    (chat(messages=[{}] * 257), "messages=257 exceeds the cap of 256 (serve.limits.max_messages)"),
    (completion(max_tokens=1025), "max_tokens=1025 exceeds the cap of 1024 (serve.max_model_len)"),
    (chat(max_completion_tokens=4000), "max_completion_tokens=4000 exceeds the cap of 1024 (serve.max_model_len)"),
    (completion(logprobs=21), "logprobs=21 exceeds the cap of 20 (serve.limits.max_logprobs)"),
    (completion(logprobs=-1), "logprobs=-1 exceeds the cap of 20 (serve.limits.max_logprobs)"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs=21 exceeds the cap of 20 (serve.limits.max_logprobs)"),
    (chat(prompt_logprobs=-1), "prompt_logprobs=-1 exceeds the cap of 20 (serve.limits.max_logprobs)"),
])
def test_over_a_cap_is_400_naming_cap_and_key(body, message):
    with pytest.raises(APIError) as e:
        check_request(body, ServeConfig())
    assert (e.value.status, e.value.message) == (400, message)


def test_within_caps_passes_and_caps_are_configurable():
    cfg = ServeConfig()
    for body in (completion(n=8, prompt=["a"] * 32, max_tokens=1024, logprobs=20), completion(prompt=list(range(900))),
                 chat(n=8, messages=[{}] * 256, max_tokens=1024, logprobs=True, top_logprobs=20, prompt_logprobs=5),
                 completion(n=0, max_tokens=-3, prompt_logprobs=-5)):  # the engine's own 400s name those
        check_request(body, cfg)
    small = ServeConfig(max_model_len=512, limits={"max_tokens": 64, "max_n": 2})
    with pytest.raises(APIError, match=r"max_tokens=65 exceeds the cap of 64 \(serve.limits.max_tokens\)"):
        check_request(completion(max_tokens=65), small)
    with pytest.raises(APIError, match=r"n=3 .*serve.limits.max_n"):
        check_request(chat(n=3), small)
    assert prompt_count("x") == prompt_count([1, 2, 3]) == prompt_count([]) == 1 and prompt_count(["a", "b"]) == 2


def test_in_flight_per_key_429_then_free_again():
    slots = InFlight(2)
    slots.acquire("key:a")
    slots.acquire("key:a")
    slots.acquire("key:b")
    with pytest.raises(APIError) as e:
        slots.acquire("key:a")
    assert e.value.status == 429 and "serve.limits.max_concurrent_per_key" in e.value.message
    slots.release("key:a")
    slots.acquire("key:a")
    for _ in range(3):
        slots.release("key:a")
    assert "key:a" not in slots.active and slots.active == {"key:b": 1}
    unlimited = InFlight(None)
    for _ in range(100):
        unlimited.acquire("x")
    assert unlimited.active == {}


def test_429_carries_retry_after():
    from serve.errors import RETRY_429_S, error_response

    r = error_response(429, "too many", retry_after=True)
    assert r.status_code == 429 and r.headers["retry-after"] == str(RETRY_429_S)


# ------------------------------------------------------------------------------------------------ the middleware


def client_for(cfg: ServeConfig, app=None):
    app = app if app is not None else FastAPI()

    @app.post("/v1/completions")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    return TestClient(secure(app, cfg))


PREFLIGHT = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


def test_docs_follow_the_key_or_are_off():
    c = client_for(ServeConfig(api_key="k1"))
    for path in ("/docs", "/openapi.json", "/redoc"):
        r = c.get(path)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"], path
        assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get(path, headers={"Authorization": "bearer k1"}).status_code == 200, path
    assert client_for(ServeConfig()).get("/openapi.json").status_code == 200  # loopback, no key: open like /v1
    off = client_for(ServeConfig(api_key="k1", docs=False))
    assert off.get("/openapi.json", headers={"Authorization": "Bearer k1"}).status_code == 404


def test_cors_is_off_unless_origins_are_listed():
    from serve.ray_llm import init

    for c in (client_for(ServeConfig()), client_for(ServeConfig(api_key="k1"), app=init())):
        r = c.options("/v1/completions", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in r.headers, dict(r.headers)
        r = c.post("/v1/completions", json={}, headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    c = client_for(ServeConfig(cors_origins=["https://app.example.com"]))
    assert "access-control-allow-origin" not in c.options("/v1/completions", headers=PREFLIGHT).headers
    r = c.options("/v1/completions", headers={**PREFLIGHT, "Origin": "https://app.example.com"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"


def test_ray_ingress_app_loses_its_allow_every_origin_cors():
    from fastapi.middleware.cors import CORSMiddleware

    from serve.ray_llm import init

    app = init()
    assert any(m.cls is CORSMiddleware for m in app.user_middleware)  # Ray's: allow_origins=["*"], credentials
    secure(app, ServeConfig())
    assert not any(m.cls is CORSMiddleware for m in app.user_middleware)


def test_body_over_the_cap_is_413_naming_the_key():
    c = client_for(ServeConfig(limits={"max_body_bytes": 1024}))
    assert c.post("/v1/completions", content=b"x" * 1024).json() == {"bytes": 1024}
    r = c.post("/v1/completions", content=b"x" * 1025)
    assert r.status_code == 413
    assert r.json()["error"]["message"] == ("request body of 1025 bytes exceeds the cap of 1024 "
                                            "(serve.limits.max_body_bytes)")

    def chunks(n):  # no Content-Length: chunked transfer
        for _ in range(n):
            yield b"x" * 300

    assert c.post("/v1/completions", content=chunks(3)).json() == {"bytes": 900}
    r = c.post("/v1/completions", content=chunks(4))
    assert r.status_code == 413 and "serve.limits.max_body_bytes" in r.json()["error"]["message"]
