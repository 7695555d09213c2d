"""CUDA-only paths: QLoRA (bf16 compute) under DeepSpeed ZeRO-2 with NCCL, 2 ranks on one GPU if only one is there.

Skipped without CUDA (tests/conftest.py); run on a lent GPU with:

    .venv/bin/pytest tests/integration/test_gpu.py -q -m gpu
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.gpu]


def test_cuda_qlora_zero2_trains(ray_session, tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from pipelines.formatting import alpaca_to_messages, tokenize_messages
    from pipelines.manifest import write_manifest
    from pipelines.sft import run
    from pipelines.training import LoraSection, QuantSection, TrainSection
    from tests.integration.test_training import DEMO

    n_gpu = torch.cuda.device_count()

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:128]]
    toks = [tokenize_messages(tok, alpaca_to_messages(r), 256) for r in rows]
    (tmp_path / "data" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": [t.input_ids for t in toks], "labels": [t.labels for t in toks]}),
                   tmp_path / "data" / "train" / "part-0.parquet")
    write_manifest(tmp_path / "data", kind="tokenized_dataset", inputs={"train": str(DEMO)}, config={},
                   extra={"outputs": {"train": "train"}})
    train = TrainSection(num_workers=max(1, min(2, n_gpu)), use_gpu=True, cpus_per_worker=1, max_steps=6,
                         batch_size=4, lr=5e-3, deepspeed="zero2", tracking_uri="off")
    out = run(LoraSection(r=8, alpha=16, dropout=0.0), train, tiny_model_dir, tmp_path / "data", tmp_path / "sft",
              dtype="bfloat16", quant=QuantSection(load_in_4bit=True, compute_dtype="bfloat16"))
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["loss_history"][-1] < m["loss_history"][0]
    assert m["frozen_checksum_before"] == m["frozen_checksum_after"]
