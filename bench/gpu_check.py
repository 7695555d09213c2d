"""The GPU check (issue 33): one prepared call on a lent GPU machine that runs loraforge's training paths at real
shapes, each figure written beside the prediction made before it ran (../shared/GPU_CHECK.md).

    bash bench/gpu_wheels.sh                   # here: the wheel set into .whl/ (git-ignored), and what would travel
    # run tool: command `bash bench/gpu_check.sh`, carry [".whl"], timeout_s 480   (installs .whl/, then this)
    bash bench/gpu_check.sh --dry-run          # every phase at tiny shapes on CPU (tests/integration/test_gpu_check.py)
    .venv/bin/python bench/gpu_check.py --dry-run --phases 0,2 --json

Phases: 0 GEMM ceilings (bf16 / fp32 / TF32); 1 QLoRA on the Llama-3.2-1B shape, 12 steps × 4 × 2048 tokens,
through the project's own loop in one process (`sft.run` with `local=True`): tokens/s, MFU, peak memory against
`loraforge plan`, loss, frozen checksum; 2 bf16 LoRA with TF32, and the lean loss against the plain one on one
batch; 3 packed rows; 4 DeepSpeed ZeRO-2 QLoRA and ZeRO-3 bf16 LoRA; 5 test_gpu.py's body through real Ray Train;
6 the Qwen2.5-7B shape under QLoRA with gradient checkpointing, if time is left.
MFU = 4·N·tokens/s / peak, N = the matmul parameters (linear layers + LM head; the embedding lookup is free): a
frozen base costs a forward (2N per token) and a backward for activation gradients only (2N), no weight gradients.
`mfu_planner` uses cluster.plan.train_flops instead (adds LoRA's own 6 per parameter and attention).
Each phase runs in a forked child (its own CUDA context, memory peak and process group, killed at its time budget);
this process never touches CUDA. One JSON line per phase goes to $OUT/gpu_check.jsonl as it ends, so a call cut
short still returns what was measured; the Markdown table comes last (stdout and $OUT/gpu_check.md), then with
--json the whole record on the last line. Models are random-init at real shapes, built here (nothing can be
downloaded there); token ids are random, drawn from the first eighth of the vocabulary so that a loss can fall.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# torch.cuda.is_available() through NVML, not the CUDA driver: a process that asked may still fork CUDA users
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GIB = 2**30
LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True,
            "rope_theta": 500000.0, "max_position_embeddings": 8192}
QWEN_7B = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
           "max_position_embeddings": 8192}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 256}


@dataclass(frozen=True)
class Sizes:
    batch: int          # rows per step
    seq: int            # tokens per row
    steps: int          # optimizer steps of phases 1-3
    gemm_n: int
    model: dict         # phases 1-4
    big_model: dict     # phase 6
    ds_steps: int       # each DeepSpeed run (phase 4) and the Ray Train run (phase 5)
    big_steps: int      # phase 6


REAL = Sizes(4, 2048, 12, 8192, LLAMA_1B, QWEN_7B, 6, 4)
DRY = Sizes(2, 64, 3, 256, {**TINY, "model_type": "llama", "tie_word_embeddings": True},
            {**TINY, "model_type": "qwen2", "tie_word_embeddings": False}, 3, 3)

# Third-party modules the lent machine has (GPU_CHECK.md's list and what those import) or gets from .whl/; a dry
# run lists any other module a phase imported (`imports_beyond_gpu_set`): absent there unless it is optional.
GPU_MACHINE = {"torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "pyarrow", "typer", "rich",
               "triton", "numpy", "huggingface_hub", "hf_xet", "filelock", "fsspec", "packaging", "yaml", "regex",
               "requests", "tqdm", "jinja2", "markupsafe", "sympy", "mpmath", "networkx", "psutil", "click",
               "certifi", "urllib3", "idna", "charset_normalizer", "httpx", "httpcore", "h11", "anyio", "sniffio",
               "shellingham", "typing_extensions", "markdown_it", "mdurl", "pygments", "functorch", "torchgen"}
WHEELS = {"pydantic", "pydantic_core", "annotated_types", "typing_inspection", "bitsandbytes", "ray", "deepspeed",
          "hjson", "jsonschema", "referencing", "rpds", "jsonschema_specifications", "attrs", "attr", "msgpack",
          "google", "ninja", "cpuinfo", "einops", "setuptools", "pkg_resources", "wheel", "_distutils_hack", "pandas",
          "dateutil", "six"}
OURS = {"pipelines", "cluster", "tune", "serve", "bench", "gpu_check", "tests", "__main__", "__mp_main__"}


FORKED_IMPORTS: set[str] = set()  # what forked runs imported beyond the lent machine's set (dry-run report)


class Skip(Exception):
    """A phase that cannot run here, with the reason (a missing package, no time left)."""


@dataclass
class Ctx:
    dry: bool
    out: Path
    work: Path
    sizes: Sizes
    prior: dict[str, dict] = field(default_factory=dict)   # earlier phases' records, by name
    partial: Path | None = None                            # a child's figures so far (kept if it is killed)
    include: tuple[str, ...] = ()                          # dry run: phases to run despite their dry_skip

    def note(self, **figures: Any) -> None:
        """Record figures as they are measured: a phase killed at its budget still reports them."""
        if self.partial is None:
            return
        done = json.loads(self.partial.read_text()) if self.partial.exists() else {}
        done.update(figures)
        self.partial.write_text(json.dumps(done, default=str))


# ---------------------------------------------------------------- building the model and data folders

def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def tokenizer(ctx: Ctx):
    """The project's locally trained byte-level BPE (pipelines.artifacts.models), built once: it only has to load
    and give pad/eos ids; its vocabulary may be smaller than the model's (ids are drawn directly)."""
    from transformers import AutoTokenizer

    folder = ctx.work / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        from pipelines.artifacts.models import build_tokenizer
        from pipelines.demo.generator import tokenizer_corpus

        build_tokenizer(tokenizer_corpus()).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def model_folder(ctx: Ctx, name: str, spec: dict) -> str:
    """A random-init model at the spec's shape as a safetensors folder (bf16 on a GPU), built once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = ctx.work / "models" / name
    if (folder / "config.json").exists():
        return str(folder)
    t0 = time.time()
    tok = tokenizer(ctx)
    spec = dict(spec)
    kind = spec.pop("model_type")
    spec["vocab_size"] = max(spec["vocab_size"], len(tok))
    config = AutoConfig.for_model(kind, **spec, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  bos_token_id=None)
    dev, dtype = ("cuda", torch.bfloat16) if cuda() else ("cpu", torch.float32)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    os.replace(staging, folder)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    ctx.note(**{f"build_{name}_s": round(time.time() - t0, 1)})
    return str(folder)


def vocab_of(model_dir: str) -> int:
    return int(json.loads(Path(model_dir, "config.json").read_text())["vocab_size"])


def split_lengths(rng, seq: int) -> list[int]:
    """Lengths of the sequences packed into one row of `seq` tokens (each seq/8 to seq/2 long)."""
    lens: list[int] = []
    while sum(lens) < seq:
        lens.append(int(min(seq - sum(lens), rng.integers(seq // 8, seq // 2 + 1))))
    return lens


def data_folder(ctx: Ctx, name: str, *, rows: int, seq: int, vocab: int, packed: bool = False) -> Path:
    """A tokenized dataset as the data stage writes it (train/part-0.parquet + manifest), of random ids in
    [0, vocab/8); packed rows carry `seq_lens` (several sequences back to back, as pipelines.data.packing)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.artifacts.manifest import write_manifest

    folder = ctx.work / "data" / name
    if (folder / "manifest.json").exists():
        return folder
    rng = np.random.default_rng(0)
    ids = rng.integers(0, max(2, vocab // 8), size=(rows, seq)).tolist()
    cols: dict[str, list] = {"input_ids": ids, "labels": ids}
    if packed:
        cols["seq_lens"] = [split_lengths(rng, seq) for _ in range(rows)]
        cols["n_tokens"] = [seq] * rows
    (folder / "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), folder / "train" / "part-0.parquet")
    write_manifest(folder, kind="tokenized_dataset", inputs={},
                   config={"gpu_check": name, "rows": rows, "seq": seq, "packed": packed},
                   extra={"outputs": {"train": "train"}})
    return folder


def run_config(ctx: Ctx, model_dir: str, *, qlora: bool, packed: bool = False, deepspeed: str = "none",
               steps: int | None = None, gc: bool = False):
    """The run config of one training phase, the one both `sft.run` and `loraforge plan` read. Train fields the
    loop does not have yet are left out and listed in the phase's figures (`contract_missing`)."""
    from cluster.config import RunConfig
    from pipelines.train.config import TrainSection

    s, dry = ctx.sizes, ctx.dry
    want = {"max_steps": steps or s.steps, "batch_size": s.batch, "num_workers": 1, "use_gpu": cuda(),
            "cpus_per_worker": max(0.5, (os.cpu_count() or 2) / 2), "lr": 2e-3, "warmup_steps": 1 if dry else 2,
            "log_every": 1, "tracking_uri": "off", "deepspeed": deepspeed, "gradient_checkpointing": gc,
            "loss_chunk_tokens": 128, "seed": 0, "tf32": True, "attn_implementation": "auto",
            "throughput_warmup_steps": 1 if dry else 2}
    missing = [k for k in want if k not in TrainSection.model_fields]
    if missing:
        ctx.note(contract_missing=missing)
    doc = {"model": {"name": model_dir, "dtype": "bfloat16"},
           "data": {"max_length": s.seq, "packing": {"enabled": packed, "block_size": s.seq if packed else None}},
           "lora": {"r": 16, "alpha": 32},
           "quant": {"load_in_4bit": qlora, "compute_dtype": "bfloat16"},
           "train": {k: v for k, v in want.items() if k not in missing}}
    return RunConfig.model_validate(doc)


# ---------------------------------------------------------------- measuring a training run

def peak_flops(ctx: Ctx) -> tuple[float, str]:
    """The card's dense bf16 peak from cluster/gpus.json (by name), else phase 0's measured bf16 GEMM; on a CPU
    the planner's 50 GFLOP/s per thread (a dry run's MFU means nothing)."""
    import torch

    from cluster.plan_shape import table

    if not cuda():
        n = torch.get_num_threads()
        return table()["cpu"]["gflops_per_core"] * 1e9 * n, f"CPU, {n} threads × planner GFLOP/s"
    name = torch.cuda.get_device_name()
    for g in sorted(table()["gpus"], key=lambda g: -len(g["name"])):
        if g["name"].split("-")[0] in name:
            return g["bf16_tflops"] * 1e12, f"{g['label']} datasheet, dense bf16 ({name})"
    measured = ctx.prior.get("gemm", {}).get("figures", {}).get("bf16_tflops")
    return (measured or 1.0) * 1e12, f"{name}: not in cluster/gpus.json, phase 0's measured bf16 GEMM"


def plan_figures(cfg, model_dir: str, tokens_per_s: float | None, peak_bytes: int | None) -> dict:
    """What `loraforge plan` says for this config (per-device bytes, FLOPs) against what the run measured."""
    from cluster.plan import plan_training
    from cluster.plan_shape import ModelShape

    shape = ModelShape.from_config(json.loads(Path(model_dir, "config.json").read_text()))
    plan = plan_training(cfg, shape)
    tokens = plan.setup.batch * plan.setup.seq * plan.setup.grad_accum
    f = {"n_matmul_params": shape.linear_params() + shape.vocab * shape.hidden,
         "plan_device_gib": round(plan.device_bytes / GIB, 3),
         "plan_parts_gib": {p.name: round(p.bytes / GIB, 3) for p in plan.parts if not p.host},
         "plan_flops_per_token": plan.flops_per_step / tokens}
    if peak_bytes:
        f["peak_over_plan"] = round(peak_bytes / plan.device_bytes, 3)
    return f


def measure(ctx: Ctx, tag: str, model_dir: str, data_dir: Path, cfg) -> tuple[dict, dict]:
    """Train through the project's own loop in this process (`sft.run` with `local=True`) and read its manifest:
    figures, and the goals each met (None: not measurable here, e.g. memory on a CPU)."""
    from pipelines.train import sft
    from pipelines.train.config import TrainSetup

    t0 = time.time()
    setup = TrainSetup(model_dir=model_dir, dtype=cfg.model.dtype, quant=cfg.quant, train=cfg.train, local=True)
    out = sft.run(setup, cfg.lora, data_dir, ctx.work / "runs" / tag)
    m = json.loads((Path(out) / "manifest.json").read_text())["metrics"]
    tps = (m.get("throughput") or {}).get("tokens_per_s")
    mem = m.get("memory") or {}
    peak_b = mem.get("peak_allocated_bytes")
    f = {"wall_s": round(time.time() - t0, 1), "loss_first": m["loss_history"][0], "loss_last": m["loss_history"][-1],
         "loss_history": m["loss_history"], "tokens_per_s": tps, "throughput": m.get("throughput"), "memory": mem,
         "engine": m.get("engine"), "peak_allocated_gib": round(peak_b / GIB, 3) if peak_b else None,
         **plan_figures(cfg, model_dir, tps, peak_b)}
    peak, basis = peak_flops(ctx)
    if tps:
        f.update(step_s=round(cfg.train.batch_size * ctx.sizes.seq / tps, 4), mfu_4n=round(4 * f["n_matmul_params"]
                 * tps / peak, 4), mfu_planner=round(f["plan_flops_per_token"] * tps / peak, 4), peak_basis=basis)
    ratio = f.get("peak_over_plan")
    checks = {"loss_falls": f["loss_last"] < f["loss_first"],
              "frozen_checksum_unchanged": (m.get("frozen_checksum_before") == m.get("frozen_checksum_after")
                                            if "frozen_checksum_before" in m else None),
              "peak_within_15pct_of_plan": abs(ratio - 1) <= 0.15 if ratio else None}
    f["headline"] = headline(f)
    ctx.note(**{tag: f})
    return f, checks


def headline(f: dict) -> str:
    parts = []
    if f.get("tokens_per_s"):
        parts.append(f"{f['tokens_per_s']:,.0f} tok/s, MFU {f['mfu_4n']:.1%}")
    if f.get("peak_allocated_gib"):
        parts.append(f"peak {f['peak_allocated_gib']:.1f} GiB vs plan {f['plan_device_gib']:.1f} "
                     f"({f['peak_over_plan']:.2f}×)")
    parts.append(f"loss {f['loss_first']:.2f}→{f['loss_last']:.2f}")
    return "; ".join(parts)


def forked(fn: Callable, *args) -> Any:
    """fn(*args) in a forked process, its JSON-able result returned or its error raised: every training run gets
    a fresh process (CUDA context, memory peak, DeepSpeed's and torch.distributed's global state)."""
    path = Path(tempfile.mkstemp(suffix=".json")[1])

    def target():
        before = set(sys.modules)
        try:
            out = {"ok": fn(*args)}
        except BaseException as e:  # noqa: BLE001 - handed to the parent
            out = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
        out["imports"] = foreign_imports(before)
        path.write_text(json.dumps(out, default=str))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    proc = multiprocessing.get_context("fork").Process(target=target)
    proc.start()
    proc.join()
    out = json.loads(path.read_text() or "{}")
    path.unlink(missing_ok=True)
    FORKED_IMPORTS.update(out.get("imports", []))
    if "ok" not in out:
        raise RuntimeError(out.get("error", f"exit code {proc.exitcode}") + "\n" + out.get("traceback", ""))
    return out["ok"]


def folders(ctx: Ctx, model: str = "model", steps: int | None = None, packed: bool = False) -> tuple[str, Path]:
    """The model and data folders of a training run, built on first use (model: "model" or "big_model")."""
    s = ctx.sizes
    spec = s.big_model if model == "big_model" else s.model
    model_dir = model_folder(ctx, f"{spec['model_type']}-{spec['hidden_size']}x{spec['num_hidden_layers']}", spec)
    vocab = vocab_of(model_dir)
    rows = s.batch * (steps or s.steps)
    return model_dir, data_folder(ctx, f"{'packed' if packed else 'rows'}-{rows}x{s.seq}-v{vocab}", rows=rows,
                                  seq=s.seq, vocab=vocab, packed=packed)


def one_run(ctx: Ctx, tag: str, opts: dict, model: str, steps: int | None, packed: bool) -> dict:
    """Train and measure one run (its folders built or reused)."""
    model_dir, data_dir = folders(ctx, model, steps, packed)
    goal = opts.pop("mfu_goal", None)
    cfg = run_config(ctx, model_dir, packed=packed, steps=steps, **opts)
    f, c = measure(ctx, tag, model_dir, data_dir, cfg)
    if goal is not None:
        c[f"mfu_at_least_{goal:.0%}"] = f["mfu_4n"] >= goal if cuda() and f.get("mfu_4n") else None
    return {"figures": f, "checks": c}


def train_phase(ctx: Ctx, runs: dict[str, dict], model: str = "model", steps: int | None = None,
                packed: bool = False) -> dict:
    """One or more training runs, each in its own forked process; a run that raises is recorded (`errors`) and
    the next still runs. runs: tag -> run_config options (qlora, deepspeed, gc), plus `mfu_goal`."""
    figures, checks, errors, heads = {}, {}, {}, []
    for tag, opts in runs.items():
        try:
            got = forked(one_run, ctx, tag, dict(opts), model, steps, packed)
        except Exception as e:  # the next run still runs; the phase reports an error
            errors[tag] = str(e)
            heads.append(f"{tag}: {str(e).splitlines()[0][:200]}")
            continue
        figures[tag] = got["figures"]
        checks.update({(f"{tag}." if len(runs) > 1 else "") + k: v for k, v in got["checks"].items()})
        heads.append((f"{tag}: " if len(runs) > 1 else "") + got["figures"]["headline"])
    return {"figures": figures, "checks": checks, "headline": " | ".join(heads), "errors": errors}


# ---------------------------------------------------------------- the phases

def phase_gemm(ctx: Ctx) -> dict:
    """Matmul ceilings of the card: bf16, fp32 (TF32 off) and fp32 with TF32 allowed."""
    import platform

    import torch

    dev, n = ("cuda" if cuda() else "cpu"), ctx.sizes.gemm_n
    f: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda() else platform.processor() or "cpu",
                         "torch": torch.__version__, "torch_cuda": torch.version.cuda, "n": n}
    if cuda():
        p = torch.cuda.get_device_properties(0)
        f.update(memory_gib=round(p.total_memory / GIB, 1), capability=f"{p.major}.{p.minor}",
                 sms=p.multi_processor_count)
    for label, dtype, precision, iters in (("bf16", torch.bfloat16, "highest", 50), ("fp32", torch.float32,
                                                                                      "highest", 10),
                                           ("tf32", torch.float32, "high", 30)):
        torch.set_float32_matmul_precision(precision)
        a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
        for _ in range(2):
            a @ b
        sync()
        t0 = time.perf_counter()
        for _ in range(iters if cuda() else 3):
            a @ b
        sync()
        f[f"{label}_tflops"] = round(2 * n**3 * (iters if cuda() else 3) / (time.perf_counter() - t0) / 1e12, 3)
        ctx.note(**f)
    torch.set_float32_matmul_precision("highest")
    checks = {"tf32_faster_than_fp32": f["tf32_tflops"] > 1.5 * f["fp32_tflops"] if cuda() else None}
    return {"figures": f, "checks": checks, "headline": f"bf16 {f['bf16_tflops']:.1f}, fp32 {f['fp32_tflops']:.1f}, "
                                                        f"TF32 {f['tf32_tflops']:.1f} TFLOP/s"}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def phase_qlora(ctx: Ctx) -> dict:
    return train_phase(ctx, {"qlora": {"qlora": True, "mfu_goal": 0.25}})


def phase_bf16(ctx: Ctx) -> dict:
    res = train_phase(ctx, {"bf16_lora": {"qlora": False, "mfu_goal": 0.35}})
    lean = lean_vs_plain(ctx, *folders(ctx))
    res["figures"]["lean_vs_plain"] = lean
    res["checks"].update({"lean_loss_rel_diff_le_1e-3": lean["rel_diff"] <= 1e-3,
                          "lean_grad_cosine_gt_0.999": lean["grad_cosine"] > 0.999})
    res["headline"] += (f"; lean vs plain: loss rel {lean['rel_diff']:.1e}, grad cos {lean['grad_cosine']:.5f}"
                        + (f", peak {lean['lean_peak_gib']:.2f} vs {lean['plain_peak_gib']:.2f} GiB"
                           if lean.get("plain_peak_gib") else ""))
    return res


def first_batch(ctx: Ctx, model_dir: str, data_dir: Path):
    """The first `batch` rows of a data folder through the loop's own collate (sft.collate_fn), and its time."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from pipelines.train.sft import collate_fn

    rows = pq.read_table(data_dir / "train" / "part-0.parquet").slice(0, ctx.sizes.batch).to_pydict()
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    wants_dtype = len(inspect.signature(collate_fn).parameters) > 1  # before issue 33: (pad_id, dtype)
    collate = collate_fn(pad, "bfloat16") if wants_dtype else collate_fn(pad)
    t0 = time.perf_counter()
    for _ in range(3):
        batch = collate(rows)
    return batch, (time.perf_counter() - t0) / 3


def lean_vs_plain(ctx: Ctx, model_dir: str, data_dir: Path) -> dict:
    """One forward + backward on the same batch with the lean loss (train.loss_chunk_tokens=128) and the plain
    one (0), through sft.causal_lm_loss on a bf16 base + LoRA (B drawn small: at zero, A gets no gradient)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipelines.train.config import ALL_LINEAR
    from pipelines.train.sft import causal_lm_loss

    dev = "cuda" if cuda() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(dev)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ALL_LINEAR))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    batch, _ = first_batch(ctx, model_dir, data_dir)
    batch = {k: v.to(dev) for k, v in batch.items() if k != "num_tokens" and hasattr(v, "to")}
    got = {}
    for chunk in (0, 128):
        model.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        total, n, _ = causal_lm_loss(model, batch, chunk_tokens=chunk)
        loss = total / n
        loss.backward()
        grads = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
        got[chunk] = (loss.item(), grads, torch.cuda.max_memory_allocated() / GIB if dev == "cuda" else None)
    (lp, gp, mp), (ll, gl, ml) = got[0], got[128]
    out = {"plain_loss": lp, "lean_loss": ll, "rel_diff": abs(ll - lp) / abs(lp),
           "grad_cosine": float(gp @ gl / (gp.norm() * gl.norm())), "plain_peak_gib": mp, "lean_peak_gib": ml}
    ctx.note(lean_vs_plain=out)
    return out


