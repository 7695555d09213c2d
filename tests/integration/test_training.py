"""SFT on Ray Train with the real DeepSpeed (gloo) and bitsandbytes (CPU backend), on the tiny model.

    .venv/bin/pytest tests/integration/test_training.py -q

Each run is a real `TorchTrainer.fit` with 2 workers (1 where exact batch composition matters).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo" / "city_date.jsonl"


@pytest.fixture(scope="module")
def data_dir(tokenized_dir) -> Path:
    return tokenized_dir


@pytest.fixture(scope="module")
def packed_data_dir(data_dir, tmp_path_factory) -> Path:
    """The same rows packed into 256-token blocks (pipelines.data.packing): sequences never attend to each other."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.artifacts.manifest import write_manifest
    from pipelines.data.packing import pack_rows

    out = tmp_path_factory.mktemp("packed")
    for split in ("train", "validation"):
        rows = pq.read_table(data_dir / split).to_pydict()
        packed = pack_rows(rows, capacity=256)
        (out / split).mkdir()
        pq.write_table(pa.table(packed), out / split / "part-0.parquet")
    write_manifest(out, kind="tokenized_dataset", inputs={"train": str(DEMO)}, config={},
                   extra={"packed": True, "outputs": {"train": "train", "validation": "validation"}})
    return out


def _sft(ray_session, model_dir, data_dir, out, **train_kw):
    from pipelines.train.config import LoraSection, QuantSection, TrainSection, TrainSetup
    from pipelines.train.sft import run

    quant = QuantSection(**train_kw.pop("quant", {}))
    lora_kw = train_kw.pop("lora", {})
    base_cache = train_kw.pop("base_cache", Path(out) / "base_cache")  # a fresh per-node 4-bit cache per run
    local = train_kw.pop("local", False)
    dtype = train_kw.pop("dtype_model", "float32")
    train = TrainSection(**{"num_workers": 2, "cpus_per_worker": 0.5, "max_steps": 6, "batch_size": 4,
                            "lr": 5e-3, "warmup_steps": 1, "log_every": 3, "tracking_uri": "off", **train_kw})
    lora = LoraSection(**{"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear", **lora_kw})
    setup = TrainSetup(model_dir=model_dir, dtype=dtype, quant=quant, train=train, base_cache=str(base_cache),
                       local=local)
    folder = run(setup, lora, data_dir, out)
    return json.loads((folder / "manifest.json").read_text()), folder


# The reference's settings, which every run compared with it takes too: accumulation 2, LoRA r=32 (every adapted
# matrix then holds >= 4096 values, bitsandbytes' minimum for 8-bit optimizer state: the lean-memory comparison
# runs against the reference itself), lr 2e-3.
REF = {"grad_accum": 2, "lora": {"r": 32, "alpha": 32}, "lr": 2e-3}


@pytest.fixture(scope="module")
def reference(ray_session, tiny_model_dir, data_dir, tmp_path_factory):
    """Uninterrupted DDP run: the baseline for the fault drill, the ZeRO comparisons and the memory settings."""
    return _sft(ray_session, tiny_model_dir, data_dir, tmp_path_factory.mktemp("ref"), **REF)


def _adapter(folder: Path):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _assert_trained(manifest):
    m = manifest["metrics"]
    losses = m["loss_history"]
    assert len(losses) == m["steps"]
    assert losses[-1] < losses[0] - 0.2, losses
    assert m["frozen_checksum_before"] == m["frozen_checksum_after"]
    assert m["delta_over_weight_max"] > 0
    assert len(m["ranks"]) == m["world_size"]
    assert {r["frozen_checksum"] for r in m["ranks"]} == {m["frozen_checksum_before"]}  # every rank, same base


def _assert_partitioned(m):
    """ZeRO-3: each rank holds only its partition of the base from the moment it is built (zero.Init),
    not a full copy that DeepSpeed partitions later."""
    for r in m["ranks"]:
        assert r["base_load"] == "zero3-partitioned"
        assert r["base_params_local"] == pytest.approx(r["base_params_total"] / len(m["ranks"]), rel=0.01)
    assert sum(r["base_params_local"] for r in m["ranks"]) >= m["ranks"][0]["base_params_total"]


