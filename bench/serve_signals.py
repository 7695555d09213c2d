"""What the quality signals (serve.signals) cost: tokens/s of one vLLM engine with the hook off and on, side by side.

    .venv/bin/python bench/serve_signals.py --model tiny-llama --json      # ~3 min on 2 shared cores
    .venv/bin/python bench/serve_signals.py --model smollm2-135m-instruct --top-k 20 --sample-rate 0.25 1

One AsyncLLM engine with the app's engine settings (LoRA on, the app's slots) serves `--concurrency` requests at a
time, half on the base and half on a random LoRA adapter, `--max-tokens` each, greedy. Each round runs the same
load with `generate` as vLLM made it (off) and wrapped by serve.signals.instrument for each k of `--top-k` (on:
top-k log-probs asked of the engine, entropy, length, finish reason, empty/refusal; 0 = every signal but the
entropy) and each serve.signals.sample_rate of `--sample-rate` (the share of requests whose entropy is
measured; the default 0.25 is the app's), in a rotating order; the figure of each variant is the median tokens/s
of `--rounds` rounds, and the ratio on/off of each variant is printed (the target is >= 0.95). The engine is the
serving cost's floor: in the full app (Ray Serve, the OpenAI layer, HTTP) the same absolute cost is a smaller
share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = ["The weather in Paris today is", "Write a short note about rivers:", "Once upon a time, a city",
           "List three colours and a number:"]


async def run_load(engine, generate, lora, concurrency: int, requests: int, max_tokens: int) -> dict:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    counter = iter(range(10**9))

    async def one(i: int) -> int:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        n = 0
        async for out in generate(PROMPTS[i % len(PROMPTS)], params, f"bench-{next(counter)}-{time.monotonic_ns()}",
                                  lora_request=lora if i % 2 else None):
            n = len(out.outputs[0].token_ids)
        return n

    t0 = time.perf_counter()
    queue = list(range(requests))
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            n = await one(queue.pop())  # not `tokens += await ...`: that reads `tokens` before the await
            tokens += n

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall}


async def bench(args: argparse.Namespace) -> dict:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    from pipelines.artifacts.models import ModelConfig, resolve_model
    from serve.app import llm_config
    from serve.config import ServeConfig
    from serve.signals import instrument
    from tests.integration.test_serve import make_adapter

    base = resolve_model(ModelConfig(name=args.model))
    adapter = make_adapter(base, Path(tempfile.mkdtemp(prefix="loraforge-bench-")) / "a", seed=1)
    kw = llm_config(ServeConfig(max_model_len=args.max_model_len), base, gpu=False).engine_kwargs
    keep = ("dtype", "max_model_len", "enable_lora", "max_lora_rank", "max_loras", "max_cpu_loras", "enforce_eager")
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=base, disable_log_stats=True,
                                                       **{k: kw[k] for k in keep}))
    lora = LoRARequest("base:a", 1, adapter)
    answers: list = []
    variants = {"off": engine.generate}
    for k in args.top_k:
        for rate in args.sample_rate:
            instrument(engine, k, answers.append, rate)
            variants[f"k{k}" + ("" if rate == 1 else f"@{rate:g}")] = engine.generate
            engine.generate = variants["off"]
    for generate in variants.values():  # warm-up: the first request with log-probs compiles the engine's path
        await run_load(engine, generate, lora, args.concurrency, args.concurrency, args.max_tokens)
    runs: dict[str, list[float]] = {v: [] for v in variants}
    names = list(variants)
    for r in range(args.rounds):
        for v in names[r % len(names):] + names[:r % len(names)]:  # rotate the order: no variant always first
            res = await run_load(engine, variants[v], lora, args.concurrency, args.requests, args.max_tokens)
            runs[v].append(res["tok_s"])
            print(f"round {r + 1} {v}: {res['tok_s']:.0f} tok/s ({res['tokens']} tokens, {res['wall_s']:.1f} s)",
                  flush=True)
    engine.shutdown()
    med = {v: statistics.median(x) for v, x in runs.items()}
    entropies = [a.entropy for a in answers if a.entropy is not None]  # every variant's, warm-up included
    return {"model": args.model, "concurrency": args.concurrency, "requests": args.requests,
            "max_tokens": args.max_tokens, "rounds": args.rounds, "tok_s_median": med, "tok_s_runs": runs,
            "ratio_on_off": {v: med[v] / med["off"] for v in med if v != "off"},
            "sample_rate": args.sample_rate, "top_k": args.top_k, "answers_measured": len(answers),
            "answers_with_entropy": len(entropies), "mean_entropy": statistics.fmean(entropies) if entropies else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llama", help="a built-in model name or an HF folder")
    p.add_argument("--top-k", type=int, nargs="+", default=[20], help="k values to measure (0: no entropy)")
    p.add_argument("--sample-rate", type=float, nargs="+", default=[0.25], help=(
        "serve.signals.sample_rate values to measure (share of requests whose entropy is measured; 1: all)"))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=128, help="requests per round and variant")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    args = p.parse_args()
    out = asyncio.run(bench(args))
    for v, ratio in out["ratio_on_off"].items():
        print(f"signals {v}: {out['tok_s_median'][v]:.0f} tok/s vs off {out['tok_s_median']['off']:.0f} tok/s: "
              f"ratio {ratio:.3f} (target >= 0.95)")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
