"""Corpus BLEU / chrF / chrF++ / TER on the WMT17 en-de systems equal the scores recorded with sacrebleu 2.6.0.

    .venv/bin/pytest tests/integration/test_metrics_wmt17.py -q     # about 60 s: sacrebleu on 16 x 3,004 segments

No Ray here; it is in integration only because it is slow (TER alone is ~13 s per system on this CPU).
Needs ../shared/data/metrics/sacrebleu/ (the `wmt17` fixture: skips without it, fails under CI=true): the WMT data
is for research use and is never copied into the repository.
"""

from __future__ import annotations

import pytest

from pipelines.eval import metrics

pytestmark = pytest.mark.integration


def test_corpus_bleu_equals_recorded_scores_on_all_16_systems(wmt17):
    systems, ref = wmt17
    assert len(systems["systems"]) == 16 and ref["sacrebleu_version"] == "2.6.0"
    for name, hyps in systems["systems"].items():
        assert metrics.corpus_bleu(hyps, systems["reference"]) == pytest.approx(
            ref["systems"][name]["bleu_13a"], abs=1e-9), name


@pytest.mark.parametrize("name", ["newstest2017.C-3MA.4959.en-de"])  # brevity penalty < 1 on this one
def test_chrf_chrfpp_ter_tok_none_equal_recorded_scores(wmt17, name):
    systems, ref = wmt17
    hyps, want, refs = systems["systems"][name], ref["systems"][name], systems["reference"]
    assert want["bleu_13a_bp"] < 1
    assert metrics.corpus_bleu(hyps, refs, tokenize="none") == pytest.approx(want["bleu_tok_none"], abs=1e-9)
    assert metrics.corpus_chrf(hyps, refs) == pytest.approx(want["chrf2"], abs=1e-9)
    assert metrics.corpus_chrf(hyps, refs, word_order=2) == pytest.approx(want["chrf2pp"], abs=1e-9)
    assert metrics.corpus_ter(hyps, refs) == pytest.approx(want["ter"], abs=1e-9)
