"""The report's plots: dev metric against trainable parameters (per task, and the suite average), training time,
peak memory and latency.

Honest against chance: the task's trivial baseline is drawn as a line and the metric axis always includes it
(so noise is not zoomed into separation); a method no better than the baseline is drawn hollow and labelled;
with several seeds the error bars are 95% intervals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftlab.report.tables import CATEGORY_COLOURS, NO_BETTER, baseline, is_number

PLOTS = {
    "pareto": ("pareto.png", "Dev metric against trainable parameters"),
    "time": ("train_time.png", "Training wall time"),
    "memory": ("peak_memory.png", "Peak memory"),
    "latency": ("latency.png", "Inference latency"),
}
SUITE_PLOT = ("suite_pareto.png", "Suite average against trainable parameters")


def make_plots(output: Path, payload: dict[str, Any], prefix: str = "") -> dict[str, Path]:
    """The four plots of one task's payload (``task_view``) as ``output/<prefix><file>``."""
    from peftlab.plots import pyplot

    plt = pyplot()
    settings = payload["settings"]
    ok = [r for r in payload["results"] if r.get("status") == "ok"]
    subtitle = f"{settings['task']} · {settings['model']} · {settings.get('max_train_samples') or 'all'} examples × " \
               f"{settings.get('epochs') or 0:g} epochs"
    files = {}
    for key, draw in (("pareto", plot_pareto), ("time", plot_time), ("memory", plot_memory),
                      ("latency", plot_latency)):
        filename, title = PLOTS[key]
        figure = draw(plt, ok, settings, payload)
        figure.suptitle(f"{title}\n{subtitle}", fontsize=11)
        figure.tight_layout()
        path = output / f"{prefix}{filename}"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        plt.close(figure)
        files[key] = path
    return files


def colour(row: dict[str, Any]) -> str:
    return CATEGORY_COLOURS.get(row.get("category"), "gray")


def empty(plt, message: str = "no finished runs to plot"):
    figure, axis = plt.subplots(figsize=(8, 3), dpi=110)
    axis.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, color="gray")
    axis.set_axis_off()
    return figure


def error_bar(row: dict[str, Any], low_key: str, high_key: str, value: float):
    """The 95% interval as asymmetric error bars, else the standard deviation, else none."""
    low, high = row.get(low_key), row.get(high_key)
    if is_number(low) and is_number(high):
        return [[value - low], [high - value]]
    std = row.get("metric_std")
    return std if is_number(std) else None


