"""The report's tables: ranking, formatting, the per-task table (trivial baseline first) and the suite table.

Everything reads the ``results.json`` payload (:func:`peftlab.compare.compare`). A suite's payload is shown
per task through :func:`task_view`, which gives each task the shape a one-task payload has.
"""

from __future__ import annotations

import math
from typing import Any

from peftlab.methods.base import CATEGORIES

# One colour per method category, in the order peftlab.methods.base.CATEGORIES lists them (matplotlib's
# Tableau colours: blue, orange, green, red, ...).
CATEGORY_COLOURS = dict(zip(CATEGORIES, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                                         "tab:pink", "tab:olive", "tab:cyan")))
NO_BETTER = "no better than the baseline"


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pareto_flags(rows: list[dict[str, Any]], *, higher_is_better: bool) -> list[bool]:
    """For each row: is it on the Pareto front of (fewer trainable parameters, better metric)?

    A run is on the front when no other run has at most its trainable fraction and at least its metric,
    with one of the two strictly better. Only rows with status ``ok`` take part.
    """
    def better(a, b):
        return a > b if higher_is_better else a < b

    points = [(i, r["trainable_fraction"], r["metric"]) for i, r in enumerate(rows)
              if r.get("status") == "ok" and is_number(r.get("trainable_fraction")) and is_number(r.get("metric"))]
    flags = [False] * len(rows)
    for i, x, y in points:
        dominated = any(j != i and x2 <= x and (better(y2, y) or y2 == y) and (x2 < x or better(y2, y))
                        for j, x2, y2 in points)
        flags[i] = not dominated
    return flags


def trains_all_weights(row: dict[str, Any]) -> bool:
    """Does the row's method train every weight (full fine-tuning: the baseline of "Δ vs full")?

    Rows carry the method's declared fact; rows written before compare recorded it ask the registry."""
    if row.get("trains_all_weights") is not None:
        return bool(row["trains_all_weights"])
    from peftlab.errors import PeftlabError
    from peftlab.methods import get_method_class

    try:
        return bool(get_method_class(str(row.get("method"))).trains_all_weights)
    except PeftlabError:
        return False