def test_gradient_checkpointing_and_8bit_adam_save_memory_and_still_learn(ray_session, tiny_model_dir, data_dir,
                                                                          tmp_path, reference):
    """Issue 20 item 5, inside the Ray Train loop: with gradient checkpointing the first step saves far fewer
    activation bytes for backward; with 8-bit AdamW the optimizer state shrinks to ~1/3 (1 byte per moment
    instead of 4, plus a 256-value code book and block scales per tensor: LoRA r=32 makes every matrix >=
    bitsandbytes' 4096-value minimum for 8-bit state); and it still learns. One run with both against the plain
    reference (same rows, seed, r): neither setting moves the other's figure, so each is attributed."""
    lean = _sft(ray_session, tiny_model_dir, data_dir, tmp_path / "lean", **REF, gradient_checkpointing=True,
                optimizer="adamw_8bit")[0]["metrics"]
    runs = {"plain": reference[0]["metrics"], "lean": lean}
    mem = {k: m["memory"] for k, m in runs.items()}
    print(f"[memory] {mem}")
    assert mem["lean"]["saved_activation_bytes"] < 0.5 * mem["plain"]["saved_activation_bytes"], mem
    assert mem["lean"]["optimizer_state_bytes"] < 0.4 * mem["plain"]["optimizer_state_bytes"], mem
    for m in runs.values():
        assert m["loss_history"][-1] < m["loss_history"][0] - 0.2, m["loss_history"]


# An SFT adapter's manifest as commit 8a155db wrote it; since then the metrics add attn_implementation (issue 33)
# and lora_target_modules (the resolved targets, issue 36).
SFT_MANIFEST_KEYS_8A155DB = [
    "code_version", "config", "created", "inputs", "kind", "lineage", "metrics"]
SFT_METRICS_8A155DB = [
    "adapter_modules", "base_bytes_bf16", "base_bytes_loaded", "base_load", "best_eval_loss", "delta_over_weight",
    "delta_over_weight_max", "delta_over_weight_mean", "engine", "eval_extra_history", "eval_history",
    "frozen_checksum_after", "frozen_checksum_before", "loss_first", "loss_history", "loss_last",
    "matched_modules", "memory", "quantized_bytes_bf16", "quantized_bytes_loaded", "ranks", "selected_step",
    "steps", "stopped_early", "throughput", "trainable_params", "world_size", "zero_grad_share"]


def test_ddp_reference_trains(reference):
    manifest, folder = reference
    _assert_trained(manifest)
    assert sorted(manifest) == SFT_MANIFEST_KEYS_8A155DB
    assert set(manifest["metrics"]) == set(SFT_METRICS_8A155DB) | {"attn_implementation", "lora_target_modules"}
    assert manifest["metrics"]["world_size"] == 2
    for r in manifest["metrics"]["ranks"]:  # DDP replicates a 16/32-bit base: the whole of it on every rank
        assert r["base_load"] == "full" and r["base_params_local"] == r["base_params_total"]
    assert manifest["metrics"]["engine"] == {"engine": "ddp", "autocast": None, "zero_stage": 0,
                                             "offload_optimizer_device": None, "optimizer_offloaded": False,
                                             "optimizer": "AdamW"}
    assert manifest["metrics"]["eval_history"] and manifest["metrics"]["best_eval_loss"] is not None
    assert (folder / "loss.png").stat().st_size > 1000


def test_worker_killed_mid_run_resumes_from_checkpoint(ray_session, tiny_model_dir, data_dir, tmp_path, reference):
    """The rank-0 worker process SIGKILLs itself at step 4 the first time (a dead process, not an exception);
    checkpoint every 2 steps: Ray Train restarts the group from step 2's checkpoint, and the loss history and the
    adapter equal the uninterrupted run of the same seed (tolerance 1e-3)."""
    manifest, folder = _sft(ray_session, tiny_model_dir, data_dir, tmp_path, **REF, checkpoint_every=2,
                            fail_once_at_step=4)
    ref_manifest, ref_folder = reference
    assert (tmp_path / "ray_train" / "fault_drill_step4").exists()  # the fault really fired
    m = manifest["metrics"]
    assert m["steps"] == 6 and len(m["loss_history"]) == 6  # counter continued; history not restarted
    assert m["loss_history"] == pytest.approx(ref_manifest["metrics"]["loss_history"], abs=1e-3)
    ref, got = _adapter(ref_folder), _adapter(folder)
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) < 1e-3


def _assert_offloaded(m, stage: int):
    """The engine itself reports the optimizer offload (read back from DeepSpeed, not from our config); the
    optimizer is torch AdamW (zero_force_ds_cpu_optimizer=false: DeepSpeed's cpu_adam is not JIT-built)."""
    assert m["engine"] == {"engine": "deepspeed", "autocast": None, "zero_stage": stage,
                           "offload_optimizer_device": "cpu", "optimizer_offloaded": True, "optimizer": "AdamW",
                           "zero_optimizer": f"DeepSpeedZeroOptimizer{'_Stage3' if stage == 3 else ''}"}


