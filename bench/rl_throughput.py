"""Online RL throughput: TRL's GRPOTrainer (LoRA, use_vllm=False: generation with transformers inside the training
process) vs loraforge's rl stage (rollouts on a vLLM Ray actor,
adapter-only versioned sync), on the same model, prompts, G, lengths, learning rate and reward.

    .venv/bin/python bench/rl_throughput.py --steps 8 --repeats 3 --json --plot bench/results/rl_reward.png \
        --save bench/results/rl_throughput.json
    .venv/bin/python bench/rl_throughput.py --model tiny-llama --steps 3 --repeats 1 --json   # smoke

Same settings on both sides: the prompts (the first --prompts of PROMPTS, chat-templated by the model's own
template), G, max new tokens, temperature 1 / top-p 1 / no top-k, lr with a cosine schedule and no warmup, AdamW
(weight decay 0, grad-norm clip 1.0), LoRA (r, alpha 2r, dropout 0, all linear layers), beta 0, one update per
generation (num_iterations 1), loss aggregation `grpo` (per-sequence token mean; TRL 1.16's default is `dapo`, so
it is set), group-std-scaled advantages, float32, no gradient checkpointing (TRL 1.16 turns it on by default; ours
does not use it), seed 0. By default every step samples every prompt (--prompts = --prompts-per-step): the steps'
rewards are then of the same prompts on both sides, so the reward curves compare step by step (with 2 of 12
prompts per step the reward after N steps mostly says which prompts the shuffle drew).

Every contender runs in its own fresh process (this script re-invoked with --contender), one after another. Seconds
per step are the median over the run's steps after the first (TRL: wall time between optimizer steps, from a
callback; ours: the stage's per-step records, rollout wait included; model and engine start-up excluded on both
sides). Rollout tokens/s: completion tokens over generation seconds. Sync seconds (ours): publish of policy@N →
first rollout on it. Reward: the mean over the last two steps. The table gives medians over --repeats runs; the
ratios are of medians, from one invocation (same machine state). The last line with --json is the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONTENDERS = ("trl", "ours")
LABELS = {"trl": "TRL GRPOTrainer", "ours": "loraforge rl"}
PROMPTS = ["Name a city.", "Say a date.", "Where is Oslo?", "Pick a colour.", "Count to three.", "Greet me.",
           "What is the weather?", "Tell me a word.", "Name an animal.", "Say hello.", "Give a number.",
           "Name a month."]


def prompt_set(args) -> list[str]:
    n = args.prompts or args.prompts_per_step
    if not 1 <= n <= len(PROMPTS):
        raise SystemExit(f"--prompts {n}: between 1 and {len(PROMPTS)}")
    return PROMPTS[:n]


def reward_args(args) -> dict:
    """The shared reward's arguments: length_penalty linear in the characters (never saturated at these lengths)."""
    return {"max_chars": 0, "scale": 8 * args.max_new_tokens}


def trl_reward(args):
    """The same reward in TRL's call convention (chat completions as message lists)."""
    from pipelines.train.rewards import length_penalty

    def length_reward(prompts, completions, **kw):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return length_penalty(prompts, texts, **reward_args(args))

    return length_reward


def model_dir(name: str, work: Path) -> str:
    from pipelines.artifacts.models import ModelConfig, build_tiny_model, resolve_model

    if name == "tiny-llama":
        return build_tiny_model(work / "tiny-llama", seed=0)
    return resolve_model(ModelConfig(name=name))


def run_trl(args, model: str, work: Path, seed: int, shared: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(seed)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompt_set(args)])
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    cfg = GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.prompts_per_step * args.g,
                     num_generations=args.g, max_completion_length=args.max_new_tokens, temperature=1.0,
                     learning_rate=args.lr, max_steps=args.steps, lr_scheduler_type="cosine", warmup_steps=0,
                     beta=0.0, loss_type="grpo", scale_rewards="group", num_iterations=1, top_p=1.0, top_k=0,
                     epsilon=0.2, weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False,
                     use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no", seed=seed,
                     dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward(args), args=cfg, train_dataset=ds,
                          peft_config=LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"),
                          callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "reward" in h]
    steps = [b - a for a, b in zip(times, times[1:])]
    tokens = [h.get("completions/mean_length", 0) * args.prompts_per_step * args.g for h in logs]
    rewards = [h["reward"] for h in logs]
    return {"step_s": statistics.median(steps) if steps else total, "total_s": total,
            "rollout_tokens_per_s": None, "completion_tokens": sum(tokens), "sync_s": None,
            "reward_last": statistics.mean(rewards[-2:]), "reward_first": statistics.mean(rewards[:2]),
            "rewards": rewards}


