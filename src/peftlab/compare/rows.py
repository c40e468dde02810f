"""A row of ``results.json``: what it holds, how the runs of several seeds become one row, and how rows are
told to a person on the console while a comparison runs.

Every row has every key of :data:`METRIC_KEYS` (a run's ``metrics.json``) and :data:`COMPARE_KEYS` (what
compare adds), ``None`` where unknown, whatever the row's status: ``ok``, ``failed`` or ``unsupported``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

# Keys of a run's metrics.json (peftlab.training.train), present (None where unknown) in every row.
METRIC_KEYS = (
    "method", "task", "model", "kind", "category", "metric_name", "metric", "higher_is_better", "metrics",
    "trainable_params", "total_params", "trainable_fraction", "train_examples", "eval_examples", "epochs",
    "steps", "effective_batch_size", "learning_rate", "precision", "device", "train_seconds", "eval_seconds",
    "train_samples_per_second", "train_tokens_per_second", "peak_memory_mb", "final_train_loss", "history",
    "method_options", "resumed", "seed", "peftlab_version",
)
# What compare adds to every row. ``trains_all_weights`` is the method's declared fact (full fine-tuning):
# such a row is the baseline of ``metric_delta_vs_full``.
COMPARE_KEYS = (
    "status", "error", "reason", "mergeable", "trains_all_weights", "inference_cost", "adapter_bytes",
    "latency_ms_bs1", "latency_ms_bs32", "latency_ms_bs1_merged", "latency_ms_bs32_merged", "latency_runs",
    "latency_precision", "samples", "metric_delta_vs_full", "pareto", "isolated", "wall_seconds", "cpu_seconds", "threads",
    "run_dir", "log",
    "train_config", "repeats", "seeds", "runs",
    # intervals over seeds, the task score (GLUE convention), the check against the trivial baseline,
    # where the learning rate came from (default, given, tuned) and which rows' intervals overlap
    "metric_ci_low", "metric_ci_high", "score", "score_std", "score_ci_low", "score_ci_high",
    "no_better_than_baseline", "baseline_test", "baseline_metric", "lr_source", "overlaps", "attempts",
    # compare --generate: {"metrics": {"rougeL": ...}, "examples", "max_new_tokens", "seconds"} (mean over seeds)
    "generation",
)
# Numbers averaged over seeds with --repeats (and reported with a standard deviation).
AVERAGED = ("metric", "train_seconds", "train_samples_per_second", "train_tokens_per_second", "peak_memory_mb",
            "eval_seconds", "wall_seconds", "cpu_seconds", "latency_ms_bs1", "latency_ms_bs32", "latency_ms_bs1_merged",
            "latency_ms_bs32_merged", "final_train_loss")
WITH_STD = ("metric", "train_seconds", "train_tokens_per_second", "peak_memory_mb", "latency_ms_bs1",
            "latency_ms_bs32")


def method_facts(name: str) -> dict[str, Any]:
    """What a row says about its method, from the facts the method declares (``peftlab.methods.base``)."""
    from peftlab.methods import get_method

    method = get_method(name)
    return {"method": name, "category": method.category, "mergeable": bool(method.mergeable),
            "trains_all_weights": bool(method.trains_all_weights), "inference_cost": method.inference_cost()}


def empty_row(name: str) -> dict[str, Any]:
    """A row with every key, ``None`` except what the method itself declares."""
    row: dict[str, Any] = {key: None for key in (*METRIC_KEYS, *COMPARE_KEYS)}
    row.update(method_facts(name))
    return row


def aggregate(name: str, runs: list[dict[str, Any]], reason: str | None,
              score_metrics: tuple[str, ...] | None = None) -> dict[str, Any]:
    """One row per method (and task): the run itself, or with --repeats the mean, standard deviation and 95%
    t-interval over its seeds. ``score_metrics``: the metrics whose mean is the task's score (GLUE convention;
    default the row's own metric)."""
    from peftlab.compare.stats import seed_interval
    from peftlab.compare.suite import task_score

    if reason:
        row = empty_row(name)
        row.update(status="unsupported", reason=reason, repeats=0, seeds=[])
        return row
    ok = [r for r in runs if r.get("status") == "ok"]
    failed = [r for r in runs if r.get("status") != "ok"]
    row = empty_row(name)
    row.update({k: v for k, v in (ok[0] if ok else failed[0]).items()})
    row["repeats"] = len(runs)
    row["seeds"] = [r.get("seed") for r in runs]
    if len(runs) > 1:
        for key in AVERAGED:
            values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
            row[key] = statistics.fmean(values) if values else None
            if key in WITH_STD:
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        metric_keys = {k for r in ok for k in (r.get("metrics") or {})}
        row["metrics"] = {k: statistics.fmean([r["metrics"][k] for r in ok if k in (r.get("metrics") or {})])
                          for k in sorted(metric_keys)}
        generations = [r["generation"] for r in ok if isinstance(r.get("generation"), dict)]
        if generations:
            names = {k for g in generations for k in (g.get("metrics") or {})}
            row["generation"] = {**generations[0], "seeds": len(generations), "metrics": {
                k: statistics.fmean([g["metrics"][k] for g in generations if k in (g.get("metrics") or {})])
                for k in sorted(names)}}
        row["run_dir"] = None
        row["log"] = None
        row["runs"] = [{"seed": r.get("seed"), "status": r.get("status"), "metric": r.get("metric"),
                        "train_seconds": r.get("train_seconds"), "peak_memory_mb": r.get("peak_memory_mb"),
                        "error": r.get("error"), "run_dir": r.get("run_dir"), "log": r.get("log")} for r in runs]
    else:
        for key in WITH_STD:
            row[f"{key}_std"] = None
    names = tuple(score_metrics or ((row.get("metric_name"),) if row.get("metric_name") else ()))
    metric = seed_interval([r.get("metric") for r in ok])
    score = seed_interval([task_score(r.get("metrics"), names) for r in ok])
    row.update(metric_ci_low=metric and metric["low"], metric_ci_high=metric and metric["high"],
               score=score and score["mean"], score_std=score and score["sd"], score_ci_low=score and score["low"],
               score_ci_high=score and score["high"])
    if failed:
        row["status"] = "failed"
        row["error"] = "; ".join((f"seed {r.get('seed')}: " if len(runs) > 1 else "") + str(r.get("error"))
                                 for r in failed)
    return row


