"""The rl stage on the tiny model: GRPO with rollouts on a real vLLM CPU engine (a Ray actor), the adapter synced
as immutable versions policy@N, the parity gate between trainer and rollouts.

One engine serves the module (it is reset for each run): a run that learns a reward the tiny model can learn in a
few steps (short completions), and the fault drill where the engine samples from the base model while recording
the policy version, which the parity gate must stop.

    .venv/bin/pytest tests/integration/test_rl.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PROMPTS = ["Name a city.", "Say a date.", "Where is Oslo?", "Pick a colour.", "Count to three.", "Greet me.",
           "What is the weather?", "Tell me a word."]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("rl-prompts") / "prompts.jsonl"
    f.write_text("".join(json.dumps({"question": q, "gold": str(i)}) + "\n" for i, q in enumerate(PROMPTS))
                 + "{broken json\n")
    return f


@pytest.fixture(scope="module")
def rl_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with its output head scaled ×10. The tiny model's head (std 0.02) after the final RMSNorm
    keeps every logit within a few tenths of the others: no adapter on the layers can make any token likely, so
    nothing is learnable. With a sharper head, what the layers write moves the distribution."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("models") / "tiny-llama-sharp"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def rollout_engine(ray_session, rl_model_dir):
    """One vLLM engine actor for the module, configured as serving configures its replicas."""
    from pipelines.train.rollout import engine_env, engine_kwargs, start_engine
    from serve.config import ServeConfig

    serve_cfg = ServeConfig(max_lora_rank=8, max_model_len=256)
    handle = start_engine(engine_kwargs(serve_cfg, rl_model_dir, max_loras=3, gpu=False, seed=0), 1,
                          num_cpus=1, num_gpus=0, env=engine_env(serve_cfg))
    yield handle
    ray_session.kill(handle)


def _setup(tiny_model_dir):
    from pipelines.train.config import TrainSection, TrainSetup

    return TrainSetup(model_dir=tiny_model_dir, train=TrainSection(num_workers=1, cpus_per_worker=1, log_every=1,
                                                                   tracking_uri="off"))


@pytest.fixture(scope="module")
def learned(rollout_engine, rl_model_dir, prompts_file, tmp_path_factory):
    from pipelines.train import rl
    from pipelines.train.config import LoraSection
    from pipelines.train.rl_config import RLSection
    from serve.config import ServeConfig

    # micro-batches of 8: 4 per step on one worker, 2 per rank on the two DDP ranks of the test that repeats step 1
    cfg = RLSection(prompts_path=str(prompts_file), columns={"prompt": "question", "gold": "gold"},
                    rewards=[{"fn": "length_penalty", "args": {"max_chars": 0, "scale": 64}}], num_generations=4,
                    prompts_per_step=8, micro_batch_size=8, sampling={"max_new_tokens": 8}, steps=12, lr=3e-3,
                    staleness=0, parity={"warn": 0.002, "stop": 0.01}, seed=0)
    out = tmp_path_factory.mktemp("rl") / "rl"
    return rl.run(cfg, _setup(rl_model_dir), LoraSection(r=8, alpha=16), ServeConfig(max_lora_rank=8), out,
                  engine=rollout_engine), cfg


def test_rl_learns_with_an_intact_version_chain_and_parity(learned):
    from pipelines.artifacts.manifest import read_manifest

    out, cfg = learned
    steps = [json.loads(line) for line in (out / "rl_steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, cfg.steps + 1))
    rewards = [s["reward_mean"] for s in steps]
    # every step samples all 8 prompts: the steps' rewards compare. The reward rose (shorter answers): from -0.37
    # to -0.09 in 12 steps here. (One step of staleness, rollouts overlapping training, runs in
    # test_rl_multinode.py: its version chain shows the overlap.)
    rise = sum(rewards[-4:]) / 4 - sum(rewards[:2]) / 2
    assert rise > 0.1, rewards
    # the version chain, from the records: step k trains policy@k-1 on rollouts at most `staleness` behind
    for s in steps:
        assert s["trainer_version"] == s["step"] - 1
        assert 0 <= s["lag"] <= cfg.staleness and s["rollout_version"] == s["step"] - 1 - s["lag"]
        assert s["published"] == f"policy@{s['step']}"
    versions = [s["rollout_version"] for s in steps]
    assert versions == sorted(versions) and versions[-1] >= cfg.steps - 1 - cfg.staleness
    assert not any(s["lag"] for s in steps)  # on-policy: every step trained on its own version's rollouts
    ids = {}
    for s in steps:  # one LoRA id per version, never reused for another
        assert ids.setdefault(s["rollout_version"], s["lora_id"]) == s["lora_id"]
    assert len(set(ids.values())) == len(ids)
    policies = out / "ray_train" / "policies"
    assert sorted(p.name for p in policies.iterdir()) == sorted(f"policy@{v}" for v in range(cfg.steps + 1))
    for v in range(cfg.steps + 1):
        assert {f.name for f in (policies / f"policy@{v}").iterdir()} >= {"adapter_config.json",
                                                                         "adapter_model.safetensors"}
    # parity within threshold on every step, and the sync measured
    assert max(s["parity_mean"] for s in steps) < cfg.parity.warn, [s["parity_mean"] for s in steps]
    assert all(s["parity_tokens"] == 8 * 4 * s["mean_completion_tokens"] for s in steps)
    assert any(s["sync_s"] is not None and s["sync_s"] > 0 for s in steps)
    assert all(s["load_s"] is not None for s in steps)
    m = read_manifest(out, kind="lora_adapter")
    assert m["metrics"]["reward_history"] == rewards and m["metrics"]["sync_s_median"] > 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "reward.png").is_file()
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and rejected[0]["line"] == len(PROMPTS) + 1 and "broken_json" in rejected[0]["reason"]


def test_base_model_rollouts_trip_the_parity_gate(rollout_engine, rl_model_dir, prompts_file, tmp_path):
    """The engine samples from the base while recording policy@0 (the SFT adapter): the gate stops the stage."""
    from pipelines.train import rl
    from pipelines.train.config import LoraSection
    from pipelines.train.rl_config import RLSection
    from serve.config import ServeConfig
    from tests.integration.test_serve import make_adapter

    sft = make_adapter(rl_model_dir, tmp_path / "sft", seed=5)
    cfg = RLSection(prompts_path=str(prompts_file), columns={"prompt": "question"},
                    rewards=[{"fn": "length_penalty"}], num_generations=2, prompts_per_step=2,
                    sampling={"max_new_tokens": 4}, steps=1, start="sft", drill_base_rollout_at_step=1,
                    parity={"warn": 0.002, "stop": 0.01})
    out = tmp_path / "rl"
    with pytest.raises(rl.RLStopped, match=r"parity gate: mean \|log π_trainer − log π_rollout\| = .* > "
                                           r"rl.parity.stop=0.01"):
        rl.run(cfg, _setup(rl_model_dir), LoraSection(r=8), ServeConfig(max_lora_rank=8), out, sft=sft,
               engine=rollout_engine)
    (step,) = [json.loads(line) for line in (out / "rl_steps.jsonl").read_text().splitlines()]
    assert step["rollout_version"] == 0 and step["parity_mean"] > 0.01
    assert not (out / "manifest.json").exists()  # a stopped stage is not finished


def test_two_ddp_workers_take_the_step_one_worker_takes(learned, rollout_engine, rl_model_dir, tmp_path):
    """train.num_workers=2 (DDP, gloo): rank 0 asks the engine, each rank trains on its share of the groups (4 of
    the 8 prompts, in 2 micro-batches: DDP's no_sync path), the loss is scaled so the all-reduced gradient is the
    whole batch's. Same config and seed, same rollouts: the step's gradient norm, loss and the published adapter
    equal step 1 of the one-worker run above (Adam's first step hides a gradient's scale, the gradient norm does
    not)."""
    from safetensors.torch import load_file

    from pipelines.train import rl
    from pipelines.train.config import LoraSection, TrainSection, TrainSetup
    from serve.config import ServeConfig

    out1, cfg = learned
    one = json.loads((out1 / "rl_steps.jsonl").read_text().splitlines()[0])
    a1 = load_file(str(out1 / "ray_train" / "policies" / "policy@1" / "adapter_model.safetensors"))
    setup = TrainSetup(model_dir=rl_model_dir, train=TrainSection(num_workers=2, cpus_per_worker=0.5, log_every=1,
                                                                  tracking_uri="off"))
    out2 = rl.run(cfg.model_copy(update={"steps": 1}), setup, LoraSection(r=8, alpha=16),
                  ServeConfig(max_lora_rank=8), tmp_path / "w2", engine=rollout_engine)
    (two,) = [json.loads(line) for line in (out2 / "rl_steps.jsonl").read_text().splitlines()]
    a2 = load_file(str(out2 / "adapter_model.safetensors"))
    assert (one["step"], one["workers"], two["workers"]) == (1, 1, 2)
    # the same rollouts (seeded sampling of the same policy@0), all of them scored across the two ranks
    assert one["completion_tokens"] == two["completion_tokens"] and one["reward_mean"] == two["reward_mean"]
    assert two["parity_tokens"] == two["completion_tokens"] and two["parity_mean"] < 0.002
    assert two["grad_norm"] > 0 and two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4), (one, two)
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)
    assert a1.keys() == a2.keys() and any(float(v.abs().max()) > 0 for k, v in a2.items() if "lora_B" in k)
    assert max(float((a1[k] - a2[k]).abs().max()) for k in a1) < 1e-5