def run_ours(args, model: str, work: Path, seed: int, shared: dict) -> dict:
    """One run of the rl stage. With --in-process the runs of this process share one Ray and one rollout engine
    (started as rl.run starts its own, reset by rl.run for each run); the engine's start-up is outside the step
    times either way."""
    import ray

    from pipelines.train import rl
    from pipelines.train.config import LoraSection, TrainSection, TrainSetup
    from pipelines.train.rl_config import RLSection
    from pipelines.train.rollout import engine_env, engine_kwargs, start_engine
    from serve.config import ServeConfig

    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompt_set(args)))
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
                                           "TOKENIZERS_PARALLELISM": "false"}})
    cfg = RLSection(prompts_path=str(prompts), rewards=[{"fn": "length_penalty", "args": reward_args(args)}],
                    num_generations=args.g, prompts_per_step=args.prompts_per_step,
                    micro_batch_size=args.prompts_per_step * args.g, sampling={"max_new_tokens": args.max_new_tokens},
                    steps=args.steps, lr=args.lr, staleness=args.staleness, seed=seed,
                    parity={"warn": 0.05, "stop": 1.0})
    setup = TrainSetup(model_dir=model, train=TrainSection(num_workers=1, cpus_per_worker=1, log_every=1,
                                                           tracking_uri="off"))
    serve_cfg = ServeConfig(max_lora_rank=max(8, args.r), max_model_len=512)
    if args.in_process and "engine" not in shared:
        shared["engine"] = start_engine(engine_kwargs(serve_cfg, model, max_loras=cfg.staleness + 2, gpu=False,
                                                      seed=seed), cfg.staleness, num_cpus=cfg.rollout_cpus,
                                        num_gpus=0, env=engine_env(serve_cfg))
    t0 = time.perf_counter()
    out = rl.run(cfg, setup, LoraSection(r=args.r, alpha=2 * args.r, dropout=0.0), serve_cfg, work / "ours",
                 engine=shared.get("engine"))
    total = time.perf_counter() - t0
    steps = [json.loads(line) for line in (out / "rl_steps.jsonl").read_text().splitlines()]
    rewards = [s["reward_mean"] for s in steps]
    sync = [s["sync_s"] for s in steps if s.get("sync_s") is not None]
    if not args.in_process:
        ray.shutdown()
    return {"step_s": statistics.median(s["step_s"] for s in steps[1:]) if len(steps) > 1 else steps[0]["step_s"],
            "total_s": total,
            "rollout_tokens_per_s": sum(s["completion_tokens"] for s in steps) / sum(s["rollout_s"] for s in steps),
            "completion_tokens": sum(s["completion_tokens"] for s in steps),
            "sync_s": statistics.median(sync) if sync else None,
            "parity_mean_max": max(s["parity_mean"] for s in steps),
            "parity_mean": statistics.median(s["parity_mean"] for s in steps),
            "reward_last": statistics.mean(rewards[-2:]), "reward_first": statistics.mean(rewards[:2]),
            "rewards": rewards}


def contender(args) -> None:
    """Run `args.run` (a fresh process per run), or with --in-process every run, one after another (seed = the
    run's number on both sides: the repeats sample differently)."""
    fn = run_trl if args.contender == "trl" else run_ours
    shared: dict = {}
    for run in range(args.repeats) if args.in_process else [args.run]:
        work = Path(args.work) / f"{args.contender}-{run}"
        work.mkdir(parents=True, exist_ok=True)
        result = fn(args, args.model_dir, work, run, shared)
        print("RESULT " + json.dumps(result), flush=True)


