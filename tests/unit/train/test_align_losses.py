"""ORPO, SimPO and KTO equal TRL's own losses on the same batch: value and LoRA gradients within 1e-5 (float32).

TRL's code is called, not re-typed: ORPO through `ORPOTrainer.get_batch_loss_metrics` (its forward, NLL and
`odds_ratio_loss`), SimPO through `CPOTrainer.get_batch_loss_metrics` with loss_type="simpo" and cpo_alpha=0 (its
`cpo_loss`), both in trl.experimental in TRL 1.16 and run on a trainer object holding only the attributes those
methods read; KTO through a real `trl.KTOTrainer` (stable API in 1.16; its `compute_loss`, where the loss is
written inline) with a PEFT adapter as the policy and the adapter disabled as the reference. Ours: the lean
per-token log-probs (pipelines.train.dpo.policy_logps, chunks of 3) into pipelines.train.losses.
"""

from __future__ import annotations

import pytest
import torch

from pipelines.data.chat import pad_batch
from pipelines.train.dpo import policy_logps
from pipelines.train.losses import kto_kl, kto_loss, orpo_loss, simpo_loss


def _tiny_peft_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            init_lora_weights=False)).float()


def _pairs(prompt_tokens: int):
    """Three pairs of unequal completion lengths after a prompt of `prompt_tokens` tokens, as TRL's paired trainers
    take them (right-padded chosen_/rejected_ input ids, attention masks, labels with the prompt at -100) and as
    our collate does (chosen rows, then rejected rows, one padded batch)."""
    g = torch.Generator().manual_seed(3)
    sides = {"chosen": [], "rejected": []}
    for n_c, n_r in ((5, 9), (8, 4), (6, 6)):
        prompt = torch.randint(3, 97, (prompt_tokens,), generator=g).tolist()
        for side, n in (("chosen", n_c), ("rejected", n_r)):
            answer = torch.randint(3, 97, (n,), generator=g).tolist()
            sides[side].append((prompt + answer, [-100] * prompt_tokens + answer))
    trl_batch = {}
    for side, rows in sides.items():
        padded = pad_batch(rows, 0)
        trl_batch[f"{side}_input_ids"] = torch.tensor(padded["input_ids"])
        trl_batch[f"{side}_attention_mask"] = torch.tensor(padded["attention_mask"])
        trl_batch[f"{side}_labels"] = torch.tensor(padded["labels"])
    ours = {k: torch.tensor(v) for k, v in pad_batch(sides["chosen"] + sides["rejected"], 0).items()}
    return trl_batch, ours


def _trainer(cls, **attrs):
    """A TRL trainer object carrying just what its loss methods read (its __init__ wants a dataset to tokenize)."""
    from accelerate import Accelerator

    trainer = cls.__new__(cls)
    trainer.__dict__.update(is_encoder_decoder=False, aux_loss_enabled=False, padding_value=0, pad_token_id=0,
                            label_pad_token_id=-100, accelerator=Accelerator(cpu=True), **attrs)
    return trainer


def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _assert_same(ours, theirs):
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    assert ours[1].keys() == theirs[1].keys() and len(theirs[1]) >= 8
    for k in theirs[1]:
        torch.testing.assert_close(ours[1][k], theirs[1][k], rtol=1e-5, atol=1e-5)
    assert max(float(g.abs().max()) for g in theirs[1].values()) > 1e-4  # gradients that can differ


def _ours_paired(model, batch, loss, **kw):
    def fn():
        logps, ntok = policy_logps(model, batch, chunk_tokens=3)
        b = logps.shape[0] // 2
        return loss(logps[:b], logps[b:], ntok[:b], ntok[b:], **kw)["losses"].mean()
    return fn