def phase_packing(ctx: Ctx) -> dict:
    """Packed rows (several sequences per 2048-token row) through the same bf16 LoRA run as phase 2."""
    res = train_phase(ctx, {"packed": {"qlora": False}}, packed=True)
    f = res["figures"]
    if "packed" in f:
        batch, seconds = first_batch(ctx, *folders(ctx, packed=True))
        f["collate"] = {"ms_per_batch": round(seconds * 1e3, 2),
                        "tensors": {k: [str(v.dtype), list(v.shape)] for k, v in batch.items() if hasattr(v, "dtype")},
                        "host_mask_mib": round(sum(v.numel() * v.element_size() for k, v in batch.items()
                                                   if k == "attention_mask") / 2**20, 2)}
        unpacked = ctx.prior.get("bf16_lora", {}).get("figures", {}).get("bf16_lora", {}).get("tokens_per_s")
        if unpacked and f["packed"].get("tokens_per_s"):
            f["packed_over_unpacked_tokens_per_s"] = round(f["packed"]["tokens_per_s"] / unpacked, 3)
            res["headline"] += f"; packed/unpacked tok/s {f['packed_over_unpacked_tokens_per_s']:.2f}"
        c = f["collate"]
        res["headline"] += f"; collate {c['ms_per_batch']:.1f} ms, host mask {c['host_mask_mib']} MiB"
    return res