def _median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _curve(rows: list[dict]) -> list[float]:
    """The median over runs of each step's mean reward."""
    n = min(len(r["rewards"]) for r in rows)
    return [statistics.median(r["rewards"][i] for r in rows) for i in range(n)]


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, color in (("trl", "tab:orange"), ("ours", "tab:blue")):
        if name not in summary:
            continue
        for r in summary[name]["runs"]:
            ax.plot(range(1, len(r["rewards"]) + 1), r["rewards"], color=color, alpha=0.25, lw=1)
        curve = summary[name]["reward_curve"]
        ax.plot(range(1, len(curve) + 1), curve, color=color, lw=2, marker="o",
                label=f"{LABELS[name]} (median of {len(summary[name]['runs'])})")
    st = summary["settings"]
    ax.set(xlabel="optimizer step", ylabel="mean reward of the step's rollouts",
           title=f"GRPO on {st['model']}: G={st['g']}, {st['prompts']} prompts, {st['max_new_tokens']} tokens, "
                 f"lr {st['lr']}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model.name, or tiny-llama (built here)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--staleness", type=int, default=0, choices=(0, 1))
    ap.add_argument("--prompts", type=int, default=None, help="prompts in the set (default: --prompts-per-step)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1500, help="seconds one contender process may take")
    ap.add_argument("--in-process", action="store_true", help=(
        "one process per contender runs all its repeats (TRL: the model loaded again per run; ours: one Ray and one "
        "rollout engine for the runs) instead of a fresh process per run: far less start-up on a loaded machine; "
        "the contenders then run one after the other, not interleaved"))
    ap.add_argument("--parallel", action="store_true", help=(
        "with --in-process: run the two contender processes at the same time (on a machine loaded by others, each "
        "gets about the share it would get alone; on an idle machine they slow each other)"))
    ap.add_argument("--plot", help="write both contenders' reward per step (PNG) here")
    ap.add_argument("--save", help="write the summary JSON here")
    ap.add_argument("--only", choices=CONTENDERS, action="append", help="run only these contenders")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON, the last line")
    ap.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.prompts = len(prompt_set(args))
    if args.parallel and not args.in_process:
        raise SystemExit("--parallel needs --in-process")
    if args.contender:
        contender(args)
        return
    load_start, t_start = round(os.getloadavg()[0], 2), time.time()
    with tempfile.TemporaryDirectory(prefix="rl-bench-") as work:
        mdir = model_dir(args.model, Path(work))
        results: dict[str, list[dict]] = {c: [] for c in (args.only or CONTENDERS)}
        plan = [(name, None) for name in results] if args.in_process else \
            [(name, rep) for rep in range(args.repeats) for name in results]
        lock = threading.Lock()
        summary: dict = {}

        def consume(name: str, rep: int | None) -> None:
            nonlocal summary
            for r in _launch(args, name, rep, work, mdir):
                with lock:
                    results[name].append(r)
                    print(f"{name:>5} run {len(results[name]) - 1}: {r['step_s']:.2f} s/step, reward "
                          f"{r['reward_first']:.3f} → {r['reward_last']:.3f}, load {os.getloadavg()[0]:.1f}",
                          flush=True)
                    summary = summarise(args, results, load_start, t_start)  # kept after every run: a partial
                    write(args, summary)  # result survives a timeout

        if args.parallel:  # both contenders at once, each in its process (only with --in-process)
            threads = [threading.Thread(target=consume, args=step) for step in plan]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for step in plan:
                consume(*step)
    if "ratios" in summary:
        t, o = summary["trl"], summary["ours"]
        print(f"\nsteps/hour ours / TRL = {summary['ratios']['steps_per_hour_ours_over_trl']:.2f} (goal >= 2); "
              f"reward after {args.steps} steps: ours {o['reward_last']:.3f}, TRL {t['reward_last']:.3f}; sync "
              f"{o['sync_s'] or float('nan'):.3f} s (goal <= 1); parity mean {o['parity_mean']:.2e} (goal <= 0.01)")
    if args.json:
        print(json.dumps(summary, default=str))


def _launch(args, name: str, rep: int | None, work: str, mdir: str):
    """Run a contender in a fresh process (run `rep`, or every run with --in-process); yield each run's result as
    its RESULT line arrives."""
    cmd = [sys.executable, __file__, "--contender", name, "--run", str(rep or 0), "--work", work, "--model-dir", mdir,
           "--steps", str(args.steps), "--g", str(args.g), "--prompts-per-step", str(args.prompts_per_step),
           "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr), "--r", str(args.r), "--staleness",
           str(args.staleness), "--prompts", str(args.prompts), "--repeats", str(args.repeats)]
    if rep is None:
        cmd.append("--in-process")
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
        tail: list[str] = []
        deadline = time.time() + args.timeout
        for line in proc.stdout:
            if line.startswith("RESULT "):
                yield json.loads(line[len("RESULT "):])
            tail = (tail + [line])[-40:]
            if time.time() > deadline:
                proc.kill()
        if proc.wait():
            err.seek(0)
            sys.stderr.write("".join(tail) + err.read()[-6000:])
            raise SystemExit(f"{name} failed (exit {proc.returncode})")


def summarise(args, results: dict[str, list[dict]], load_start: float, t_start: float) -> dict:
    summary: dict = {"settings": {k: getattr(args, k) for k in ("model", "steps", "g", "prompts", "prompts_per_step",
                                                                   "max_new_tokens", "lr", "r", "staleness",
                                                                   "repeats")},
                     "mode": "in-process" + (", parallel" if args.parallel else "") if args.in_process else
                     "a fresh process per run, interleaved",
                     "load_avg_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
                     "seconds": round(time.time() - t_start)}
    for name, rows in results.items():
        if not rows:
            continue
        summary[name] = {k: _median(rows, k) for k in ("step_s", "total_s", "rollout_tokens_per_s", "sync_s",
                                                        "reward_first", "reward_last", "parity_mean",
                                                        "parity_mean_max")}
        summary[name]["steps_per_hour"] = 3600 / summary[name]["step_s"]
        summary[name]["reward_curve"] = _curve(rows)
        summary[name]["runs"] = rows
    if "trl" in summary and "ours" in summary:
        t, o = summary["trl"], summary["ours"]
        summary["ratios"] = {"steps_per_hour_ours_over_trl": t["step_s"] / o["step_s"],
                             "reward_last_ours_minus_trl": o["reward_last"] - t["reward_last"],
                             "runs": [len(t["runs"]), len(o["runs"])]}
    return summary


def write(args, summary: dict) -> None:
    if args.plot:
        plot(summary, args.plot)
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(summary, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