def test_orpo_equals_trl():
    """λ = TRL's ORPOConfig default (0.1). A one-token prompt: TRL's NLL covers every attended token after the
    first (prompt too), ours the completion only (the paper's L_SFT of y_w); with one prompt token both score the
    same tokens."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    lam = ORPOConfig.__dataclass_fields__["beta"].default
    assert lam == 0.1
    model = _tiny_peft_llama()
    trl_batch, ours = _pairs(prompt_tokens=1)
    trainer = _trainer(ORPOTrainer, beta=lam)
    theirs = _grads(model, lambda: trainer.get_batch_loss_metrics(model, trl_batch)[0])
    _assert_same(_grads(model, _ours_paired(model, ours, orpo_loss, lam=lam)), theirs)
    metrics = trainer.get_batch_loss_metrics(model, trl_batch)[1]
    with torch.no_grad():
        logps, ntok = policy_logps(model, ours, chunk_tokens=3)
        out = orpo_loss(logps[:3], logps[3:], ntok[:3], ntok[3:], lam=lam)
    assert float(out["log_odds_ratio"].mean()) == pytest.approx(metrics["log_odds_ratio"], abs=1e-5)
    assert float(out["accuracy"].mean()) == pytest.approx(metrics["rewards/accuracies"])
    assert float(out["margins"].mean()) == pytest.approx(metrics["rewards/margins"], abs=1e-5)


def test_simpo_equals_trl():
    """The SimPO authors' defaults (β = 2.0, γ/β = 0.5, so TRL's simpo_gamma = γ = 1.0), not TRL's CPOConfig ones
    (β 0.1, simpo_gamma 0.5); a four-token prompt, masked in both."""
    from trl.experimental.cpo import CPOTrainer

    beta, ratio = 2.0, 0.5
    model = _tiny_peft_llama()
    trl_batch, ours = _pairs(prompt_tokens=4)
    trainer = _trainer(CPOTrainer, beta=beta, loss_type="simpo", simpo_gamma=ratio * beta, cpo_alpha=0.0,
                       alpha=0.0, label_smoothing=0.0)
    theirs = _grads(model, lambda: trainer.get_batch_loss_metrics(model, trl_batch)[0])
    _assert_same(_grads(model, _ours_paired(model, ours, simpo_loss, beta=beta, gamma_beta_ratio=ratio)), theirs)


def test_kto_equals_trl(tiny_model_dir, tmp_path):
    """A real trl.KTOTrainer on 6 unpaired rows (4 desirable, 2 undesirable; weights 1 : 1.5, so 4 : 3 weighted,
    within the 1:1 to 4:3 the KTO paper asks of the weighted counts), batch of 6: its compute_loss against ours on
    the batch its collator built, the KL pairs included (its mismatched completions)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"Where is meeting {i}?"}],
         "completion": [{"role": "assistant", "content": f"In Oslo on {i} May." if good else "No idea at all."}],
         "label": good} for i, good in enumerate([True, False, True, True, False, True])])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, beta=0.1, desirable_weight=1.0,
                     undesirable_weight=1.5, bf16=False, report_to=[], use_cpu=True)
    trainer = KTOTrainer(model=model, args=args, train_dataset=rows, processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
    batch = next(iter(trainer.get_train_dataloader()))
    policy = trainer.model
    policy.train()
    theirs = _grads(policy, lambda: trainer.compute_loss(policy, batch))

    def view(prefix=""):
        ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]
        return {"input_ids": ids, "attention_mask": mask,
                "labels": ids.masked_fill(batch[f"{prefix}completion_mask"] == 0, -100)}

    def ours():
        with torch.no_grad(), policy.disable_adapter():
            ref, ref_kl = policy_logps(policy, view(), 3)[0], policy_logps(policy, view("KL_"), 3)[0]
        kl = kto_kl(policy_logps(policy, view("KL_"), 3)[0], ref_kl)
        out = kto_loss(policy_logps(policy, view(), 3)[0], ref, batch["label"], kl, beta=0.1,
                       desirable_weight=1.0, undesirable_weight=1.5)
        assert out["margin"] is not None and float(kl) >= 0
        return out["losses"].mean()

    assert batch["label"].tolist().count(True) == 4
    _assert_same(_grads(policy, ours), theirs)


