"""What ``peftlab compare`` leaves for people: a table, plots, ``report.md`` and a self-contained ``report.html``.

Everything here reads the ``results.json`` payload that :func:`peftlab.compare.compare` builds, so a
report can be rebuilt from a finished comparison folder without training again
(:func:`rebuild`). The HTML file embeds its plots as base64 PNG data URIs and links nothing
external: it opens offline, attached to an e-mail or from a CI artifact.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any

from peftlab.methods.base import CATEGORIES

# One colour per method category, in the order peftlab.methods.base.CATEGORIES lists them (matplotlib's
# Tableau colours: blue, orange, green, red, ...).
CATEGORY_COLOURS = dict(zip(CATEGORIES, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                                         "tab:pink", "tab:olive", "tab:cyan")))
PLOTS = {
    "pareto": ("pareto.png", "Dev metric against trainable parameters"),
    "time": ("train_time.png", "Training wall time"),
    "memory": ("peak_memory.png", "Peak memory"),
    "latency": ("latency.png", "Inference latency"),
}
CSV_COLUMNS = (
    "method", "status", "category", "trainable_params", "total_params", "trainable_percent", "metric_name", "metric",
    "metric_std", "metric_delta_vs_full", "pareto", "train_seconds", "train_seconds_std", "train_tokens_per_second",
    "train_samples_per_second", "peak_memory_mb", "adapter_bytes", "latency_ms_bs1", "latency_ms_bs1_merged",
    "latency_ms_bs32", "latency_ms_bs32_merged", "mergeable", "inference_cost", "learning_rate", "epochs",
    "train_examples", "eval_examples", "precision", "device", "repeats", "seeds", "error", "reason",
)


# ---- ranking and formatting ------------------------------------------------------------------------

def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pareto_flags(rows: list[dict[str, Any]], *, higher_is_better: bool) -> list[bool]:
    """For each row: is it on the Pareto front of (fewer trainable parameters, better metric)?

    A run is on the front when no other run has at most its trainable fraction and at least its metric,
    with one of the two strictly better.
    """
    def better(a, b):
        return a > b if higher_is_better else a < b

    points = [(i, r["trainable_fraction"], r["metric"]) for i, r in enumerate(rows)
              if r.get("status") == "ok" and _number(r.get("trainable_fraction")) and _number(r.get("metric"))]
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
    """The finished run that trains all weights (full fine-tuning), which the others are measured against."""
    return next((r for r in rows if r.get("status") == "ok" and _number(r.get("metric")) and trains_all_weights(r)),
                None)


def ranked(rows: list[dict[str, Any]], higher_is_better: bool) -> list[dict[str, Any]]:
    """Finished runs best first, then failed, then unsupported (each group in run order)."""
    ok = [r for r in rows if r.get("status") == "ok" and _number(r.get("metric"))]
    ok.sort(key=lambda r: -r["metric"] if higher_is_better else r["metric"])
    rest = [r for r in rows if r not in ok]
    rest.sort(key=lambda r: {"failed": 0, "unsupported": 1}.get(r.get("status"), 2))
    return ok + rest


def format_metric(row: dict[str, Any], metric_name: str | None = None) -> str:
    value = row.get("metric")
    if not _number(value):
        return "-"
    digits = 2 if (metric_name or row.get("metric_name")) in ("perplexity", "loss") and abs(value) >= 10 else 4
    text = f"{value:.{digits}f}"
    if _number(row.get("metric_std")):
        text += f" ± {row['metric_std']:.{digits}f}"
    return text


def format_delta(row: dict[str, Any]) -> str:
    if trains_all_weights(row) or not _number(row.get("metric_delta_vs_full")):
        return "-"
    return f"{row['metric_delta_vs_full']:+.4f}"


def format_percent(fraction) -> str:
    from peftlab.catalog import format_percent as percent

    return percent(fraction) if _number(fraction) else "-"


def format_bytes(size) -> str:
    if not _number(size):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"  # pragma: no cover


def _fmt(value, pattern: str = "{:,.1f}", std=None) -> str:
    if not _number(value):
        return "-"
    text = pattern.format(value)
    if _number(std):
        text += " ± " + pattern.format(std)
    return text


def _pair(unmerged, merged) -> str:
    left = _fmt(unmerged, "{:.1f}")
    return left if not _number(merged) else f"{left} / {_fmt(merged, '{:.1f}')}"


def table_rows(payload: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The report table (header, cells) shared by report.md and report.html."""
    settings = payload["settings"]
    metric_name = settings["metric_name"]
    better = "↑" if settings["higher_is_better"] else "↓"
    rows_timed = next((r["latency_runs"].get("bs32_rows") for r in payload["results"]
                       if r.get("status") == "ok" and isinstance(r.get("latency_runs"), dict)), 32) or 32
    header = ["#", "method", "category", "status", "trainable params", "trainable %", f"dev {metric_name} {better}",
              "Δ vs full", "train time (s)", "train tokens/s", "peak memory (MB)", "adapter on disk",
              "latency bs1 (ms) unmerged / merged", f"latency bs{rows_timed} (ms) unmerged / merged",
              "extra inference cost"]
    cells = []
    rank = 0
    for row in ranked(payload["results"], settings["higher_is_better"]):
        ok = row.get("status") == "ok"
        rank += 1 if ok else 0
        method = row["method"] + (" ★" if row.get("pareto") else "")
        cells.append([
            str(rank) if ok else "",
            method,
            row.get("category") or "-",
            row.get("status") or "-",
            _fmt(row.get("trainable_params"), "{:,.0f}"),
            format_percent(row.get("trainable_fraction")),
            format_metric(row, metric_name),
            format_delta(row),
            _fmt(row.get("train_seconds"), "{:,.1f}", row.get("train_seconds_std")),
            _fmt(row.get("train_tokens_per_second"), "{:,.0f}"),
            _fmt(row.get("peak_memory_mb"), "{:,.0f}"),
            format_bytes(row.get("adapter_bytes")),
            _pair(row.get("latency_ms_bs1"), row.get("latency_ms_bs1_merged")),
            _pair(row.get("latency_ms_bs32"), row.get("latency_ms_bs32_merged")),
            row.get("inference_cost") or "-",
        ])
    return header, cells


