"""The thin path end to end on the tiny model: Ray Data → Ray Train (2 workers, LoRA) → adapter → Ray Serve + vLLM.

    .venv/bin/pytest tests/integration/test_pipeline.py -q

One `loraforge run` (in-process, on the session's Ray instance) produces every artifact; the tests read them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

pytestmark = pytest.mark.integration

BAD_ROWS = [
    ('{"instruction": "Say hi", "output": "hi"', "broken_json"),
    ('{"input": "x", "output": "y"}', "missing_field"),
    ('{"instruction": 5, "output": "y"}', "wrong_type"),
    ('{"instruction": "Say hi", "output": "   "}', "empty_turn"),
    ('["not", "an", "object"]', "not_an_object"),
    (json.dumps({"instruction": "long " * 400, "output": "ok"}), "too_long"),
]


@pytest.fixture(scope="module")
def run_result(ray_session, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    demo = Path(__file__).resolve().parents[2] / "pipelines" / "demo" / "city_date.jsonl"
    data = root / "train.jsonl"
    good = demo.read_text().splitlines()[:200]
    data.write_text("\n".join(good[:100] + [row for row, _ in BAD_ROWS] + good[100:]) + "\n")
    prompt = "Extract the city and the date from the sentence. Answer with JSON only.\n\nAna flies to Oslo on 4 June."
    cfg = {
        "name": "tiny", "output_dir": str(root / "runs"),
        "model": {"name": tiny_model_dir},
        "data": {"train_path": str(data), "max_length": 256},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"num_workers": 2, "cpus_per_worker": 0.5, "max_steps": 12, "batch_size": 8, "lr": 5e-3,
                  "warmup_steps": 1, "log_every": 4},
        "serve": {"port": free_port(), "max_lora_rank": 8, "max_model_len": 512},
        "demo": {"prompts": [prompt], "max_tokens": 12},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result, demos = _run_recording_demos(path)
    return {"root": root / "runs" / "tiny", "output": result.output, "stdout": result.stdout, "cfg": cfg,
            "model": tiny_model_dir, "demos": demos}


def _run_recording_demos(path: Path):
    """`loraforge run path` in-process (exit 0 asserted, an exception re-raised), with what its demo got back through
    the OpenAI client recorded: (result, [{"url", "served", "rows"}])."""
    from typer.testing import CliRunner

    from cluster import stages
    from cluster.cli import app

    demos, real_demo = [], stages.demo

    def recording_demo(run_cfg, url, what):
        rows = real_demo(run_cfg, url, what)
        demos.append({"url": url, "served": what, "rows": rows})
        return rows

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages, "demo", recording_demo)
        result = CliRunner().invoke(app, ["run", str(path)])
    if result.exception:
        raise result.exception
    assert result.exit_code == 0, result.output
    return result, demos


def test_last_lines_name_what_was_served_and_the_run_folder(run_result):
    lines = run_result["stdout"].strip().splitlines()
    assert Path(lines[-1]) == run_result["root"].resolve()
    # the console's lines go to stderr (the output), the folder alone to stdout
    served = next(line for line in run_result["output"].splitlines() if line.startswith("served: "))
    assert served.startswith("served: base ") and f"adapter tiny ({(run_result['root'] / 'sft').resolve()})" in served


def test_data_counts_add_up_and_bad_rows_are_kept_with_reasons(run_result):
    data = run_result["root"] / "data"
    m = json.loads((data / "manifest.json").read_text())["metrics"]
    assert m["rows_in"] == 200 + len(BAD_ROWS)
    assert m["rows_rejected"] == len(BAD_ROWS) and m["rows_kept"] == 200
    assert m["rows_in"] == m["rows_kept"] + m["rows_rejected"]
    rejected = [json.loads(line) for f in sorted((data / "rejected").glob("*.jsonl"))
                for line in f.read_text().splitlines()]
    assert sorted(r["reason"].split(":")[0] for r in rejected) == sorted(reason for _, reason in BAD_ROWS)
    assert all(r["source"].endswith("train.jsonl") and r["row"] for r in rejected)
    assert m["rejected_by_reason"] == {reason: 1 for _, reason in BAD_ROWS}


def test_sft_loss_goes_down_lora_changed_base_did_not(run_result):
    sft = run_result["root"] / "sft"
    manifest = json.loads((sft / "manifest.json").read_text())
    m = manifest["metrics"]
    losses = m["loss_history"]
    assert len(losses) == m["steps"] == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses  # nats; a random model starts near ln(V)
    assert m["frozen_checksum_before"] == m["frozen_checksum_after"]
    assert m["delta_over_weight_max"] > 0  # the adapter moved away from zero
    assert (sft / "adapter_model.safetensors").is_file() and not list(sft.glob("*.bin"))
    assert (sft / "loss.png").stat().st_size > 1000
    assert manifest["kind"] == "lora_adapter" and manifest["inputs"]["data"]["hash"].startswith("sha256:")
    assert manifest["config"]["lora"]["r"] == 8


def test_trainable_params_match_closed_form(run_result):
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(run_result["model"])
    d, f = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    r = 8
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # q k v o gate up down: (in, out)
    expected = c.num_hidden_layers * sum(r * (i + o) for i, o in shapes)
    m = json.loads((run_result["root"] / "sft" / "manifest.json").read_text())["metrics"]
    assert m["trainable_params"] == expected


def test_adapter_reloads_from_safetensors_and_changes_the_output(run_result):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_result["model"])
    ids = tok.apply_chat_template([{"role": "user", "content": run_result["cfg"]["demo"]["prompts"][0]}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(run_result["model"], dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(run_result["root"] / "sft")).eval()
    with torch.no_grad():
        tuned_logits = tuned(ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-2


def test_served_base_and_adapter_answered(run_result):
    """`run` served base + adapter 'tiny' on the configured port, asked both the demo prompt and printed both."""
    out, cfg = run_result["output"], run_result["cfg"]
    url = f"http://127.0.0.1:{cfg['serve']['port']}/v1"
    assert f"serve: {url} up in" in out and "models: base, base:tiny" in out, out
    [demo] = run_result["demos"]  # one demo, against that endpoint, for that adapter
    assert demo["url"] == url and list(demo["served"].adapters) == ["tiny"]
    [row] = demo["rows"]
    assert set(row) == {"prompt", "base", "adapter"} and row["prompt"] == cfg["demo"]["prompts"][0]
    print(f"\nbase: {row['base']!r}\nadapter: {row['adapter']!r}")
    assert row["adapter"].strip() and row["base"].strip(), row  # both answers came back, neither empty
    assert row["adapter"] != row["base"], row  # base:tiny answered with the adapter, not as the base
    assert f"base vs adapter 'tiny' (greedy, via {url})" in out


def test_rerun_skips_finished_stages_and_dry_run_says_why(run_result):
    """The job graph's records: `--dry-run` shows data and sft cached; an override shows what it reruns; a real
    rerun up to sft runs nothing and leaves the adapter as it was."""
    from typer.testing import CliRunner

    from cluster.cli import app

    config = run_result["root"].parents[1] / "tiny.yaml"
    sft = run_result["root"] / "sft"
    before = (sft / "adapter_model.safetensors").stat().st_mtime_ns

    def plan(*args):
        r = CliRunner().invoke(app, ["run", str(config), *args, "--dry-run"])
        assert r.exit_code == 0, r.output
        return {line.split()[0]: line for line in r.stdout.strip().splitlines()[1:]}

    rows = plan()
    assert "cached" in rows["data"] and "cached" in rows["sft"], rows
    assert "off" in rows["dpo"] and "always runs" in rows["serve"]
    assert "train section changed" in plan("train.lr=1e-3")["sft"]
    r = CliRunner().invoke(app, ["run", str(config), "--until", "sft"])
    assert r.exit_code == 0, r.output
    assert "[graph] data: cached" in r.output and "[graph] sft: cached" in r.output
    assert "serve" not in r.output.split("[graph] sft: cached", 1)[1]
    assert (sft / "adapter_model.safetensors").stat().st_mtime_ns == before
    assert r.stdout.strip().splitlines()[-1] == str(run_result["root"].resolve())


@pytest.fixture(scope="module")
def built_run(run_result, tmp_path_factory):
    """The same run again with dpo, merge and quantize (int8) on: data and sft are cached, DPO trains on pairs
    made from the demo rows (the right JSON against one naming another city), the DPO adapter is merged and
    quantized, and the quantized model is what is served."""
    from typer.testing import CliRunner

    from cluster.cli import app

    root = tmp_path_factory.mktemp("built")
    demo = Path(__file__).resolve().parents[2] / "pipelines" / "demo" / "city_date.jsonl"
    rows = [json.loads(line) for line in demo.read_text().splitlines()]
    pairs = root / "pairs.jsonl"
    with open(pairs, "w") as fh:
        for i, r in enumerate(rows[:48]):
            other = json.loads(rows[(i + 7) % 48]["output"])["city"]
            wrong = json.loads(r["output"]) | {"city": other}
            fh.write(json.dumps({"prompt": f"{r['instruction']}\n\n{r['input']}", "chosen": r["output"],
                                 "rejected": json.dumps(wrong)}) + "\n")
    held_out = root / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows[560:]))
    cfg = {**run_result["cfg"],
           "dpo": {"train_path": str(pairs), "max_steps": 4, "batch_size": 4, "max_length": 256,
                   "validation_fraction": 0.0},
           "merge": {"dtype": "float32"},
           "quantize": {"method": "int8", "eval_path": str(held_out), "eval_samples": 8, "max_new_tokens": 8},
           "serve": {**run_result["cfg"]["serve"], "port": free_port()}}
    path = root / "tiny-built.yaml"
    path.write_text(yaml.safe_dump(cfg))
    dry = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    result, demos = _run_recording_demos(path)
    return {"root": run_result["root"], "config": path, "dry_run": dry.stdout, "output": result.output,
            "demos": demos, "cfg": cfg}


def test_the_run_serves_the_quantized_model_it_built(built_run):
    """dpo → merge → quantize (int8) → serve: the endpoint's answers are transformers' greedy answers on the
    quantized folder, which holds the merged DPO adapter; the dry run named that artifact beforehand."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = built_run["root"]
    quantized = (root / "quantize").resolve()
    assert f"serves: quantized model (int8) {root / 'quantize'}" in built_run["dry_run"], built_run["dry_run"]
    assert "[graph] data: cached" in built_run["output"] and "[graph] sft: cached" in built_run["output"]
    merged = json.loads((root / "merge" / "manifest.json").read_text())
    assert str((root / "dpo").resolve()) in json.dumps(merged["inputs"]), merged["inputs"]  # DPO's adapter merged
    [demo] = built_run["demos"]
    assert demo["served"].model == str(quantized) and demo["served"].adapters == {}
    assert "serving quantized model" in built_run["output"]
    tok = AutoTokenizer.from_pretrained(quantized)
    model = AutoModelForCausalLM.from_pretrained(quantized, device_map="cpu").eval()
    for row in demo["rows"]:
        ids = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=built_run["cfg"]["demo"]["max_tokens"], do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        assert row["served"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), row


def test_serve_after_run_serves_what_run_served(built_run, run_result):
    """`loraforge serve` and `deploy` take what they serve from stages.served over the run folder: for the run
    above that is the quantized model `run` served; for the first config (no merge) the SFT adapter on the base."""
    from cluster import stages
    from cluster.config import load_config

    [demo] = built_run["demos"]
    assert stages.served(stages.built_so_far(load_config(built_run["config"], []))) == demo["served"]
    plain = stages.served(stages.built_so_far(load_config(run_result["root"].parents[1] / "tiny.yaml", [])))
    assert plain.adapters == {"tiny": str((run_result["root"] / "sft").resolve())}
    assert plain == run_result["demos"][0]["served"]
