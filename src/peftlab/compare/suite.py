"""Several tasks in one comparison: which tasks (``--tasks a,b`` or ``--suite glue``), each task's score, and
the suite average per method.

A task's **score** is its official metric; a GLUE task with two official metrics scores their mean, as the
GLUE leaderboard does (Wang et al., 2019): MRPC and QQP the mean of F1 and accuracy, STS-B the mean of
Pearson and Spearman correlation. CoLA scores Matthews correlation, the others accuracy. The **suite
average** of a method is the mean of its task scores; with several seeds it is computed per seed (seed k
on every task) and reported with its 95% interval over seeds. Tasks of other kinds (``--tasks
sst2,conll2003,squad``) enter with their main metric (entity F1, SQuAD F1); a lower-is-better metric
(perplexity) cannot be averaged with scores and is left out of the average, which the report states.
"""

from __future__ import annotations

from typing import Any

from peftlab.compare.stats import finite, no_better_than_baseline, seed_interval
from peftlab.errors import PeftlabError

# GLUE as BERT and most PEFT papers report it: the eight tasks without WNLI (whose dev set is adversarial:
# the majority class beats nearly every model, so it says nothing about a method).
SUITES: dict[str, tuple[str, ...]] = {"glue": ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")}
# GLUE's two-metric tasks and the metrics whose mean is their score (the leaderboard's convention).
TWO_METRIC_TASKS: dict[str, tuple[str, ...]] = {"mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy"),
                                                "stsb": ("pearson", "spearman")}


