"""Metric code against trusted references in ../shared/data/metrics/ (ROUGE-1.5.5 runs, sacrebleu WMT17 scores)."""

from __future__ import annotations

import json

import pytest

from pipelines.eval import metrics


@pytest.fixture(scope="module")
def rouge_expected(shared_data):
    folder = shared_data / "metrics" / "rouge"
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
    # One system here (about 4 s: sacrebleu is slow on 3,004 segments); all 16, TER and chrF++ run in
    # tests/integration/test_metrics_wmt17.py.
    systems, ref = wmt17
    name = "newstest2017.uedin-nmt.4722.en-de"
    hyps, want = systems["systems"][name], ref["systems"][name]
    assert metrics.corpus_bleu(hyps, systems["reference"]) == pytest.approx(want["bleu_13a"], abs=1e-9)
    assert metrics.corpus_bleu(hyps, systems["reference"]) == pytest.approx(28.3012, abs=1e-4)
    assert metrics.corpus_chrf(hyps, systems["reference"]) == pytest.approx(want["chrf2"], abs=1e-9)


def test_sentence_level_bleu_equals_recorded_first_50(wmt17):
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
    assert figures["rouge1"] == pytest.approx(metrics.rouge([r["pred"] for r in rows], [r["ref"] for r in rows])["rouge1"])
    bad = CliRunner().invoke(app, ["score", str(f), "--prediction-field", "nope", "--json"])
    assert bad.exit_code == 2 and "nope" in bad.output