# ---- files -------------------------------------------------------------------------------------------

def write_report(output: str | Path, payload: dict[str, Any]) -> dict[str, Path]:
    """results.csv, the PNG plots, report.md and report.html in ``output``; returns their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"csv": write_csv(output / "results.csv", payload["results"])}
    files.update(make_plots(output, payload))
    files["markdown"] = _write_text(output / "report.md", render_markdown(payload))
    files["html"] = _write_text(output / "report.html", render_html(payload, files))
    return files


def rebuild(output: str | Path) -> dict[str, Path]:
    """Re-render the report of a finished comparison folder from its results.json."""
    output = Path(output)
    return write_report(output, json.loads((output / "results.json").read_text()))


def _write_text(path: Path, text: str) -> Path:
    """Atomic (temp file + rename), and readable by others like any report (mkstemp creates files 0600)."""
    import os

    from peftlab.artifacts import atomic_write_text

    atomic_write_text(path, text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)


def write_json_file(path: Path, payload: Any) -> Path:
    """JSON (NaN/inf written as null, numpy scalars as numbers), atomically, world-readable."""
    return _write_text(path, json.dumps(_clean(payload), indent=2, default=_jsonable) + "\n")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return _clean(value.item())
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record = {key: row.get(key) for key in CSV_COLUMNS}
        record["trainable_percent"] = 100 * row["trainable_fraction"] if _number(row.get("trainable_fraction")) else None
        record["seeds"] = " ".join(map(str, row.get("seeds") or []))
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return _write_text(path, buffer.getvalue())


# ---- plots ---------------------------------------------------------------------------------------------

def make_plots(output: Path, payload: dict[str, Any]) -> dict[str, Path]:
    from peftlab.plots import pyplot

    plt = pyplot()
    settings = payload["settings"]
    ok = [r for r in payload["results"] if r.get("status") == "ok"]
    subtitle = f"{settings['task']} · {settings['model']} · {settings.get('max_train_samples') or 'all'} examples × " \
               f"{settings.get('epochs', 0):g} epochs"
    files = {}
    for key, draw in (("pareto", _plot_pareto), ("time", _plot_time), ("memory", _plot_memory),
                      ("latency", _plot_latency)):
        filename, title = PLOTS[key]
        figure = draw(plt, ok, settings, payload)
        figure.suptitle(f"{title}\n{subtitle}", fontsize=11)
        figure.tight_layout()
        figure.savefig(output / filename)
        plt.close(figure)
        files[key] = output / filename
    return files


def _colour(row: dict[str, Any]) -> str:
    return CATEGORY_COLOURS.get(row.get("category"), "gray")


def _empty(plt, message: str = "no finished runs to plot"):
    figure, axis = plt.subplots(figsize=(8, 3), dpi=110)
    axis.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, color="gray")
    axis.set_axis_off()
    return figure


def _plot_pareto(plt, ok, settings, payload):
    from matplotlib.lines import Line2D

    points = [r for r in ok if _number(r.get("trainable_fraction")) and _number(r.get("metric"))]
    if not points:
        return _empty(plt)
    figure, axis = plt.subplots(figsize=(8.5, 5.5), dpi=110)
    for row in points:
        x, y = 100 * row["trainable_fraction"], row["metric"]
        axis.errorbar(x, y, yerr=row.get("metric_std") if _number(row.get("metric_std")) else None, fmt="o",
                      markersize=10 if row.get("pareto") else 7, color=_colour(row),
                      markeredgecolor="black" if row.get("pareto") else "none", markeredgewidth=1.5, capsize=3,
                      zorder=3)
        axis.annotate(row["method"], (x, y), xytext=(6, 5), textcoords="offset points", fontsize=9)
    front = sorted((r for r in points if r.get("pareto")), key=lambda r: r["trainable_fraction"])
    if front:
        axis.plot([100 * r["trainable_fraction"] for r in front], [r["metric"] for r in front], "--", color="black",
                  linewidth=1, drawstyle="steps-post", zorder=2)
    full = baseline(points)
    if full:
        axis.axhline(full["metric"], linestyle=":", color=_colour(full), linewidth=1, zorder=1)
    axis.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}%"))
    axis.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    axis.set_xlabel("trainable parameters (% of the model, log scale)")
    direction = "higher" if settings["higher_is_better"] else "lower"
    axis.set_ylabel(f"dev {settings['metric_name']} ({direction} is better)")
    axis.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], marker="o", linestyle="", color=colour, label=category)
               for category, colour in CATEGORY_COLOURS.items() if any(r.get("category") == category for r in points)]
    handles.append(Line2D([], [], marker="o", linestyle="--", color="black", markerfacecolor="white",
                          markeredgecolor="black", label="Pareto front"))
    if full:
        handles.append(Line2D([], [], linestyle=":", color=_colour(full), label="full fine-tuning"))
    axis.legend(handles=handles, fontsize=8, loc="best")
    return figure


def _barh(plt, rows, values, errors, xlabel, *, fmt="{:,.1f}"):
    pairs = [(r, v, e) for r, v, e in zip(rows, values, errors) if _number(v)]
    if not pairs:
        return _empty(plt)
    pairs.sort(key=lambda p: p[1])
    figure, axis = plt.subplots(figsize=(8, 0.45 * len(pairs) + 1.6), dpi=110)
    labels = [p[0]["method"] for p in pairs]
    numbers = [p[1] for p in pairs]
    colours = [_colour(p[0]) for p in pairs]
    xerr = [p[2] if _number(p[2]) else 0 for p in pairs]
    bars = axis.barh(labels, numbers, color=colours, xerr=xerr if any(xerr) else None, capsize=3)
    for bar, value in zip(bars, numbers):
        axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + fmt.format(value), va="center", fontsize=8)
    axis.set_xlabel(xlabel)
    axis.set_xlim(0, max(numbers) * 1.2)
    axis.grid(alpha=0.3, axis="x")
    return figure


def _plot_time(plt, ok, settings, payload):
    return _barh(plt, ok, [r.get("train_seconds") for r in ok], [r.get("train_seconds_std") for r in ok],
                 "training wall time (s, evaluation excluded)")


def _plot_memory(plt, ok, settings, payload):
    device = payload.get("environment", {}).get("device", "cpu")
    what = "CUDA max allocated" if device == "cuda" else "process peak RSS"
    return _barh(plt, ok, [r.get("peak_memory_mb") for r in ok], [r.get("peak_memory_mb_std") for r in ok],
                 f"peak memory while training (MB, {what})", fmt="{:,.0f}")


def _plot_latency(plt, ok, settings, payload):
    rows = [r for r in ok if _number(r.get("latency_ms_bs1")) or _number(r.get("latency_ms_bs32"))]
    if not rows:
        return _empty(plt, "no latency measurements")
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


# ---- markdown ------------------------------------------------------------------------------------------

def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(payload: dict[str, Any]) -> str:
    settings = payload["settings"]
    environment = payload.get("environment", {})
    header, cells = table_rows(payload)
    lines = [f"# peftlab compare: {settings['task']} with {settings['model']}", ""]
    lines += [_budget_sentence(payload), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in cells]
    lines += ["", "★ = on the Pareto front (no other method is both smaller and better). "
              "Δ vs full = dev metric minus full fine-tuning's.", ""]
    skipped = [r for r in payload["results"] if r.get("status") != "ok"]
    if skipped:
        lines += ["## Not compared", ""]
        for row in skipped:
            lines.append(f"- **{row['method']}** ({row['status']}): {_md_escape(row.get('reason') or row.get('error') or '')}")
        lines.append("")
    lines += ["## Plots", ""]
    for key, (filename, title) in PLOTS.items():
        lines += [f"### {title}", "", f"![{title}]({filename})", ""]
    samples = _samples(payload)
    if samples:
        lines += ["## Sample generations", "", f"Greedy, {samples[0][1] and len(samples[0][1])} dev prompts, "
                  "up to 32 new tokens, from each method's reloaded run.", ""]
        for method, items in samples:
            lines += [f"### {method}", ""]
            for item in items:
                lines += [f"- prompt: `{_md_escape(_short(item.get('prompt'), 300))}`",
                          f"  - generated: {_md_escape(item.get('generated') or '')}",
                          f"  - reference: {_md_escape(_short(item.get('reference'), 300))}"]
            lines.append("")
    lines += ["## How this was measured", "", *[f"- {line}" for line in _method_notes(payload)], ""]
    lines += ["## Command", "", "```", environment.get("command", ""), "```", ""]
    if environment.get("resolved_command") and environment.get("resolved_command") != environment.get("command"):
        lines += ["Every option spelled out:", "", "```", environment["resolved_command"], "```", ""]
    lines += ["## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {_md_escape(value)} |" for key, value in _environment_items(environment)]
    lines.append("")
    return "\n".join(lines)


def _short(text, limit: int) -> str:
    text = str(text or "")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _samples(payload) -> list[tuple[str, list[dict]]]:
    return [(r["method"], r["samples"]) for r in payload["results"] if r.get("status") == "ok" and r.get("samples")]


def _budget_sentence(payload) -> str:
    settings = payload["settings"]
    environment = payload.get("environment", {})
    seeds = settings.get("seeds") or []
    finished = [r for r in payload["results"] if r.get("status") == "ok"]
    examples = settings.get("max_train_samples") or (finished[0].get("train_examples") if finished else None) or "all"
    dev_count = settings.get("max_eval_samples") or (finished[0].get("eval_examples") if finished else None)
    dev = f"{dev_count:,} dev examples" if isinstance(dev_count, int) else "dev set"
    threads = next((r.get("threads") for r in finished if r.get("threads")), None) or environment.get("threads")
    device = environment.get("gpu") or f"{environment.get('cpu', 'CPU')}, {environment.get('cpu_cores', '?')} cores, " \
                                       f"{threads} thread{'s' if threads != 1 else ''} per run"
    examples_text = f"{examples:,}" if isinstance(examples, int) else str(examples)
    text = (f"Every method trained on the same {examples_text} {settings['task']} training examples for "
            f"{settings.get('epochs', 0):g} epoch{'s' if settings.get('epochs') != 1 else ''} (batch "
            f"{settings.get('batch_size')}, precision {settings.get('precision')}), "
            f"each with its own default learning rate, and scored on the same {dev}. "
            f"Seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
            f"{' (mean ± standard deviation over seeds)' if len(seeds) > 1 else ''}. "
            f"Device: {device}. Date: {environment.get('date', '?')}. "
            f"Comparison wall time: {payload.get('wall_seconds', 0) / 60:.1f} min.")
    if not payload.get("complete", True):
        text += " **Partial: the comparison is still running or was interrupted.**"
    return text


def _method_notes(payload) -> list[str]:
    environment = payload.get("environment", {})
    latency = payload["settings"].get("latency") or {}
    memory = ("CUDA max allocated memory of the method's own process" if environment.get("device") == "cuda"
              else "peak resident set size (ru_maxrss) of the method's own process: model, optimizer, activations "
                   "and the Python runtime")
    return [
        "trainable params / %: parameters with requires_grad after the method is applied (task head included), "
        "over all parameters of the adapted model.",
        "train time: wall seconds of the training loop (evaluation excluded); tokens/s counts real (unpadded) "
        "training tokens.",
        f"peak memory: {memory}, measured at the end of training.",
        "adapter on disk: bytes of the run's adapter/ folder (for full fine-tuning: the whole model).",
        f"latency: median milliseconds of one forward pass (fp32, no gradients) at batch 1 (single dev examples, "
        f"cycled; {latency.get('bs1_warmup', 3)} warm-up + up to {latency.get('bs1_runs', 20)} timed runs) and "
        f"batch 32 (the first 32 dev examples padded together; {latency.get('bs32_warmup', 1)} warm-up + up to "
        f"{latency.get('bs32_runs', 5)} timed runs; each setting stops after {latency.get('budget_s', 5):g} s once "
        "3 runs are in), in the method's own process, on the model reloaded from its run folder; 'merged' times the "
        "same after method.merge() on a freshly loaded copy (mergeable methods only).",
        "extra inference cost: what the method adds at inference, as the method declares it.",
        "Each method ran in its own process" + ("" if payload["settings"].get("isolate", True) else
                                                 " — not here: --no-isolate was given, so peak memory is the "
                                                 "compare process's") + "; see runs/<method>/compare.log.",
    ]


def _environment_items(environment: dict[str, Any]) -> list[tuple[str, str]]:
    keys = ("date", "device", "gpu", "cpu", "cpu_cores", "threads", "worker_threads", "bf16_native", "precision", "memory_gb",
            "load_average", "python", "torch", "transformers", "peft", "bitsandbytes", "peftlab", "platform")
    return [(key, str(environment[key])) for key in keys if environment.get(key) is not None]


# ---- HTML --------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #1d2430; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #dde3ea; }
p.lead { color: #444; max-width: 70em; }
table { border-collapse: collapse; font-size: 0.86em; margin: 0.5em 0; }
th, td { border: 1px solid #d5dbe3; padding: 0.35em 0.55em; text-align: right; vertical-align: top; }
th { background: #eef2f7; text-align: center; }
td.text { text-align: left; max-width: 22em; } td.cost { min-width: 16em; }
div.scroll { overflow-x: auto; }
tr.failed td { background: #fdecea; } tr.unsupported td { background: #fff8e1; } tr.pareto td:nth-child(2) { font-weight: bold; }
.status-ok { color: #1b7f3b; } .status-failed { color: #b3261e; font-weight: bold; } .status-unsupported { color: #8a6d00; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #e3e7ec; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f5f7fa; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; }
.sample { margin: 0.4em 0 1em 0; } .sample div { margin: 0.15em 0; } .label { color: #666; font-size: 0.85em; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(payload: dict[str, Any], files: dict[str, Path]) -> str:
    e = html.escape
    settings = payload["settings"]
    environment = payload.get("environment", {})
    header, cells = table_rows(payload)
    by_method = {r["method"]: r for r in payload["results"]}
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>peftlab compare: {e(settings['task'])} with {e(settings['model'])}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>peftlab compare: {e(settings['task'])} with {e(settings['model'])}</h1>",
             f'<p class="lead">{e(_budget_sentence(payload)).replace("**", "")}</p>',
             "<h2>Results</h2>", '<div class="scroll"><table><thead><tr>', *[f"<th>{e(h)}</th>" for h in header], "</tr></thead><tbody>"]
    text_columns = {1, 2, 3, 14}
    for row_cells in cells:
        method = row_cells[1].replace(" ★", "")
        row = by_method.get(method, {})
        classes = [row.get("status", "")] + (["pareto"] if row.get("pareto") else [])
        parts.append(f'<tr class="{e(" ".join(classes))}">')
        for index, value in enumerate(row_cells):
            css = ' class="text"' if index in text_columns else ""
            if index == len(row_cells) - 1:
                css = ' class="text cost"'
            if index == 3:
                value_html = f'<span class="status-{e(value)}">{e(value)}</span>'
            else:
                value_html = e(value)
            parts.append(f"<td{css}>{value_html}</td>")
        parts.append("</tr>")
    parts += ["</tbody></table></div>",
              "<p>★ on the Pareto front (no other method is both smaller and better). "
              "Δ vs full: dev metric minus full fine-tuning's.</p>"]
    skipped = [r for r in payload["results"] if r.get("status") != "ok"]
    if skipped:
        parts.append("<h2>Not compared</h2><ul>")
        parts += [f"<li><b>{e(r['method'])}</b> ({e(r['status'])}): {e(r.get('reason') or r.get('error') or '')}</li>"
                  for r in skipped]
        parts.append("</ul>")
    parts.append("<h2>Plots</h2>")
    for key, (filename, title) in PLOTS.items():
        if key in files and Path(files[key]).is_file():
            parts.append(f'<figure><img alt="{e(title)}" src="{_data_uri(files[key])}">'
                         f"<figcaption>{e(title)} ({e(filename)})</figcaption></figure>")
    samples = _samples(payload)
    if samples:
        parts.append("<h2>Sample generations</h2><p>Greedy decoding, up to 32 new tokens, from each method's "
                     "reloaded run, on the first dev prompts.</p>")
        for method, items in samples:
            parts.append(f"<h3>{e(method)}</h3>")
            for item in items:
                parts.append('<div class="sample">'
                             f'<div><span class="label">prompt</span><pre>{e(_short(item.get("prompt"), 600))}</pre></div>'
                             f'<div><span class="label">generated</span><pre>{e(item.get("generated") or "")}</pre></div>'
                             f'<div><span class="label">reference</span><pre>{e(_short(item.get("reference"), 600))}</pre></div>'
                             "</div>")
    parts.append("<h2>How this was measured</h2><ul>")
    parts += [f"<li>{e(line)}</li>" for line in _method_notes(payload)]
    parts.append("</ul>")
    parts += ["<h2>Command</h2>", f"<pre>{e(environment.get('command', ''))}</pre>"]
    if environment.get("resolved_command") and environment.get("resolved_command") != environment.get("command"):
        parts += ["<p>Every option spelled out:</p>", f"<pre>{e(environment['resolved_command'])}</pre>"]
    parts.append("<h2>Environment</h2><table><tbody>")
    parts += [f'<tr><th>{e(k)}</th><td class="text">{e(v)}</td></tr>' for k, v in _environment_items(environment)]
    parts += ["</tbody></table>", "</body></html>", ""]
    return "\n".join(parts)
