"""The rollout engine of the rl stage: a Ray actor holding one vLLM engine over the base model, configured as
serving configures its replicas (serve.app.llm_config's engine settings, the CPU LoRA plugin loads in its
processes as in theirs), that samples with whichever adapter version the trainer published last.

Weight sync is adapter-only and versioned: after each optimizer step the trainer publishes `policy@N` (the
adapter's two files; the base never moves) and puts their bytes into Ray's object store (`ray.put` on the
trainer's node); `sync` gets the reference and Ray moves the bytes to the engine's node, so the engine may sit
on another node. The engine writes them into its own folder, loads them under a LoRA id never
used before in this engine (vLLM caches by id: a reused id would serve the older weights), and drops versions
older than the staleness bound. Every rollout names the version that sampled it; the trainer checks it.

The actor runs one call at a time (Ray's default): a sync queued behind a rollout applies after it, which is
what lets rollouts of step k+1 overlap training of step k with staleness 1.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.schema import vllm_in_one_process


def model_len(base_model: str, cap: int) -> int:
    """The context vLLM reserves KV cache for: the model's own limit (config.json), capped at serve.max_model_len."""
    try:
        own = json.loads((Path(base_model) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        own = None
    return min(cap, int(own)) if own else cap


def engine_env(serve_cfg) -> dict[str, str]:
    """What vLLM reads at import in the actor's processes, as serving sets it for its replicas (serve.app)."""
    return {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(serve_cfg.kv_cache_gb)))}


def engine_kwargs(serve_cfg, base_model: str, *, max_loras: int, gpu: bool, seed: int) -> dict[str, Any]:
    """vLLM's LLM arguments from the serve section: the same dtype, context, LoRA rank and eager mode the serving
    replicas use (serve.app.llm_config), `max_loras` slots, and vLLM's processed log-probs (after temperature and
    top-p: the distribution the completion was drawn from, which the loss needs; TRL asks for the same)."""
    return {"model": base_model, "dtype": serve_cfg.engine_dtype(gpu),
            "max_model_len": model_len(base_model, serve_cfg.max_model_len), "enable_lora": True,
            "max_lora_rank": serve_cfg.max_lora_rank, "max_loras": max_loras, "max_cpu_loras": max_loras,
            "enforce_eager": not gpu, "seed": seed, "logprobs_mode": "processed_logprobs",
            **({"gpu_memory_utilization": serve_cfg.gpu_memory_utilization} if gpu else {})}


class RolloutEngine:
    """Ray actor: vLLM + the adapter versions of one rl run at a time."""

    def __init__(self, kwargs: dict[str, Any], staleness: int):
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        import ray
        from vllm import LLM

        vllm_in_one_process("cuda" if ray.get_gpu_ids() else "cpu")

        t0 = time.time()
        self.llm = LLM(**kwargs)
        self.start_s = time.time() - t0
        self.staleness = staleness
        self.root = Path(tempfile.mkdtemp(prefix="loraforge-rollout-"))
        self.run: str | None = None
        self.versions: dict[int, Any] = {}  # version -> LoRARequest, of self.run
        self.published: dict[int, float] = {}
        self.first_used: dict[int, float] = {}
        self.next_id = 0
        self.node_id = ray.get_runtime_context().get_node_id()

    def info(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "start_s": self.start_s, "loaded": sorted(self.versions), "run": self.run}

    def reset(self, run: str, staleness: int) -> None:
        """Start serving run `run`: every adapter of an earlier run is dropped from the engine."""
        for req in self.versions.values():
            self.llm.llm_engine.remove_lora(req.lora_int_id)
        shutil.rmtree(self.root / "versions", ignore_errors=True)
        self.run, self.staleness, self.versions, self.published, self.first_used = run, staleness, {}, {}, {}

    def sync(self, run: str, version: int, files: dict[str, bytes], published_at: float) -> dict[str, Any]:
        """Load `policy@version` from its files; drop versions older than version - staleness."""
        from vllm.lora.request import LoRARequest

        if run != self.run:
            raise RuntimeError(f"rollout engine serves run {self.run!r}; sync for {run!r} refused")
        if version in self.versions:
            raise RuntimeError(f"policy@{version} is already loaded: versions are immutable")
        t0 = time.time()
        folder = self.root / "versions" / f"policy@{version}"
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / Path(name).name).write_bytes(data)
        self.next_id += 1
        req = LoRARequest(f"{run}/policy@{version}", self.next_id, str(folder))
        self.llm.llm_engine.add_lora(req)
        self.versions[version], self.published[version] = req, published_at
        dropped = []
        for old in [v for v in self.versions if v < version - self.staleness]:
            self.llm.llm_engine.remove_lora(self.versions.pop(old).lora_int_id)
            shutil.rmtree(self.root / "versions" / f"policy@{old}", ignore_errors=True)
            dropped.append(old)
        return {"version": version, "lora_id": req.lora_int_id, "load_s": time.time() - t0, "node_id": self.node_id,
                "bytes": sum(len(d) for d in files.values()),
                "loaded_at": time.time(), "dropped": dropped, "loaded": sorted(self.versions)}

    def rollout(self, run: str, prompt_ids: list[list[int]], n: int, *, temperature: float, top_p: float,
                max_tokens: int, seed: int, drill_base: bool = False) -> dict[str, Any]:
        """n completions per prompt from the newest loaded version, each token's log-prob under the sampling
        distribution. drill_base: sample from the base model while recording the version (the fault drill)."""
        from vllm import SamplingParams

        if run != self.run or not self.versions:
            raise RuntimeError(f"rollout engine has no version of run {run!r} loaded")
        version = max(self.versions)
        req = self.versions[version]
        started = time.time()
        first = version not in self.first_used
        if first:
            self.first_used[version] = started
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                                seed=seed)
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params,
                                 lora_request=None if drill_base else req, use_tqdm=False)
        groups = []
        for out in outs:
            group = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                ids = list(o.token_ids)
                lps = [float("nan") if d is None or t not in d or d[t].logprob is None else float(d[t].logprob)
                       for d, t in zip(o.logprobs or [None] * len(ids), ids)]
                group.append({"ids": ids, "text": o.text, "logprobs": lps, "finish": o.finish_reason})
            groups.append(group)
        finished = time.time()
        return {"version": version, "lora_id": req.lora_int_id, "node_id": self.node_id, "started_at": started,
                "finished_at": finished,
                "first_on_version": first, "sync_s": started - self.published[version] if first else None,
                "tokens": sum(len(c["ids"]) for g in groups for c in g), "groups": groups}


def start_engine(kwargs: dict[str, Any], staleness: int, *, num_cpus: float, num_gpus: float, env: dict[str, str],
                 node_id: str | None = None):
    """The RolloutEngine as a Ray actor (on `node_id` when given); returns its handle once the engine is up."""
    import ray

    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "runtime_env": {"env_vars": env}}
    if node_id:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    handle = ray.remote(RolloutEngine).options(**options).remote(kwargs, staleness)
    ray.get(handle.info.remote())  # raises here when the engine cannot start
    return handle
