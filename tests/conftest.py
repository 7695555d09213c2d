"""Shared fixtures: one local Ray instance per test session (num_cpus=2) and the tiny model, built once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"  # only the files that may not be copied here (see `shared_data`)
REPO_DATA = REPO / "tests" / "data"  # MIT / Apache-2.0 samples of ../shared/data (see `repo_data`)
DEMO = REPO / "pipelines" / "demo" / "city_date.jsonl"

# vLLM binds its internal queues to the machine's external address unless told otherwise; tests stay local.
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """The one local Ray instance of this test session. With the dashboard: Ray's State API, which Ray Tune over
    Ray Train V2 needs to free the resources of stopped trials (STACK_NOTES) and Ray Train's cleaner queries."""
    import ray
    import ray.data  # noqa: F401  Ray Data binds its console log handler to sys.stderr at import: here, not
    # inside a CliRunner invocation, whose captured stream is closed after it (later logs: "Logging error")

    if not ray.is_initialized():  # the workers ask this instance's State API, not whichever they find (runner)
        port = free_port()
        env = {k: os.environ[k] for k in ("VLLM_HOST_IP", "VLLM_CPU_KVCACHE_SPACE", "TOKENIZERS_PARALLELISM")}
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=port, log_to_driver=True,
                 runtime_env={"env_vars": {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random Llama + locally trained ChatML tokenizer, as an HF safetensors folder."""
    from pipelines.artifacts.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def tokenized_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tokenized dataset (train + validation Parquet + manifest) written directly from 320 demo rows, for the
    trainer and sweep tests."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from pipelines.artifacts.manifest import write_manifest
    from pipelines.data.chat import tokenize_messages
    from pipelines.data.rowformats import alpaca_to_messages

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:320]]
    out = tmp_path_factory.mktemp("tokenized")
    for split, part in (("train", rows[:256]), ("validation", rows[256:])):
        toks = [tokenize_messages(tok, alpaca_to_messages(r), 256) for r in part]
        (out / split).mkdir()
        pq.write_table(pa.table({"input_ids": [t.input_ids for t in toks], "labels": [t.labels for t in toks]}),
                       out / split / "part-0.parquet")
    write_manifest(out, kind="tokenized_dataset", inputs={"train": str(DEMO)}, config={},
                   extra={"outputs": {"train": "train", "validation": "validation"}})
    return out


def tiny_graph_config(name: str, folder: Path, model_dir: str, output_dir: str, registry: str) -> dict:
    """A run config for the whole tiny graph: 120 demo rows to train on and 20 held out (written into `folder`),
    4 SFT steps, an HF-backend evaluation of 4 rows and a gate set to pass (the point is the hand-offs, not the
    score)."""
    import json

    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:140]]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:120]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[120:]))
    return {"name": name, "output_dir": output_dir, "model": {"name": model_dir},
            "data": {"train_path": str(folder / "train.jsonl"), "max_length": 256},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"num_workers": 1, "cpus_per_worker": 1, "max_steps": 4, "batch_size": 8, "lr": 5e-3,
                      "warmup_steps": 0, "log_every": 2, "tracking_uri": "off"},
            "eval": {"test_path": str(folder / "test.jsonl"), "max_samples": 4, "few_shot_k": 0, "backend": "hf",
                     "max_new_tokens": 8, "bertscore": False},
            "gate": {"min_rougeL_gain_over_base": -1.0, "min_rougeL_gain_over_few_shot": -1.0,
                     "max_general_nll_increase": None},
            "registry": {"root": registry}}


def require_shared_data(*parts: str) -> Path:
    """`../shared/data/<parts>`, or, when it is missing: a loud failure under CI=true, a skip elsewhere. Only for
    the files whose licences keep them out of the repository (Alpaca: CC BY-NC 4.0, Dolly: CC BY-SA 3.0, the WMT17
    data: research use); the MIT / Apache-2.0 ones the tests read are sampled into tests/data (`repo_data`)."""
    path = SHARED_DATA.joinpath(*parts)
    if path.exists():
        return path
    why = (f"{path} is not here (the project's shared data sits beside the checkout, in ../shared/data; it holds "
           "the Alpaca, Dolly and WMT17 files, whose licences keep them out of the repository)")
    if os.environ.get("CI", "").strip().lower() in ("true", "1"):
        pytest.fail(f"SHARED DATA MISSING under CI=true: {why}. CI must provide it; these tests do not skip "
                    "in CI.", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def repo_data() -> Path:
    """tests/data: first-rows samples of the MIT / Apache-2.0 files of ../shared/data, under the same sub-paths, with
    their licences and sources (tests/data/README.md, made by tests/data/make_samples.py). A test that reads only
    these uses this fixture and never skips: it needs nothing outside the repository."""
    return REPO_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, for the tests that read what may never be copied into the repository: the Alpaca
    (sft/alpaca_5000.json, CC BY-NC 4.0) and Dolly (sft/dolly_151_alpaca.jsonl, CC BY-SA 3.0) files and the WMT17
    systems (metrics/sacrebleu/, WMT research use). Without it they skip, or fail under CI=true
    (require_shared_data). Permissive files come from `repo_data` instead."""
    return require_shared_data()


@pytest.fixture(scope="session")
def wmt17(shared_data):
    """The WMT17 en-de systems and the corpus scores sacrebleu 2.6.0 recorded for them: from ../shared/data only
    (WMT data is for research use and is never copied into the repository)."""
    import gzip
    import json

    folder = shared_data / "metrics" / "sacrebleu"
    with gzip.open(folder / "wmt17_en_de_systems.json.gz", "rt") as f:
        systems = json.load(f)
    return systems, json.loads((folder / "wmt17_en_de_reference_scores.json").read_text())


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is present (the lent device), and are skipped elsewhere."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


BUCKET = "loraforge-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 API on localhost (moto in server mode) with bucket BUCKET, reached as an S3-compatible store is
    (AWS_ENDPOINT_URL + credentials, set in this process for the module)."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, Path(log.name).read_text()[-2000:]
                time.sleep(0.5)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        os.environ.update(env)
        yield {"env": env, "endpoint": endpoint, "proc": proc}  # proc: a test may stop and resume the store
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def keys(prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))