def baseline(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished run that trains all weights (full fine-tuning), which "Δ vs full" is measured against.
    (The task's *trivial* baseline, majority class or mean, is ``payload["baselines"][task]``.)"""
    return next((r for r in rows if r.get("status") == "ok" and is_number(r.get("metric")) and trains_all_weights(r)),
                None)


def ranked(rows: list[dict[str, Any]], higher_is_better: bool) -> list[dict[str, Any]]:
    """Finished runs best first, then failed, then unsupported (each group in run order)."""
    ok = [r for r in rows if r.get("status") == "ok" and is_number(r.get("metric"))]
    ok.sort(key=lambda r: -r["metric"] if higher_is_better else r["metric"])
    rest = [r for r in rows if r not in ok]
    rest.sort(key=lambda r: {"failed": 0, "unsupported": 1}.get(r.get("status"), 2))
    return ok + rest


def format_metric(row: dict[str, Any], metric_name: str | None = None) -> str:
    value = row.get("metric")
    if not is_number(value):
        return "-"
    digits = 2 if (metric_name or row.get("metric_name")) in ("perplexity", "loss") and abs(value) >= 10 else 4
    text = f"{value:.{digits}f}"
    if is_number(row.get("metric_std")):
        text += f" ± {row['metric_std']:.{digits}f}"
    return text


def format_interval(low, high, digits: int = 4) -> str:
    return f"[{low:.{digits}f}, {high:.{digits}f}]" if is_number(low) and is_number(high) else "-"


def format_delta(row: dict[str, Any]) -> str:
    if trains_all_weights(row) or not is_number(row.get("metric_delta_vs_full")):
        return "-"
    return f"{row['metric_delta_vs_full']:+.4f}"


def format_versus_baseline(row: dict[str, Any]) -> str:
    """The check against the trivial baseline, in a few words."""
    verdict = row.get("no_better_than_baseline")
    test = row.get("baseline_test") or {}
    if row.get("status") != "ok" or test.get("test") in (None, "none"):
        return "-" if row.get("status") != "ok" or not is_number(row.get("baseline_metric")) else "untested (1 seed)"
    if verdict:
        return f"⚠ {NO_BETTER}"
    p_value = test.get("p_value")
    return "above" + (f" (p = {p_value:.2g})" if is_number(p_value) else " (95% interval)")


def format_lr(row: dict[str, Any]) -> str:
    rate = row.get("learning_rate")
    if not is_number(rate):
        return "-"
    return f"{rate:.2g} ({row.get('lr_source') or 'default'})"


def format_percent(fraction) -> str:
    from peftlab.catalog import format_percent as percent

    return percent(fraction) if is_number(fraction) else "-"


def format_bytes(size) -> str:
    if not is_number(size):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"  # pragma: no cover


def fmt(value, pattern: str = "{:,.1f}", std=None) -> str:
    if not is_number(value):
        return "-"
    text = pattern.format(value)
    if is_number(std):
        text += " ± " + pattern.format(std)
    return text


def pair(unmerged, merged) -> str:
    left = fmt(unmerged, "{:.1f}")
    return left if not is_number(merged) else f"{left} / {fmt(merged, '{:.1f}')}"


# How the generation scores of ``compare --generate`` are headed (any other key shows as it is named).
GENERATION_LABELS = {"rougeL": "ROUGE-L", "exact_match": "exact match", "chrf": "chrF",
                     "rougeL_precision": "ROUGE-L precision", "rougeL_recall": "ROUGE-L recall"}


def generation_columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The generation metrics any finished row has (in first-seen order) and their column headings."""
    keys: list[str] = []
    counts = set()
    for row in rows:
        generation = row.get("generation") if row.get("status") == "ok" else None
        if isinstance(generation, dict):
            counts.add(generation.get("examples"))
            keys += [k for k in (generation.get("metrics") or {}) if k not in keys]
    over = f", {counts.pop()} generated" if len(counts) == 1 else ""
    return keys, [f"{GENERATION_LABELS.get(k, k)} ↑{over}" for k in keys]


def generation_cells(row: dict[str, Any], keys: list[str]) -> list[str]:
    scores = (row.get("generation") or {}).get("metrics") or {} if row.get("status") == "ok" else {}
    return [fmt(scores.get(k), "{:.4f}") for k in keys]


def task_view(payload: dict[str, Any], task: str) -> dict[str, Any]:
    """One task of a (suite) payload in the shape of a one-task payload: its settings, rows and baseline."""
    settings = dict(payload["settings"])
    info = (settings.get("task_info") or {}).get(task) or {}
    settings.update(task=task, metric_name=info.get("metric_name", settings.get("metric_name")),
                    higher_is_better=info.get("higher_is_better", settings.get("higher_is_better", True)))
    for key in ("max_train_samples", "max_eval_samples", "epochs"):
        if key in info:
            settings[key] = info[key]
    rows = [r for r in payload["results"] if r.get("task") in (task, None)]
    return {**payload, "settings": settings, "results": rows, "baseline": (payload.get("baselines") or {}).get(task)}


def table_rows(payload: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """The per-task table (header, cells, each row's kind: "baseline", or the row's status) shared by report.md
    and report.html. The trivial baseline is the first row; "#" marks with ≈ a rank whose 95% interval overlaps
    the one above it."""
    settings = payload["settings"]
    metric_name = settings["metric_name"]
    better = "↑" if settings["higher_is_better"] else "↓"
    repeated = (settings.get("repeats") or 1) > 1
    rows_timed = next((r["latency_runs"].get("bs32_rows") for r in payload["results"]
                       if r.get("status") == "ok" and isinstance(r.get("latency_runs"), dict)), 32) or 32
    header = ["#", "method", "category", "status", "trainable params", "trainable %", f"dev {metric_name} {better}"]
    header += ["95% interval"] if repeated else []
    generated, generated_headings = generation_columns(payload["results"])
    header += generated_headings
    header += ["vs baseline", "Δ vs full", "learning rate", "train time (s)", "train tokens/s", "peak memory (MB)",
               "adapter on disk", "latency bs1 (ms) unmerged / merged",
               f"latency bs{rows_timed} (ms) unmerged / merged", "extra inference cost"]
    cells, kinds = [], []
    trivial = payload.get("baseline")
    if trivial:
        cells.append(["", f"trivial baseline: {trivial['description']}", "-", "baseline", "0", "0%",
                      fmt(trivial["metric"], "{:.4f}")] + (["-"] if repeated else []) + ["-"] * (len(header) - 7 - repeated))
        kinds.append("baseline")
    rank, previous = 0, None
    for row in ranked(payload["results"], settings["higher_is_better"]):
        ok = row.get("status") == "ok"
        rank += 1 if ok else 0
        tie = "≈" if ok and previous is not None and previous["method"] in (row.get("overlaps") or []) else ""
        previous = row if ok else previous
        method = row["method"] + (" ★" if row.get("pareto") else "") + (" ⚠" if row.get("no_better_than_baseline") else "")
        line = [f"{rank}{tie}" if ok else "", method, row.get("category") or "-", row.get("status") or "-",
                fmt(row.get("trainable_params"), "{:,.0f}"), format_percent(row.get("trainable_fraction")),
                format_metric(row, metric_name)]
        line += [format_interval(row.get("metric_ci_low"), row.get("metric_ci_high"))] if repeated else []
        line += generation_cells(row, generated)
        line += [format_versus_baseline(row), format_delta(row), format_lr(row),
                 fmt(row.get("train_seconds"), "{:,.1f}", row.get("train_seconds_std")),
                 fmt(row.get("train_tokens_per_second"), "{:,.0f}"), fmt(row.get("peak_memory_mb"), "{:,.0f}"),
                 format_bytes(row.get("adapter_bytes")),
                 pair(row.get("latency_ms_bs1"), row.get("latency_ms_bs1_merged")),
                 pair(row.get("latency_ms_bs32"), row.get("latency_ms_bs32_merged")),
                 row.get("inference_cost") or "-"]
        cells.append(line)
        kinds.append(" ".join([row.get("status") or ""] + (["pareto"] if row.get("pareto") else [])
                              + (["no-better"] if row.get("no_better_than_baseline") else [])))
    return header, cells, kinds


def suite_table(payload: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """Methods x tasks (each task's score, ± sd over seeds) and the average (± sd, 95% interval); baseline first."""
    suite = payload["suite"]
    tasks = suite["tasks"]
    by_row = {(r["method"], r.get("task")): r for r in payload["results"]}
    repeated = (payload["settings"].get("repeats") or 1) > 1
    header = ["method", *tasks, "average"] + (["95% interval"] if repeated else []) + ["trainable %", "learning rate"]
    cells, kinds = [], []
    if suite.get("baseline_average") is not None:
        cells.append(["trivial baseline"] + [fmt(suite["baseline_scores"].get(t), "{:.4f}") for t in tasks]
                     + [fmt(suite["baseline_average"], "{:.4f}")] + (["-"] if repeated else []) + ["0%", "-"])
        kinds.append("baseline")
    entries = sorted(suite["rows"], key=lambda e: -(e["average"] if is_number(e["average"]) else -1e9))
    for entry in entries:
        scores = []
        for task in tasks:
            row = by_row.get((entry["method"], task)) or {}
            text = fmt(row.get("score"), "{:.4f}", row.get("score_std")) if row.get("status") == "ok" else \
                (row.get("status") or "-")
            scores.append(text + (" ⚠" if row.get("no_better_than_baseline") else ""))
        sources = {(by_row.get((entry["method"], t)) or {}).get("lr_source") for t in tasks} - {None}
        method = entry["method"] + (" ★" if entry.get("pareto") else "") + (" ⚠" if entry.get("no_better_than_baseline")
                                                                             else "")
        cells.append([method, *scores, fmt(entry["average"], "{:.4f}", entry.get("average_sd"))]
                     + ([format_interval(entry.get("average_ci_low"), entry.get("average_ci_high"))] if repeated else [])
                     + [format_percent(entry.get("trainable_fraction")), ", ".join(sorted(sources)) or "-"])
        kinds.append(" ".join([entry["status"]] + (["pareto"] if entry.get("pareto") else [])
                              + (["no-better"] if entry.get("no_better_than_baseline") else [])))
    return header, cells, kinds


def multitask_table(payload: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    multitask = payload.get("multitask")
    if not multitask:
        return None
    tasks = len(multitask["tasks"])
    header = ["method", f"adapters on disk ({tasks} tasks)", "one serve process, all tasks: RSS (MB)",
              f"vs {tasks} full-model processes ({fmt(multitask.get('full_model_per_task_mb'), '{:,.0f}')} MB)",
              "mixed-adapter batch"]
    cells = []
    for entry in multitask["rows"]:
        saving = entry.get("saving_vs_full_per_task")
        cells.append([entry["method"], format_bytes(entry.get("adapter_bytes_total")),
                      fmt(entry.get("serve_rss_mb"), "{:,.0f}") if entry.get("status") == "ok"
                      else f"{entry.get('status')}: {entry.get('error') or ''}",
                      (f"{100 * saving:.0f}% less" if saving >= 0 else f"{-100 * saving:.0f}% more")
                      if is_number(saving) else "-",
                      "yes" if entry.get("mixed_batch") else "no"])
    return header, cells


__all__ = ["CATEGORY_COLOURS", "NO_BETTER", "is_number", "pareto_flags", "trains_all_weights", "baseline", "ranked",
           "format_metric", "format_interval", "format_delta", "format_versus_baseline", "format_lr", "format_percent",
           "format_bytes", "fmt", "pair", "GENERATION_LABELS", "generation_columns", "generation_cells", "task_view", "table_rows", "suite_table", "multitask_table"]