def compare_rows(rows: list[dict[str, Any]], *, higher_is_better: bool,
                 trivial: dict[str, Any] | None = None) -> None:
    """Fill in what each row is relative to the others: the metric minus full fine-tuning's (the method that
    trains all weights, when it finished); whether it is above the task's trivial baseline (``trivial``, from
    :func:`peftlab.compare.baseline.trivial_baseline`) with confidence; which rows' 95% intervals overlap it;
    and whether it is on the Pareto front (a row no better than the baseline never is)."""
    from peftlab.compare.stats import intervals_overlap, no_better_than_baseline
    from peftlab.report import baseline, pareto_flags

    reference = baseline(rows)
    for row in rows:
        ok = row["status"] == "ok" and isinstance(row.get("metric"), (int, float))
        row["metric_delta_vs_full"] = row["metric"] - reference["metric"] if ok and reference else None
        row["baseline_metric"] = trivial["metric"] if trivial else None
        if ok and trivial:
            seeds = [r.get("metric") for r in row.get("runs") or [] if r.get("status") == "ok"]
            verdict = no_better_than_baseline(
                row.get("metric_name") or trivial["metric_name"], row["metric"], trivial["metric"],
                row.get("eval_examples"), higher_is_better=higher_is_better, seed_values=seeds,
                metrics=row.get("metrics"), baseline_metrics=trivial.get("metrics"))
            row["no_better_than_baseline"] = verdict.no_better
            row["baseline_test"] = verdict.as_dict()
        else:
            row["no_better_than_baseline"] = None
            row["baseline_test"] = None
    for row in rows:
        row["overlaps"] = [other["method"] for other in rows if other is not row and row["status"] == "ok"
                           and other["status"] == "ok" and intervals_overlap(row, other)]
    candidates = [row if not row.get("no_better_than_baseline") else {**row, "status": "no-better"} for row in rows]
    for row, flag in zip(rows, pareto_flags(candidates, higher_is_better=higher_is_better)):
        row["pareto"] = flag


__all__ = ["METRIC_KEYS", "COMPARE_KEYS", "AVERAGED", "WITH_STD", "method_facts", "empty_row", "aggregate",
           "compare_rows"]
