"""Scoring a model on a tokenized split with the task's own metric.

Extractive QA (kind ``qa``) scores *examples*, not features: :func:`qa_answers` runs the model over every
window of every context and :func:`postprocess_qa` picks each question's best span across its windows,
as ``postprocess_qa_predictions`` in Hugging Face's question-answering example (``utils_qa.py``) does for
SQuAD v1.1; the task then scores the answer strings against the gold answers.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from peftlab.kinds import TaskKind
from peftlab.preprocess import IGNORE_INDEX, collator

N_BEST = 20  # candidate start and end positions per window (run_qa.py's n_best_size)
MAX_ANSWER_LENGTH = 30  # longest answer in tokens (run_qa.py's max_answer_length)


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
    """The task's dev metrics. Classification: accuracy/F1/MCC/Pearson; NER: seqeval; LM: loss, perplexity;
    QA: SQuAD exact match and F1 over questions (``dev_raw`` holds their contexts and gold answers)."""
    from peftlab.hardware import autocast

    kind = task.kind
    if kind == TaskKind.QA:
        if dev_raw is None:
            raise ValueError("scoring a qa task needs the raw dev examples (dev_raw) to read answers from")
        answers = qa_answers(model, tokenizer, dev_data, dev_raw["context"], batch_size=batch_size,
                             precision=precision)
        return task.compute_metrics([a["answer"] for a in answers], [r["text"] for r in dev_raw["answers"]])
    was_training = model.training
    model.eval()
    device = model_device(model)
    predictions: dict[int, Any] = {}
    references: dict[int, Any] = {}
    loss_sum, token_count = 0.0, 0
    try:
        for indices, batch in batches(dev_data, kind, tokenizer, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(precision):
                outputs = model(**batch)
            if TaskKind(kind).is_generative:
                labels = batch["labels"]
                count = int((labels[:, 1:] != IGNORE_INDEX).sum()) if kind == TaskKind.CAUSAL_LM else int((labels != IGNORE_INDEX).sum())
                loss_sum += float(outputs.loss) * count
                token_count += count
                continue
            logits = outputs.logits.float().cpu()
            labels = batch["labels"].cpu()
            for row, index in enumerate(indices):
                if kind == TaskKind.SEQ_CLS:
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
    if TaskKind(kind).is_generative:
        from peftlab import metrics

        return metrics.language_modeling(loss_sum / max(token_count, 1))
    order = sorted(predictions)
    return task.compute_metrics([predictions[i] for i in order], [references[i] for i in order])


# ---- extractive question answering -----------------------------------------------------------------

@torch.no_grad()
def qa_answers(model, tokenizer, features, contexts: list[str], *, batch_size: int = 64, precision: str = "fp32",
               n_best: int = N_BEST, max_answer_length: int = MAX_ANSWER_LENGTH) -> list[dict[str, Any]]:
    """The best answer span of every example, from its features (``preprocess.tokenize(..., "qa", ...)``).

    ``contexts[i]`` is the context of example i (the rows ``example_index`` points at). Returns one
    ``{"answer", "score", "start", "end"}`` per example (see :func:`postprocess_qa`).
    """
    from peftlab.hardware import autocast

    was_training = model.training
    model.eval()
    device = model_device(model)
    start_logits: dict[int, np.ndarray] = {}
    end_logits: dict[int, np.ndarray] = {}
    lengths = features["length"][:]  # [:] reads a datasets column into a list once
    try:
        for indices, batch in batches(features, TaskKind.QA, tokenizer, batch_size):
            inputs = {k: v.to(device) for k, v in batch.items() if k not in ("start_positions", "end_positions")}
            with autocast(precision):
                outputs = model(**inputs)
            starts, ends = outputs.start_logits.float().cpu().numpy(), outputs.end_logits.float().cpu().numpy()
            for row, index in enumerate(indices):
                start_logits[index] = starts[row, :lengths[index]]
                end_logits[index] = ends[row, :lengths[index]]
    finally:
        if was_training:
            model.train()
    order = range(len(features))
    return postprocess_qa(contexts, features["example_index"][:], features["offset_mapping"][:],
                          [start_logits[i] for i in order], [end_logits[i] for i in order],
                          n_best=n_best, max_answer_length=max_answer_length)


def postprocess_qa(contexts: list[str], example_index: list[int], offset_mapping: list[list], start_logits: list,
                   end_logits: list, *, n_best: int = N_BEST,
                   max_answer_length: int = MAX_ANSWER_LENGTH) -> list[dict[str, Any]]:
    """Span logits of every feature -> the best answer text of every example (SQuAD v1.1: always an answer).

    As ``postprocess_qa_predictions`` in Hugging Face's ``utils_qa.py`` (version_2_with_negative=False): in
    every window of an example, the ``n_best`` highest start and end logits are paired; a pair counts when
    both tokens are context tokens, the end is not before the start and the span has at most
    ``max_answer_length`` tokens; its score is start logit + end logit, and the best pair over all windows
    wins. ``score`` is the softmax of the winner over the example's ``n_best`` best candidates (the
    example's ``probability``); an example without any valid pair gets the empty answer with score 0.
    """
    windows: dict[int, list[int]] = defaultdict(list)
    for feature, example in enumerate(example_index):
        windows[int(example)].append(feature)
    results = []
    for example, context in enumerate(contexts):
        candidates = []  # (score, start char, end char)
        for feature in windows.get(example, ()):
            offsets = offset_mapping[feature]
            starts, ends = np.asarray(start_logits[feature]), np.asarray(end_logits[feature])
            best_starts = np.argsort(starts)[-1:-n_best - 1:-1].tolist()
            best_ends = np.argsort(ends)[-1:-n_best - 1:-1].tolist()
            for start in best_starts:
                for end in best_ends:
                    if (start >= len(offsets) or end >= len(offsets) or offsets[start] is None
                            or offsets[end] is None or len(offsets[start]) < 2 or len(offsets[end]) < 2):
                        continue  # outside the window, or not a context token (question, CLS, SEP)
                    if end < start or end - start + 1 > max_answer_length:
                        continue
                    candidates.append((float(starts[start] + ends[end]), int(offsets[start][0]), int(offsets[end][1])))
        if not candidates:
            results.append({"answer": "", "score": 0.0, "start": 0, "end": 0})
            continue
        candidates.sort(key=lambda c: c[0], reverse=True)
        top = np.asarray([c[0] for c in candidates[:n_best]])
        probabilities = np.exp(top - top.max())
        probabilities /= probabilities.sum()
        score, start_char, end_char = candidates[0]
        results.append({"answer": context[start_char:end_char], "score": float(probabilities[0]),
                        "start": start_char, "end": end_char})
    return results
