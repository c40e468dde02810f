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


def aggregate(name: str, runs: list[dict[str, Any]], reason: str | None) -> dict[str, Any]:
    """One row per method: the run itself, or with --repeats the mean (and std) over its seeds."""
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
        row["run_dir"] = None
        row["log"] = None
        row["runs"] = [{"seed": r.get("seed"), "status": r.get("status"), "metric": r.get("metric"),
                        "train_seconds": r.get("train_seconds"), "peak_memory_mb": r.get("peak_memory_mb"),
                        "error": r.get("error"), "run_dir": r.get("run_dir"), "log": r.get("log")} for r in runs]
    else:
        for key in WITH_STD:
            row[f"{key}_std"] = None
    if failed:
        row["status"] = "failed"
        row["error"] = "; ".join((f"seed {r.get('seed')}: " if len(runs) > 1 else "") + str(r.get("error"))
                                 for r in failed)
    return row


def compare_rows(rows: list[dict[str, Any]], *, higher_is_better: bool) -> None:
    """Fill in what each row is relative to the others: the metric minus the baseline's (the method that
    trains all weights, when it finished) and whether the row is on the Pareto front."""
    from peftlab.report import baseline, pareto_flags

    reference = baseline(rows)
    for row in rows:
        ok = row["status"] == "ok" and isinstance(row.get("metric"), (int, float))
        row["metric_delta_vs_full"] = row["metric"] - reference["metric"] if ok and reference else None
    for row, flag in zip(rows, pareto_flags(rows, higher_is_better=higher_is_better)):
        row["pareto"] = flag


# ---- console output ---------------------------------------------------------------------------------------

def plan_banner(settings: dict[str, Any], reasons: dict[str, str | None], planned: int) -> str:
    dev = f"{settings['max_eval_samples']:,} dev examples" if settings["max_eval_samples"] else "the whole dev set"
    budget = (f"{settings['max_train_samples'] or 'all'} train examples x {settings['epochs']:g} epochs, {dev}, "
              f"seed{'s' if len(settings['seeds']) > 1 else ''} {', '.join(map(str, settings['seeds']))}, "
              f"precision {settings['precision']}")
    lines = [f"peftlab compare: {len(settings['methods'])} method(s) on {settings['task']} with {settings['model']}",
             f"  budget: {budget}",
             f"  {planned} run(s), {'each in its own process' if settings['isolate'] else 'in this process'}; "
             f"results in {settings['output']}"]
    threads = settings.get("worker_threads") or {}
    if threads.get("threads"):
        lines.append(f"  threads: {threads['threads']} per worker, because {threads['why']}")
    if settings["defaults_applied"]:
        lines.append("  compare defaults used for: " + ", ".join(
            f"{k}={settings['options'][k]}" for k in settings["defaults_applied"]))
    for name, reason in reasons.items():
        if reason:
            lines.append(f"  {name}: unsupported here: {reason}")
    return "\n".join(lines)


def one_line(result: dict[str, Any]) -> str:
    """A finished run in one line (``ok: dev accuracy 0.8123 · train 12.3 s · ...`` or ``FAILED: ...``)."""
    if result.get("status") != "ok":
        return f"FAILED: {result.get('error')}"
    parts = [f"ok: dev {result.get('metric_name')} {result['metric']:.4f}"]
    if result.get("train_seconds") is not None:
        parts.append(f"train {result['train_seconds']:.1f} s")
    if result.get("peak_memory_mb") is not None:
        parts.append(f"peak {result['peak_memory_mb']:,.0f} MB")
    if result.get("latency_ms_bs1") is not None:
        parts.append(f"latency bs1 {result['latency_ms_bs1']:.1f} ms")
    return " · ".join(parts)


def eta(times: list[float], remaining: int) -> str:
    if not times:
        return f"{remaining} run(s) to go"
    left = statistics.fmean(times) * remaining
    return f"{remaining} run(s) to go, about {left / 60:.0f} min left" if left >= 90 else \
        f"{remaining} run(s) to go, about {left:.0f} s left"


def summary(payload: dict[str, Any], files: dict[str, Path]) -> str:
    """The ranking printed at the end, with each method's difference to full fine-tuning."""
    from peftlab.report import format_metric, ranked, trains_all_weights

    settings = payload["settings"]
    lines = [f"\nRanking by dev {settings['metric_name']} "
             f"({'higher' if settings['higher_is_better'] else 'lower'} is better):"]
    for rank, row in enumerate(ranked(payload["results"], settings["higher_is_better"]), start=1):
        if row["status"] == "ok":
            delta = row.get("metric_delta_vs_full")
            lines.append(f"  {rank:>2}. {row['method']:<14} {format_metric(row, settings['metric_name'])}"
                         f"{'' if delta is None or trains_all_weights(row) else f'  ({delta:+.4f} vs full)'}"
                         f"{'  [Pareto]' if row.get('pareto') else ''}")
        else:
            detail = row.get("reason") or row.get("error") or ""
            lines.append(f"   - {row['method']:<14} {row['status']}: {detail[:160]}")
    lines.append(f"Report: {files.get('html')}  (also {files.get('markdown')}, results.json, results.csv)")
    return "\n".join(lines)


__all__ = ["METRIC_KEYS", "COMPARE_KEYS", "AVERAGED", "WITH_STD", "method_facts", "empty_row", "aggregate",
           "compare_rows", "plan_banner", "one_line", "eta", "summary"]