def scatter(plt, points: list[dict[str, Any]], *, x_of, y_of, low_key: str, high_key: str, higher_is_better: bool,
            reference: float | None, reference_label: str, ylabel: str, full: dict[str, Any] | None = None):
    """Metric against trainable % (log x): Pareto front, the baseline line with the axis including it."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    figure, axis = plt.subplots(figsize=(8.5, 5.5), dpi=110)
    for row in points:
        x, y = x_of(row), y_of(row)
        flagged = bool(row.get("no_better_than_baseline"))
        axis.errorbar(x, y, yerr=error_bar(row, low_key, high_key, y), fmt="o",
                      markersize=10 if row.get("pareto") else 7, color=colour(row),
                      markerfacecolor="white" if flagged else colour(row),
                      markeredgecolor="black" if row.get("pareto") else colour(row), markeredgewidth=1.5,
                      capsize=3, zorder=3)
        axis.annotate(row["method"] + (" (no better than baseline)" if flagged else ""), (x, y), xytext=(6, 5),
                      textcoords="offset points", fontsize=9, color="dimgray" if flagged else "black")
    front = sorted((r for r in points if r.get("pareto")), key=x_of)
    if front:
        axis.plot([x_of(r) for r in front], [y_of(r) for r in front], "--", color="black", linewidth=1,
                  drawstyle="steps-post", zorder=2)
    if full:
        axis.axhline(full["metric"], linestyle=":", color=colour(full), linewidth=1, zorder=1)
    if is_number(reference):
        axis.axhline(reference, linestyle="-.", color="gray", linewidth=1.2, zorder=1)
        low, high = axis.get_ylim()
        span = max(high, reference) - min(low, reference)
        axis.set_ylim(min(low, reference - 0.05 * span), max(high, reference + 0.05 * span))
    values = [y_of(r) for r in points] + ([reference] if is_number(reference) else [])
    if higher_is_better and all(-1 <= v <= 1 for v in values):
        # a score lives in [-1, 1] (or [0, 1]): wide intervals over few seeds do not stretch the axis past it
        low, high = axis.get_ylim()
        axis.set_ylim(max(low, -1.02 if min(values) < 0 else -0.02), min(high, 1.02))
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}%"))
    axis.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    axis.set_xlabel("trainable parameters (% of the model, log scale)")
    axis.set_ylabel(f"{ylabel} ({'higher' if higher_is_better else 'lower'} is better)")
    axis.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=category)
               for category, c in CATEGORY_COLOURS.items() if any(r.get("category") == category for r in points)]
    handles.append(Line2D([], [], marker="o", linestyle="--", color="black", markerfacecolor="white",
                          markeredgecolor="black", label="Pareto front"))
    if any(r.get("no_better_than_baseline") for r in points):
        handles.append(Line2D([], [], marker="o", linestyle="", color="gray", markerfacecolor="white",
                              label=NO_BETTER))
    if full:
        handles.append(Line2D([], [], linestyle=":", color=colour(full), label="full fine-tuning"))
    if is_number(reference):
        handles.append(Line2D([], [], linestyle="-.", color="gray", label=reference_label))
    axis.legend(handles=handles, fontsize=8, loc="best")
    return figure


def plot_pareto(plt, ok, settings, payload):
    points = [r for r in ok if is_number(r.get("trainable_fraction")) and is_number(r.get("metric"))]
    if not points:
        return empty(plt)
    trivial = payload.get("baseline")
    return scatter(plt, points, x_of=lambda r: 100 * r["trainable_fraction"], y_of=lambda r: r["metric"],
                   low_key="metric_ci_low", high_key="metric_ci_high", higher_is_better=settings["higher_is_better"],
                   reference=trivial["metric"] if trivial else None,
                   reference_label=f"trivial baseline: {trivial['description']}" if trivial else "",
                   ylabel=f"dev {settings['metric_name']}", full=baseline(points))


def plot_suite(output: Path, payload: dict[str, Any]) -> Path:
    """The suite average of each method against its trainable % (mean over the tasks)."""
    from peftlab.plots import pyplot

    plt = pyplot()
    suite = payload["suite"]
    points = [e for e in suite["rows"] if is_number(e.get("average")) and is_number(e.get("trainable_fraction"))]
    if points:
        figure = scatter(plt, points, x_of=lambda e: 100 * e["trainable_fraction"], y_of=lambda e: e["average"],
                         low_key="average_ci_low", high_key="average_ci_high", higher_is_better=True,
                         reference=suite.get("baseline_average"), reference_label="trivial baselines' average",
                         ylabel=f"average score over {len(suite['tasks'])} tasks")
    else:
        figure = empty(plt, "no method finished every task")
    filename, title = SUITE_PLOT
    figure.suptitle(f"{title}\n{', '.join(suite['tasks'])} · {payload['settings']['model']}", fontsize=11)
    figure.tight_layout()
    figure.savefig(output / filename)
    plt.close(figure)
    return output / filename


def barh(plt, rows, values, errors, xlabel, *, number_format="{:,.1f}"):
    pairs = [(r, v, e) for r, v, e in zip(rows, values, errors) if is_number(v)]
    if not pairs:
        return empty(plt)
    pairs.sort(key=lambda p: p[1])
    figure, axis = plt.subplots(figsize=(8, 0.45 * len(pairs) + 1.6), dpi=110)
    labels = [p[0]["method"] for p in pairs]
    numbers = [p[1] for p in pairs]
    xerr = [p[2] if is_number(p[2]) else 0 for p in pairs]
    bars = axis.barh(labels, numbers, color=[colour(p[0]) for p in pairs], xerr=xerr if any(xerr) else None,
                     capsize=3)
    for bar, value in zip(bars, numbers):
        axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + number_format.format(value),
                  va="center", fontsize=8)
    axis.set_xlabel(xlabel)
    axis.set_xlim(0, max(numbers) * 1.2)
    axis.grid(alpha=0.3, axis="x")
    return figure


def plot_time(plt, ok, settings, payload):
    return barh(plt, ok, [r.get("train_seconds") for r in ok], [r.get("train_seconds_std") for r in ok],
                "training wall time (s, evaluation excluded)")


def plot_memory(plt, ok, settings, payload):
    device = payload.get("environment", {}).get("device", "cpu")
    what = "CUDA max allocated" if device == "cuda" else "process peak RSS"
    return barh(plt, ok, [r.get("peak_memory_mb") for r in ok], [r.get("peak_memory_mb_std") for r in ok],
                f"peak memory while training (MB, {what})", number_format="{:,.0f}")


def plot_latency(plt, ok, settings, payload):
    rows = [r for r in ok if is_number(r.get("latency_ms_bs1")) or is_number(r.get("latency_ms_bs32"))]
    if not rows:
        return empty(plt, "no latency measurements")
    import numpy as np

    rows = sorted(rows, key=lambda r: r.get("latency_ms_bs32") or 0)
    figure, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 1.8), dpi=110, sharey=True)
    positions = np.arange(len(rows))
    height = 0.38
    for axis, batch in zip(axes, (1, 32)):
        unmerged = [r.get(f"latency_ms_bs{batch}") or 0 for r in rows]
        merged = [r.get(f"latency_ms_bs{batch}_merged") or 0 for r in rows]
        axis.barh(positions + height / 2, unmerged, height, color="tab:purple", label="unmerged (as trained)")
        axis.barh(positions - height / 2, merged, height, color="tab:cyan", label="merged (mergeable methods)")
        for y, value in zip(positions, unmerged):
            axis.text(value, y + height / 2, f" {value:.1f}", va="center", fontsize=7)
        for y, value in zip(positions, merged):
            if value:
                axis.text(value, y - height / 2, f" {value:.1f}", va="center", fontsize=7)
        size = batch if batch == 1 else next((r["latency_runs"].get("bs32_rows") for r in rows
                                              if isinstance(r.get("latency_runs"), dict)), 32)
        axis.set_title(f"batch {size} (median ms per forward pass)", fontsize=10)
        axis.set_xlim(0, max(unmerged + merged + [1e-9]) * 1.25)
        axis.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(positions, [r["method"] for r in rows])
    axes[0].legend(fontsize=8, loc="lower right")
    return figure


__all__ = ["PLOTS", "SUITE_PLOT", "make_plots", "plot_suite", "colour", "empty", "error_bar", "scatter",
           "plot_pareto", "barh", "plot_time", "plot_memory", "plot_latency"]