def parse_tasks(tasks: str | list[str] | None, suite: str | None, default: str | None) -> list[str]:
    """``--tasks``/``--suite``/``--task`` -> validated, de-duplicated task names (unknown ones list the valid)."""
    from peftlab.tasks import get_task, task_names

    if suite is not None:
        if suite not in SUITES:
            raise PeftlabError(f"Unknown suite '{suite}'. Valid suites: {', '.join(SUITES)}.")
        if tasks:
            raise PeftlabError("Give either --suite or --tasks, not both (a suite is a fixed list of tasks).")
        names = list(SUITES[suite])
    elif tasks:
        names = [part.strip() for part in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
        names = [name for name in names if name]
        if not names:
            raise PeftlabError("--tasks is empty: give a comma list such as sst2,mrpc (or --suite glue).")
    else:
        names = [default or "sst2"]
    unknown = [name for name in names if name not in task_names()]
    if unknown:
        get_task(unknown[0])  # raises, naming the valid tasks
    return list(dict.fromkeys(names))


def score_metrics(task) -> tuple[str, ...]:
    """The metrics whose mean is the task's score (its own ``score_metrics`` if it declares them)."""
    declared = getattr(task, "score_metrics", None)
    if declared:
        return tuple(declared)
    return TWO_METRIC_TASKS.get(task.name, (task.metric_name,))


def task_score(metrics: dict[str, Any] | None, names) -> float | None:
    """The mean of ``metrics[name]`` over ``names``; None if one is missing."""
    values = [(metrics or {}).get(name) for name in names]
    return sum(values) / len(values) if values and all(finite(v) for v in values) else None


def averaged_tasks(task_info: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """The tasks that enter the suite average, and why the others do not."""
    used, left_out = [], {}
    for name, info in task_info.items():
        if info.get("missing"):
            left_out[name] = "its data could not be loaded"
        elif not info.get("higher_is_better", True):
            left_out[name] = f"its metric ({info.get('metric_name')}) is lower-is-better and cannot be averaged " \
                             "with scores"
        else:
            used.append(name)
    return used, left_out


def suite_rows(runs: list[dict[str, Any]], rows: list[dict[str, Any]], task_info: dict[str, dict[str, Any]],
               baselines: dict[str, dict[str, Any] | None], methods: list[str], seeds: list[int]) -> dict[str, Any]:
    """The suite table: each method's average over the averaged tasks (per seed, then over seeds), and the
    baseline's average. ``runs``: one object per method x task x seed; ``rows``: one per method x task."""
    used, left_out = averaged_tasks(task_info)
    by_cell = {(r.get("method"), r.get("task"), r.get("seed")): r for r in runs}
    by_row = {(r.get("method"), r.get("task")): r for r in rows}
    baseline_scores = {t: task_score((baselines.get(t) or {}).get("metrics"), task_info[t]["score_metrics"])
                       for t in used}
    baseline_average = (sum(baseline_scores.values()) / len(used)
                        if used and all(finite(v) for v in baseline_scores.values()) else None)
    table = []
    for method in methods:
        per_seed, missing = [], []
        for task in used:
            row = by_row.get((method, task))
            if not row or row.get("status") != "ok":
                missing.append(task)
        if not missing and used:
            for seed in seeds:
                scores = [task_score((by_cell.get((method, task, seed)) or {}).get("metrics"),
                                     task_info[task]["score_metrics"]) for task in used]
                if all(finite(s) for s in scores):
                    per_seed.append(sum(scores) / len(scores))
        interval = seed_interval(per_seed) if per_seed else None
        task_rows = [by_row[(method, task)] for task in used if (method, task) in by_row]
        fractions = [r["trainable_fraction"] for r in task_rows if finite(r.get("trainable_fraction"))]
        entry = {
            "method": method,
            "category": next((r.get("category") for r in task_rows if r.get("category")), None),
            "status": "ok" if interval else ("incomplete" if used else "none"),
            "missing_tasks": missing,
            "average": interval["mean"] if interval else None,
            "average_sd": interval["sd"] if interval else None,
            "average_ci_low": interval["low"] if interval else None,
            "average_ci_high": interval["high"] if interval else None,
            "seeds_averaged": len(per_seed),
            "per_task": {task: (by_row.get((method, task)) or {}).get("score") for task in used},
            "trainable_fraction": sum(fractions) / len(fractions) if fractions else None,
            "trainable_params": max((r.get("trainable_params") or 0 for r in task_rows), default=None),
            "tuned": any(r.get("lr_source") == "tuned" for r in task_rows),
        }
        flagged = [task for task in used if (by_row.get((method, task)) or {}).get("no_better_than_baseline")]
        if interval:
            verdict = no_better_than_baseline("average", interval["mean"], baseline_average,
                                              seed_values=per_seed)
            if used and len(flagged) == len(used) and not verdict.no_better:
                # the seeds' spread alone misses the dev sets' sampling noise: a method that is above the baseline
                # on no task is not above it on their average
                verdict.no_better, verdict.test = True, "every task"
                verdict.detail = "no better than the baseline on any task"
            entry["no_better_than_baseline"] = verdict.no_better
            entry["baseline_test"] = verdict.as_dict()
        else:
            entry["no_better_than_baseline"] = None
            entry["baseline_test"] = None
        entry["no_better_tasks"] = flagged
        table.append(entry)
    from peftlab.report import pareto_flags

    points = [{"status": "ok" if e["status"] == "ok" and not e["no_better_than_baseline"] else "excluded",
               "trainable_fraction": e["trainable_fraction"], "metric": e["average"]} for e in table]
    for entry, flag in zip(table, pareto_flags(points, higher_is_better=True)):
        entry["pareto"] = flag
    return {
        "tasks": used, "left_out": left_out,
        "rule": "mean over tasks of each task's score: its official metric, or for GLUE's two-metric tasks the "
                "mean of both (MRPC, QQP: F1 and accuracy; STS-B: Pearson and Spearman); computed per seed, "
                "then mean, standard deviation and 95% t-interval over seeds",
        "score_metrics": {task: list(task_info[task]["score_metrics"]) for task in used},
        "baseline_average": baseline_average,
        "baseline_scores": baseline_scores,
        "rows": table,
    }


__all__ = ["SUITES", "TWO_METRIC_TASKS", "parse_tasks", "score_metrics", "task_score", "averaged_tasks",
           "suite_rows"]
