"""Task scores, computed with scikit-learn, scipy and seqeval.

``evaluate.load`` fetches metric scripts from the Hub and fails offline, so the standard GLUE and
CoNLL definitions are computed directly with the libraries those scripts wrap.
"""

from __future__ import annotations

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