def test_zero3_offload_matches_ddp_and_trains(ray_session, tiny_model_dir, data_dir, tmp_path, reference):
    """ZeRO-3 with the optimizer offloaded to the CPU: the base partitioned from the start, every step's loss as
    DDP's (the first to 1e-4; accumulation and the schedule step as DDP's do), the offload reported by the engine,
    and the saved adapter reproduces the trained model's logits. (ZeRO-3 without offload runs in the QLoRA
    ZeRO-3 test: one ZeRO-3 run here, not two.)"""
    manifest, folder = _sft(ray_session, tiny_model_dir, data_dir, tmp_path, **REF, deepspeed="zero3-offload")
    _assert_trained(manifest)
    m = manifest["metrics"]
    assert m["loss_history"] == pytest.approx(reference[0]["metrics"]["loss_history"], abs=2e-3)
    assert m["loss_history"][0] == pytest.approx(reference[0]["metrics"]["loss_history"][0], abs=1e-4)
    assert m["ranks"][0]["base_params_total"] == reference[0]["metrics"]["ranks"][0]["base_params_total"]
    _assert_offloaded(m, 3)
    _assert_partitioned(m)
    _assert_reload_reproduces(tiny_model_dir, folder, four_bit=False)


def test_zero2_first_step_loss_matches_and_early_stopping(ray_session, tiny_model_dir, data_dir, tmp_path,
                                                         reference):
    """A learning rate far too high (0.5, no warmup: Adam's first full steps overshoot) makes validation loss worse
    at step 2: early stopping (patience 1) must end the run there and select the step-1 checkpoint, not the last.
    Run under ZeRO-2 with CPU optimizer offload (plain ZeRO-2 runs in the QLoRA test): one run for both."""
    patience = 1
    manifest, _ = _sft(ray_session, tiny_model_dir, data_dir, tmp_path, grad_accum=2, deepspeed="zero2-offload",
                       max_steps=20, lr=0.5, warmup_steps=0, eval_every=1, early_stopping_patience=patience)
    m = manifest["metrics"]
    assert m["loss_history"][0] == pytest.approx(reference[0]["metrics"]["loss_history"][0], abs=1e-4)
    _assert_offloaded(m, 2)
    assert m["stopped_early"] and m["steps"] < 20
    evals = [v for _, v in m["eval_history"]]
    assert len(evals) == m["steps"] > patience
    assert min(evals[-patience:]) >= min(evals[:-patience]) - 1e-6  # the last `patience` evals did not improve
    assert m["selected_step"] == m["eval_history"][evals.index(min(evals))][0] < m["steps"]


def test_qlora_zero2_base_stays_4bit_and_unchanged(ray_session, tiny_model_dir, data_dir, tmp_path):
    manifest, folder = _sft(ray_session, tiny_model_dir, data_dir, tmp_path, deepspeed="zero2",
                            quant={"load_in_4bit": True, "compute_dtype": "float32"})
    _assert_trained(manifest)
    m = manifest["metrics"]
    # one rank per node quantized the base and published it; the other loaded it already packed
    assert sorted(r["base_load"] for r in m["ranks"]) == ["prequantized-cache", "quantized-here"]
    assert len({r["frozen_checksum"] for r in m["ranks"]}) == 1  # bit-identical 4-bit base on both ranks
    assert len(list((tmp_path / "base_cache").iterdir())) == 1
    assert m["quantized_bytes_bf16"] > 0  # the linear layers really are 4-bit
    assert m["quantized_bytes_loaded"] <= 0.26 * m["quantized_bytes_bf16"]  # 4 of 16 bits, packed
    _assert_reload_reproduces(tiny_model_dir, folder, four_bit=True)


def _assert_reload_reproduces(model_dir, folder, four_bit: bool):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from pipelines.train.base import load_base
    from pipelines.train.config import QuantSection
    from pipelines.train.sft import PROBE

    quant = QuantSection(load_in_4bit=four_bit, compute_dtype="float32")
    model = PeftModel.from_pretrained(load_base(model_dir, "float32", quant, False), str(folder)).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(model_dir)(PROBE)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    expected = load_file(str(folder / "probe_logits.safetensors"))["logits"]
    assert (logits - expected).abs().max() < 1e-4


ONE_WORKER = dict(num_workers=1, cpus_per_worker=1, batch_size=16, grad_accum=1, max_steps=3)


@pytest.fixture(scope="module")
def one_worker_packed(ray_session, tiny_model_dir, packed_data_dir, tmp_path_factory):
    """One Ray Train worker, batch 16, 3 steps on the packed rows: (manifest, adapter folder)."""
    return _sft(ray_session, tiny_model_dir, packed_data_dir, tmp_path_factory.mktemp("acc1"), **ONE_WORKER)


