"""Scoring a model on a tokenized split with the task's own metric."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from peftlab.preprocess import IGNORE_INDEX, collator


def model_device(model) -> torch.device:
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def batches(dataset, kind: str, tokenizer, batch_size: int):
    """Dev batches in length order (less padding), with the original row indices."""
    lengths = np.asarray(dataset["length"])
    order = np.argsort(-lengths, kind="stable")
    collate = collator(kind, tokenizer)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size].tolist()
        yield indices, collate([dataset[i] for i in indices])


@torch.no_grad()
def evaluate_model(model, task, tokenizer, dev_data, dev_raw=None, *, label_names=None, batch_size: int = 64,
                   precision: str = "fp32") -> dict[str, Any]:
    """The task's dev metrics. Classification: accuracy/F1/MCC/Pearson; NER: seqeval; LM: loss, perplexity."""
    from peftlab.hardware import autocast

    was_training = model.training
    model.eval()
    device = model_device(model)
    kind = task.kind
    predictions: dict[int, Any] = {}
    references: dict[int, Any] = {}
    loss_sum, token_count = 0.0, 0
    try:
        for indices, batch in batches(dev_data, kind, tokenizer, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(precision):
                outputs = model(**batch)
            if kind in ("causal-lm", "seq2seq"):
                labels = batch["labels"]
                count = int((labels[:, 1:] != IGNORE_INDEX).sum()) if kind == "causal-lm" else int((labels != IGNORE_INDEX).sum())
                loss_sum += float(outputs.loss) * count
                token_count += count
                continue
            logits = outputs.logits.float().cpu()
            labels = batch["labels"].cpu()
            for row, index in enumerate(indices):
                if kind == "seq-cls":
                    if task.is_regression:
                        predictions[index] = float(logits[row].reshape(-1)[0])
                        references[index] = float(labels[row])
                    else:
                        predictions[index] = int(logits[row].argmax())
                        references[index] = int(labels[row])
                else:  # token-cls: score first sub-words only
                    keep = labels[row] != IGNORE_INDEX
                    predictions[index] = [label_names[i] for i in logits[row][: len(keep)][keep].argmax(-1).tolist()]
                    references[index] = [label_names[i] for i in labels[row][keep].tolist()]
    finally:
        if was_training:
            model.train()
    if kind in ("causal-lm", "seq2seq"):
        from peftlab import metrics

        return metrics.language_modeling(loss_sum / max(token_count, 1))
    order = sorted(predictions)
    return task.compute_metrics([predictions[i] for i in order], [references[i] for i in order])