def test_kto_reference_point_is_clamped_and_detached():
    policy_kl = torch.tensor([-2.0, -3.0], requires_grad=True)
    assert float(kto_kl(policy_kl, torch.tensor([-1.0, -1.0]))) == 0.0  # negative estimate → 0
    kl = kto_kl(policy_kl, torch.tensor([-3.0, -3.0]))
    assert float(kl) == pytest.approx(0.5) and not kl.requires_grad
    out = kto_loss(torch.tensor([-1.0, -5.0]), torch.tensor([-2.0, -2.0]), torch.tensor([True, False]), kl, beta=1.0,
                   desirable_weight=2.0, undesirable_weight=1.0)
    assert float(out["losses"][0]) == pytest.approx(2 * (1 - torch.sigmoid(torch.tensor(0.5)).item()))
    assert float(out["losses"][1]) == pytest.approx(1 - torch.sigmoid(torch.tensor(3.5)).item())
    assert float(out["margin"]) == pytest.approx(1.0 - (-3.0)) and out["accuracy"].tolist() == [1.0, 1.0]


def _kto_rank(rank: int, port: int, shifts: tuple[float, float], queue) -> None:
    """One of two data-parallel ranks (gloo, CPU): the same policy on this rank's own KTO micro-batch, whose
    mismatched pairs' reference log-probs are the policy's shifted by shifts[rank] (local log-ratio -shift);
    reports the z0 the align stage's loss used, while training and while evaluating, and the local estimate."""
    import torch.distributed as dist

    from pipelines.train.config import DPOSection
    from pipelines.train.dpo import make_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = _tiny_peft_llama()
        g = torch.Generator().manual_seed(10 + rank)
        seqs = [torch.randint(3, 97, (9,), generator=g).tolist() for _ in range(3)]  # 5 prompt + 4 completion
        rows = [(ids, [-100] * 5 + ids[5:]) for ids in seqs]
        kl_seqs = [ids[:5] + torch.randint(3, 97, (3 + i,), generator=g).tolist() for i, ids in enumerate(seqs)]
        kl_rows = [(ids, [-100] * 5 + ids[5:]) for ids in kl_seqs]  # each prompt with another completion
        batch = {k: torch.tensor(v) for k, v in pad_batch(rows, 0).items()}
        batch.update({f"kl_{k}": torch.tensor(v) for k, v in pad_batch(kl_rows, 0).items()})
        with torch.no_grad():
            kl_logps, _ = policy_logps(model, {"input_ids": batch["kl_input_ids"], "labels": batch["kl_labels"],
                                               "attention_mask": batch["kl_attention_mask"]}, 3)
        batch["ref_kl"] = kl_logps + shifts[rank] + torch.tensor([0.3, -0.1, -0.2])  # mean shift: shifts[rank]
        batch["ref"] = torch.zeros(3)
        batch["label"] = torch.tensor([True, False, True])
        loss_fn = make_loss(DPOSection(method="kto"), 3, (1.0, 1.0))
        _, b, extras = loss_fn(model, batch)  # grad enabled: training, z0 reduced over the ranks
        with torch.no_grad():
            _, _, held_out = loss_fn(model, batch)  # evaluation: this rank's own z0
        local = float((kl_logps - batch["ref_kl"]).mean())
        queue.put((rank, float(extras["kl"]) / b, float(held_out["kl"]) / b, local))
    finally:
        dist.destroy_process_group()


def test_kto_reference_point_is_the_mean_over_data_parallel_ranks():
    """Two gloo ranks in two processes, each with its own micro-batch: rank 0's mismatched pairs give a local
    log-ratio of +2, rank 1's of -1 (clamped alone to 0). While training, both ranks' losses use one z0: the mean
    over both ranks' pairs (0.5), reduced before the clamp; while evaluating each keeps its own."""
    import multiprocessing as mp

    from tests.conftest import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_kto_rank, args=(r, port, (-2.0, 1.0), queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict((r, rest) for r, *rest in (queue.get(timeout=240) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    (z0_0, eval_0, local_0), (z0_1, eval_1, local_1) = got[0], got[1]
    assert local_0 == pytest.approx(2.0, abs=1e-4) and local_1 == pytest.approx(-1.0, abs=1e-4)
    assert z0_0 == z0_1 == pytest.approx((local_0 + local_1) / 2, abs=1e-5)  # 0.5: the all-reduced mean
    assert eval_0 == pytest.approx(local_0, abs=1e-5) and eval_1 == 0.0  # unreduced, clamped at zero