def test_accumulation_equals_one_big_batch_on_packed_rows(ray_session, tiny_model_dir, packed_data_dir,
                                                          tmp_path_factory, one_worker_packed):
    """4 micro-batches × accumulation 4 follow the same loss trajectory as one batch of 16 (1 worker, so both
    runs see the same rows in the same order). The rows are packed blocks, so the trainer's packed path
    (position ids, block-diagonal mask, token-weighted loss) is what is being trained and compared."""
    runs = {1: one_worker_packed[0]["metrics"]}
    manifest, _ = _sft(ray_session, tiny_model_dir, packed_data_dir, tmp_path_factory.mktemp("acc4"),
                       **{**ONE_WORKER, "batch_size": 4, "grad_accum": 4})
    runs[4] = manifest["metrics"]
    assert runs[1]["loss_history"] == pytest.approx(runs[4]["loss_history"], abs=1e-3)
    assert runs[4]["loss_history"][-1] < runs[4]["loss_history"][0]
    assert runs[1]["throughput"]["tokens"] == runs[4]["throughput"]["tokens"] > 0


def test_local_loop_is_the_ray_train_loop(ray_session, tiny_model_dir, packed_data_dir, tmp_path_factory,
                                          one_worker_packed):
    """`sft --local` runs the same loop in this process (one rank, gloo on a CPU, NCCL on a GPU) and gives what a
    one-worker Ray Train run gives on the same packed rows: the same losses, manifest keys and adapter files."""
    ray_m, ray_dir = one_worker_packed
    loc_m, loc_dir = _sft(ray_session, tiny_model_dir, packed_data_dir, tmp_path_factory.mktemp("local"),
                          local=True, **ONE_WORKER)
    assert loc_m["metrics"]["loss_history"] == pytest.approx(ray_m["metrics"]["loss_history"], abs=1e-4)
    assert [v for _, v in loc_m["metrics"]["eval_history"]] == \
        pytest.approx([v for _, v in ray_m["metrics"]["eval_history"]], abs=1e-4)
    assert set(loc_m["metrics"]) == set(ray_m["metrics"]) and set(loc_m) == set(ray_m)
    assert sorted(p.name for p in loc_dir.iterdir() if p.is_file()) == \
        sorted(p.name for p in ray_dir.iterdir() if p.is_file())
    m = loc_m["metrics"]
    assert m["frozen_checksum_before"] == m["frozen_checksum_after"]
    assert m["throughput"]["steps_measured"] == 1 and m["throughput"]["warmup_steps_skipped"] == 2
    assert m["attn_implementation"] == "sdpa" and m["engine"]["autocast"] is None  # CPU: no autocast
    assert list((loc_dir / "ray_train" / "sft").glob("checkpoint_*"))


def test_qlora_under_zero3_partitions_the_4bit_base(ray_session, tiny_model_dir, data_dir, tmp_path):
    """QLoRA under ZeRO-3 (bf16: the packed 4-bit weights stored as bf16 tensors), 2 ranks on CPU: the 4-bit
    base is partitioned, trains, and is left unchanged (checksums of bf16 values, before and after)."""
    manifest, _ = _sft(ray_session, tiny_model_dir, data_dir, tmp_path, deepspeed="zero3", max_steps=4,
                       quant={"load_in_4bit": True, "compute_dtype": "bfloat16"}, dtype_model="bfloat16")
    m = manifest["metrics"]
    assert m["loss_history"][-1] < m["loss_history"][0], m["loss_history"]
    assert m["frozen_checksum_before"] == m["frozen_checksum_after"]
    assert {r["base_load"] for r in m["ranks"]} == {"zero3-4bit-partitioned"}
    assert m["engine"]["zero_stage"] == 3 and not m["engine"]["optimizer_offloaded"]  # plain ZeRO-3: no offload


def test_auto_cadence_checkpoints_once_checkpoint_minutes_of_steps_passed(ray_session, tiny_model_dir,
                                                                          packed_data_dir, tmp_path_factory):
    """checkpoint_every=auto (the default) adds a checkpoint, validated, whenever checkpoint_minutes of step time
    passed since the last: with a limit below one step's time every step is one; with the default 10 minutes a
    3-step run checkpoints and validates only at its end."""
    fast, _ = _sft(ray_session, tiny_model_dir, packed_data_dir, tmp_path_factory.mktemp("timed"), local=True,
                   checkpoint_minutes=1e-6, **ONE_WORKER)
    assert [s for s, _ in fast["metrics"]["eval_history"]] == [1, 2, 3]
    plain, _ = _sft(ray_session, tiny_model_dir, packed_data_dir, tmp_path_factory.mktemp("untimed"), local=True,
                    **ONE_WORKER)
    assert [s for s, _ in plain["metrics"]["eval_history"]] == [3]
