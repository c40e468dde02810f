"""Task scores, computed with scikit-learn, scipy, seqeval, rouge_score and sacrebleu.

``evaluate.load`` fetches metric scripts from the Hub and fails offline, so the standard GLUE and
CoNLL definitions are computed directly with the libraries those scripts wrap.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def classification(
    predictions, references, *, f1: bool = False, mcc: bool = False, average: str | None = None
) -> dict[str, float]:
    """Accuracy, plus F1 and Matthews correlation on request.

    ``average`` picks the F1 flavour: ``"binary"`` (F1 of label 1, GLUE's MRPC/QQP definition) or
    ``"macro"`` (unweighted mean over classes). None guesses from the references: binary when they
    are all 0/1, else macro. Pass it explicitly for tasks with more than two labels: a dev set in
    which only labels 0 and 1 occur would otherwise be scored as binary.
    """
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions = np.asarray(predictions)
    references = np.asarray(references)
    if predictions.shape != references.shape:
        raise ValueError(f"{predictions.shape[0] if predictions.ndim else 0} predictions for "
                         f"{references.shape[0] if references.ndim else 0} references")
    scores = {"accuracy": float(accuracy_score(references, predictions))}
    if f1:
        if average is None:
            labels = np.unique(references)
            average = "binary" if len(labels) <= 2 and set(labels.tolist()) <= {0, 1} else "macro"
        scores["f1"] = float(f1_score(references, predictions, average=average, zero_division=0))
    if mcc:
        scores["mcc"] = float(matthews_corrcoef(references, predictions))
    return scores


def regression(predictions, references) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    predictions = np.asarray(predictions, dtype=float).reshape(-1)
    references = np.asarray(references, dtype=float).reshape(-1)
    if np.std(predictions) == 0 or np.std(references) == 0:
        return {"pearson": 0.0, "spearman": 0.0, "mse": float(np.mean((predictions - references) ** 2))}
    return {
        "pearson": float(pearsonr(predictions, references)[0]),
        "spearman": float(spearmanr(predictions, references)[0]),
        "mse": float(np.mean((predictions - references) ** 2)),
    }


def entities(predicted_tags: list[list[str]], reference_tags: list[list[str]]) -> dict[str, float]:
    """seqeval entity-level precision/recall/F1 (CoNLL's definition) plus token accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {
        "f1": float(f1_score(reference_tags, predicted_tags, zero_division=0)),
        "precision": float(precision_score(reference_tags, predicted_tags, zero_division=0)),
        "recall": float(recall_score(reference_tags, predicted_tags, zero_division=0)),
        "token_accuracy": float(accuracy_score(reference_tags, predicted_tags)),
    }


def language_modeling(mean_loss: float) -> dict[str, float]:
    """Mean token cross-entropy (nats) and its exponential; perplexity is capped at e^50."""
    return {"loss": float(mean_loss), "perplexity": float(math.exp(min(mean_loss, 50.0)))}


def rouge_l(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-L precision, recall and F1 of one generated text against one reference (Google's ``rouge_score``,
    the scorer behind ``evaluate``'s "rouge"; Porter stemming on, as Hugging Face's summarisation examples)."""
    score = _rouge_l_scorer().score(reference, prediction)["rougeL"]
    return {"precision": score.precision, "recall": score.recall, "f1": score.fmeasure}


@functools.cache
def _rouge_l_scorer():
    """One scorer for the process (building it sets up the tokenizer and stemmer)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts are equal after stripping and collapsing whitespace (case and punctuation count)."""
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def generation(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Generated texts against references: mean ROUGE-L F1 (``rougeL``), exact match, and corpus chrF
    (sacrebleu's ``CHRF()``, character 6-grams, beta 2; as a fraction in [0, 1] like the other scores)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"rougeL": 0.0, "exact_match": 0.0, "chrf": 0.0}
    from sacrebleu.metrics import CHRF

    n = len(predictions)
    return {"rougeL": sum(rouge_l(p, r)["f1"] for p, r in zip(predictions, references)) / n,
            "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
            "chrf": CHRF().corpus_score(list(predictions), [list(references)]).score / 100.0}
