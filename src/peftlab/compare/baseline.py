"""The trivial baseline of a task: what a model that learned nothing scores on the same dev set.

* classification: the majority class of the training examples, predicted for every dev example
  (MCC is then 0, F1 is that of always answering the majority label);
* regression: the training mean, predicted for every dev example (its correlations are 0);
* token classification: the most frequent training tag for every token;
* extractive QA: the empty answer;
* language modelling (perplexity): none is computed; the report says so.

Scored with the task's own ``compute_metrics`` on the same dev subset the methods are scored on, so the
baseline row is comparable with every other row of the table.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from peftlab.kinds import TaskKind


def trivial_baseline(task, train_raw, dev_raw, label_names: list[str] | None = None) -> dict[str, Any] | None:
    """``{"metric_name", "metric", "metrics", "description", "eval_examples", "higher_is_better"}``, or None.

    ``train_raw``/``dev_raw``: the normalized rows (``peftlab.tasks.base``) the methods train and are
    scored on; ``label_names``: the label order of the runs (default: the task's, or the training data's).
    """
    kind = TaskKind(task.kind)
    if kind == TaskKind.SEQ_CLS and task.is_regression:
        mean = statistics.fmean(float(v) for v in train_raw["label"])
        predictions = [mean] * len(dev_raw)
        scores = task.compute_metrics(predictions, [float(v) for v in dev_raw["label"]])
        description = f"constant prediction of the training mean ({mean:.3g})"
    elif kind == TaskKind.SEQ_CLS:
        names = list(label_names or task.labels_from(train_raw) or [])
        counts = Counter(str(v) for v in train_raw["label"])
        # the most frequent label; a tie goes to the first in label order
        majority, count = min(counts.items(), key=lambda item: (-item[1], names.index(item[0])
                                                                if item[0] in names else len(names)))
        if majority not in names:
            return None
        known = [str(v) for v in dev_raw["label"] if str(v) in names]
        scores = task.compute_metrics([names.index(majority)] * len(known), [names.index(v) for v in known])
        description = f"majority class '{majority}' ({count / max(len(train_raw), 1):.1%} of the training examples)"
    elif kind == TaskKind.TOKEN_CLS:
        counts = Counter(tag for tags in train_raw["tags"] for tag in tags)
        tag = counts.most_common(1)[0][0]
        references = [list(tags) for tags in dev_raw["tags"]]
        scores = task.compute_metrics([[tag] * len(tags) for tags in references], references)
        description = f"the most frequent tag '{tag}' for every token"
    elif kind == TaskKind.QA:
        scores = task.compute_metrics([""] * len(dev_raw), [list(a["text"]) for a in dev_raw["answers"]])
        description = "the empty answer"
    else:
        return None
    return {"metric_name": task.metric_name, "metric": scores.get(task.metric_name), "metrics": scores,
            "description": description, "eval_examples": len(dev_raw), "higher_is_better": task.higher_is_better}


def task_splits(task, data_dir, max_train_samples: int | None, max_eval_samples: int | None, seed: int):
    """The training and dev rows a run with these options sees (``peftlab.training.prepare``'s selection)."""
    from peftlab.tasks.base import select

    train_raw = select(task.load("train", data_dir), max_train_samples, seed)
    dev_raw = select(task.load("dev", data_dir), max_eval_samples, seed)
    return train_raw, dev_raw


__all__ = ["trivial_baseline", "task_splits"]