def phase_deepspeed(ctx: Ctx) -> dict:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:
        raise Skip(f"deepspeed did not import: {type(e).__name__}: {e}") from None
    return train_phase(ctx, {"zero2_qlora": {"qlora": True, "deepspeed": "zero2"},
                             "zero3_bf16_lora": {"qlora": False, "deepspeed": "zero3"}}, steps=ctx.sizes.ds_steps)


def phase_ray(ctx: Ctx) -> dict:
    """tests/integration/test_gpu.py's first test body (tiny model, demo rows, QLoRA + ZeRO-2) through real Ray
    Train: one GPU worker (NCCL) there, one CPU worker in a dry run."""
    try:
        import ray
        import ray.data  # noqa: F401
        import ray.train  # noqa: F401
    except Exception as e:
        raise Skip(f"ray did not import: {type(e).__name__}: {e}") from None
    from pipelines.artifacts.models import build_tiny_model
    from pipelines.train.config import LoraSection, QuantSection, TrainSection, TrainSetup
    from pipelines.train.sft import run

    tiny = build_tiny_model(ctx.work / "models" / "tiny-llama", arch="llama", seed=0)
    data = demo_tokens(ctx, tiny)
    ds = "zero2" if importlib.util.find_spec("deepspeed") else "none"
    train = TrainSection(num_workers=1, use_gpu=cuda(), cpus_per_worker=1, max_steps=3 if ctx.dry else 6,
                         batch_size=4, lr=5e-3, deepspeed=ds, tracking_uri="off", log_every=1)
    ray.init(address="local", num_cpus=2 if ctx.dry else max(2, (os.cpu_count() or 2) // 2),
             include_dashboard=False, log_to_driver=True)  # its own instance, never one found on the machine
    try:
        t0 = time.time()
        setup = TrainSetup(model_dir=str(tiny), dtype="bfloat16", train=train,
                           quant=QuantSection(load_in_4bit=True, compute_dtype="bfloat16"))
        out = run(setup, LoraSection(r=8, alpha=16, dropout=0.0), data, ctx.work / "runs" / "ray")
    finally:
        ray.shutdown()
    m = json.loads((Path(out) / "manifest.json").read_text())["metrics"]
    f = {"wall_s": round(time.time() - t0, 1), "deepspeed": ds, "loss_history": m["loss_history"],
         "engine": m.get("engine"), "throughput": m.get("throughput")}
    checks = {"loss_falls": m["loss_history"][-1] < m["loss_history"][0],
              "frozen_checksum_unchanged": m.get("frozen_checksum_before") == m.get("frozen_checksum_after")}
    return {"figures": f, "checks": checks,
            "headline": f"Ray Train {ds}: loss {m['loss_history'][0]:.2f}→{m['loss_history'][-1]:.2f}"}


def demo_tokens(ctx: Ctx, model_dir: str) -> Path:
    """The demo rows as test_gpu.py tokenizes them (256 tokens, assistant-only labels)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from pipelines.artifacts.manifest import write_manifest
    from pipelines.data.chat import tokenize_messages
    from pipelines.data.rowformats import alpaca_to_messages

    demo = REPO / "pipelines" / "demo" / "city_date.jsonl"
    folder = ctx.work / "data" / "demo"
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in demo.read_text().splitlines()[:128]]
    toks = [tokenize_messages(tok, alpaca_to_messages(r), 256) for r in rows]
    (folder / "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"input_ids": [t.input_ids for t in toks], "labels": [t.labels for t in toks]}),
                   folder / "train" / "part-0.parquet")
    write_manifest(folder, kind="tokenized_dataset", inputs={"train": str(demo)}, config={},
                   extra={"outputs": {"train": "train"}})
    return folder


def phase_qwen(ctx: Ctx) -> dict:
    return train_phase(ctx, {"qwen7b_qlora_gc": {"qlora": True, "gc": True}}, model="big_model",
                       steps=ctx.sizes.big_steps)


@dataclass(frozen=True)
class Phase:
    num: int
    name: str
    title: str
    prediction: str
    fn: Callable[[Ctx], dict]
    budget_s: float       # killed after this long on the GPU
    min_s: float          # not started with less time left than this
    dry_skip: str = ""    # why the dry run leaves it out ("" = it runs)


PHASES = [
    Phase(0, "gemm", "GEMM ceilings", "H100: bf16 ~800, fp32 ~50, TF32 ~350 TFLOP/s (bf16 8192³ ≈ 798 measured "
          "elsewhere)", phase_gemm, 40, 15),
    Phase(1, "qlora", "QLoRA, Llama-3.2-1B shape, 12 × 4 × 2048", "as wired before issue 33 MFU 8-12% (fp32 compute: "
          "PEFT upcasts, no autocast, TF32 off); with bf16 autocast 25-35% (goal ≥ 25%); peak within ±15% of "
          "`loraforge plan`; loss falls; 4-bit base bytes unchanged", phase_qlora, 110, 60),
    Phase(2, "bf16_lora", "bf16 LoRA + TF32; lean vs plain loss", "MFU ≥ 35% (goal); peak within ±15% of the plan; "
          "lean loss = plain (rel ≤ 1e-3, grad cosine > 0.999), lean peak lower by about the fp32 [8192 × 128256] "
          "logits (~4 GiB, ×2-3 in flight)", phase_bf16, 110, 60),
    Phase(3, "packing", "packed rows 4 × 2048", "packed ≈ unpacked tok/s with the mask built on the device (bool for "
          "SDPA) or none (flash-attention varlen); a host-built float (B,1,L,L) mask (W2: 32 MiB a batch in bf16) "
          "costs collate time and rules out flash SDPA", phase_packing, 80, 45),
    Phase(4, "deepspeed", "DeepSpeed ZeRO-2 QLoRA, ZeRO-3 bf16 LoRA", "both train on one NCCL rank; frozen checksum "
          "unchanged across DeepSpeed's bf16 cast (B4); ZeRO-3 with fp32 adapters beside a bf16 base may fail "
          "in DeepSpeed's one-dtype all-gather (B5)", phase_deepspeed, 120, 60),
    Phase(5, "ray_train", "test_gpu.py body through Ray Train", "QLoRA + ZeRO-2 on one GPU worker trains: B1 "
          "(CPU tensor all_reduce on NCCL) and B2 (CPU probe ids) fixed; loss falls; frozen checksum unchanged",
          phase_ray, 120, 75, dry_skip="left out of the dry run: Ray's start and one Ray Train fit take ~70 s on "
          "2 CPUs (over the 60 s a dry-run phase may take); --with-ray runs it"),
    Phase(6, "qwen7b_qlora_gc", "Qwen2.5-7B shape QLoRA + gradient checkpointing", "fits one 80 GB GPU; peak within "
          "±15% of the plan; runs only if time is left (model build ~1 min)", phase_qwen, 200, 150),
]


# ---------------------------------------------------------------- running the phases

def foreign_imports(before: set[str]) -> list[str]:
    """Top-level third-party modules imported since `before` that neither the lent machine nor .whl/ has."""
    names = {m.split(".")[0] for m in list(sys.modules) if m not in before}
    return sorted(n for n in names if not n.startswith("_") and n not in sys.stdlib_module_names
                  and n not in GPU_MACHINE | WHEELS | OURS and n != "cython_runtime")


def _child(ph: Phase, ctx: Ctx, result: Path) -> None:
    """A phase in its own process group (what it starts is killed with it), result written as JSON."""
    os.setsid()
    before = set(sys.modules)
    try:
        out = {"status": "ok", **ph.fn(ctx)}
        if out.get("errors"):
            out["status"] = "error"
    except Skip as e:
        out = {"status": "skipped", "reason": str(e)}
    except BaseException as e:  # noqa: BLE001 - the record says what broke, and the next phase still runs
        out = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
               "traceback": traceback.format_exc()[-4000:]}
    if ctx.dry:
        out["imports_beyond_gpu_set"] = sorted(set(foreign_imports(before)) | FORKED_IMPORTS)  # optional there?
    result.write_text(json.dumps(out, default=str))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_phase(ctx: Ctx, ph: Phase, deadline: float, method: str) -> dict:
    base = {"phase": ph.num, "name": ph.name, "title": ph.title, "prediction": ph.prediction}
    left = deadline - time.time()
    if ctx.dry and ph.dry_skip and ph.name not in ctx.include:
        return {**base, "status": "skipped", "reason": ph.dry_skip, "seconds": 0.0}
    need = ph.min_s if not ctx.dry else 5
    if left < need:
        return {**base, "status": "skipped", "reason": f"no time left: needs ~{need:.0f} s, {left:.0f} s left",
                "seconds": 0.0}
    limit = min(ph.budget_s if not ctx.dry else 150, left)
    ctx.partial, result = ctx.work / f"phase{ph.num}.partial.json", ctx.work / f"phase{ph.num}.result.json"
    for p in (ctx.partial, result):
        p.unlink(missing_ok=True)
    t0 = time.time()
    proc = multiprocessing.get_context(method).Process(target=_child, args=(ph, ctx, result))
    proc.start()
    proc.join(limit)
    alive = proc.is_alive()
    _kill_group(proc.pid)  # the phase at its budget, or what it left running (Ray, DeepSpeed)
    proc.join(10)
    rec = {**base, "seconds": round(time.time() - t0, 1)}
    if result.exists():
        rec.update(json.loads(result.read_text()))
    else:
        rec.update(status="timeout" if alive else "error",
                   error=f"killed at its budget of {limit:.0f} s" if alive else f"exit code {proc.exitcode}")
    if rec["status"] in ("error", "timeout") and ctx.partial.exists():
        rec.setdefault("figures", json.loads(ctx.partial.read_text()))
    ctx.partial = None
    return rec


def install_stubs() -> list[str]:
    """matplotlib is not on the lent machine (and too big to carry): the stage's loss.png is drawn by a no-op."""
    if importlib.util.find_spec("matplotlib") is not None:
        return []

    class Nothing:
        def __getattr__(self, name):
            return self

        def __call__(self, *a, **k):
            return self

        def __iter__(self):
            return iter((self, self))

    mpl, plt = types.ModuleType("matplotlib"), types.ModuleType("matplotlib.pyplot")
    mpl.use = lambda *a, **k: None
    plt.__getattr__ = lambda name: Nothing()
    mpl.pyplot = plt
    sys.modules.update({"matplotlib": mpl, "matplotlib.pyplot": plt})
    return ["matplotlib (absent: loss.png is not drawn)"]


def preimport(dry: bool) -> tuple[str, str]:
    """Import the heavy modules once, before the forks, so each phase starts at once; never CUDA (a forked child
    cannot use CUDA its parent initialised: then the phases are spawned instead). Returns (method, error)."""
    err = ""
    try:
        import numpy  # noqa: F401
        import pyarrow.parquet  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401

        import cluster.config  # noqa: F401
        import cluster.plan  # noqa: F401
        import pipelines.train.sft  # noqa: F401
        if dry:
            import peft  # noqa: F401
    except Exception as e:  # each phase imports again and reports it
        err = f"{type(e).__name__}: {e}"
    torch_mod = sys.modules.get("torch")
    inited = bool(torch_mod and torch_mod.cuda.is_initialized())
    return ("spawn" if inited else "fork"), err


def environment(out: Path, dry: bool, deadline_s: float, method: str, preimport_error: str, stubs: list[str]) -> dict:
    """The env record: card, versions, commit, what is missing; written before any phase."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    def sh(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = sh("git", "rev-parse", "HEAD")
    if not commit and (REPO / ".whl" / "COMMIT").exists():  # written by gpu_wheels.sh: no .git travels
        lines = (REPO / ".whl" / "COMMIT").read_text().splitlines()
        commit = f"{lines[0]} (.whl/COMMIT{f', {len(lines) - 1} files modified' if len(lines) > 1 else ''})"
    pkgs = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "ray", "pydantic", "triton",
            "flash_attn", "safetensors", "tokenizers", "pyarrow", "matplotlib", "mlflow", "pandas"]
    install = out / "install.json"  # written by gpu_check.sh
    return {"phase": "env", "dry_run": dry, "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "commit": commit or "unknown", "gpu": sh("nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                                     "--format=csv,noheader") or None,
            "versions": {p: ver(p) for p in pkgs}, "deadline_s": round(deadline_s), "start_method": method,
            "preimport_error": preimport_error or None, "stubs": stubs,
            "install": json.loads(install.read_text()) if install.exists() else None}


# ---------------------------------------------------------------- the table

def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_checks(checks: dict) -> str:
    mark = {True: "✓", False: "✗", None: "n/a"}
    return ", ".join(f"{k} {mark.get(v, v)}" for k, v in (checks or {}).items()) or "—"


def table(records: list[dict]) -> str:
    """The Markdown table: one row per phase, measured beside predicted, with the goals met or not."""
    env = next((r for r in records if r.get("phase") == "env"), {})
    lines = [f"GPU check{' (dry run: tiny shapes on CPU)' if env.get('dry_run') else ''}: "
             f"{env.get('gpu') or 'no GPU'}; torch {env.get('versions', {}).get('torch')}; commit {env.get('commit')}",
             "", "| # | phase | status | s | measured | prediction | checks |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("phase") == "env":
            continue
        measured = r.get("headline") or r.get("reason") or r.get("error") or ""
        if r.get("errors"):
            measured += " — errors: " + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in r["errors"].items())
        lines.append(f"| {r['phase']} | {cell(r['title'])} | {r['status']} | {r.get('seconds', 0):.0f} | "
                     f"{cell(measured)[:600]} | {cell(r['prediction'])} | {cell(render_checks(r.get('checks')))} |")
    return "\n".join(lines)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_all(args, phases: list[Phase]) -> list[dict]:
    """The env record, then each phase in turn; every record appended to gpu_check.jsonl as it ends."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline_s = args.deadline_s or (240.0 if args.dry_run else 450.0)  # a dry run: ~40 s on 2 idle CPUs
    deadline = time.time() + deadline_s
    work = Path(args.work or (tempfile.mkdtemp(prefix="gpu_check-") if args.dry_run else "/tmp/gpu_check"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(dry=args.dry_run, out=out, work=work, sizes=DRY if args.dry_run else REAL,
              include=("ray_train",) if args.with_ray else ())
    jsonl = out / "gpu_check.jsonl"
    jsonl.unlink(missing_ok=True)
    stubs = install_stubs()
    method, err = preimport(args.dry_run)
    records = [environment(out, args.dry_run, deadline_s, method, err, stubs)]
    with open(jsonl, "a") as fh:
        fh.write(json.dumps(records[0], default=str) + "\n")
    print(f"[gpu-check] {json.dumps(records[0], default=str)}", flush=True)
    for ph in phases:
        print(f"[gpu-check] phase {ph.num} {ph.name}: start ({deadline - time.time():.0f} s left)", flush=True)
        rec = run_phase(ctx, ph, deadline, method)
        ctx.prior[ph.name] = rec
        records.append(rec)
        with open(jsonl, "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")
        print(f"[gpu-check] phase {ph.num} {ph.name}: {rec['status']} in {rec['seconds']:.1f} s — "
              f"{rec.get('headline') or rec.get('reason') or rec.get('error', '')}", flush=True)
        if rec["status"] in ("error", "timeout"):
            print(rec.get("traceback") or "\n".join(rec.get("errors", {}).values()), flush=True)
    if args.dry_run and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every phase at tiny shapes on CPU")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu_check"),
                    help="where gpu_check.jsonl and gpu_check.md go (default $OUT)")
    ap.add_argument("--work", help="models, data and runs (default /tmp/gpu_check; a dry run: a temporary folder)")
    ap.add_argument("--phases", default=",".join(str(p.num) for p in PHASES), help="comma-separated phase numbers")
    ap.add_argument("--deadline-s", type=float, help="every phase ends within this many seconds (default 450; dry 240)")
    ap.add_argument("--with-ray", action="store_true", help="a dry run includes phase 5 (Ray Train, ~70 s on 2 CPUs)")
    ap.add_argument("--table", metavar="JSONL", help="only print (and write beside it) the table of a finished jsonl")
    ap.add_argument("--json", action="store_true", help="the whole record as JSON, the last line")
    args = ap.parse_args(argv)
    if args.table:
        records = read_jsonl(Path(args.table))
        md = table(records)
        Path(args.table).with_suffix(".md").write_text(md + "\n")
        print(md)
        return 0
    wanted = {int(x) for x in args.phases.split(",") if x.strip()}
    records = run_all(args, [p for p in PHASES if p.num in wanted])
    md = table(records)
    (Path(args.out) / "gpu_check.md").write_text(md + "\n")
    print("\n" + md, flush=True)
    if args.json:
        print(json.dumps(records, default=str))
    return 1 if any(r.get("status") in ("error", "timeout") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
