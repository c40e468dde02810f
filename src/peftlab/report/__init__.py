"""What ``peftlab compare`` leaves for people: tables, plots, ``report.md`` and a self-contained ``report.html``.

Everything here reads the ``results.json`` payload that :func:`peftlab.compare.compare` builds, so a
report can be rebuilt from a finished comparison folder without training again (:func:`rebuild`). The HTML
file embeds its plots as base64 PNG data URIs and links nothing external: it opens offline, attached to an
e-mail or from a CI artifact.

* :mod:`~peftlab.report.tables`: ranking, formatting, the per-task, suite and multi-task tables;
* :mod:`~peftlab.report.charts`: the plots (baseline drawn, 95% error bars);
* :mod:`~peftlab.report.pages`: report.md and report.html;
* :mod:`~peftlab.report.files`: atomic JSON/CSV/text files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftlab.report.charts import PLOTS, SUITE_PLOT, make_plots, plot_suite
from peftlab.report.files import CSV_COLUMNS, write_csv, write_json_file, write_text
from peftlab.report.pages import render_html, render_markdown
from peftlab.report.tables import (CATEGORY_COLOURS, baseline, format_bytes, format_delta, format_metric,
                                   format_percent, format_versus_baseline, is_number, multitask_table, pareto_flags,
                                   ranked, suite_table, table_rows, task_view, trains_all_weights)


def write_report(output: str | Path, payload: dict[str, Any]) -> dict[str, Path]:
    """results.csv, the PNG plots, report.md and report.html in ``output``; returns their paths.

    One task: the plots are ``pareto.png``, ``train_time.png``, ``peak_memory.png``, ``latency.png``. A suite:
    ``suite_pareto.png`` and each task's four under ``plots/<task>-*.png``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    settings = payload["settings"]
    info = settings.get("task_info") or {}
    tasks = [t for t in settings.get("tasks") or [settings["task"]] if not (info.get(t) or {}).get("missing")]
    several = len(settings.get("tasks") or [settings["task"]]) > 1
    files: dict[str, Path] = {"csv": write_csv(output / "results.csv", payload["results"])}
    sections = []
    for task in tasks:
        view = task_view(payload, task)
        plots = make_plots(output, view, prefix=f"plots/{task}-" if several else "")
        if not several:
            files.update(plots)
        sections.append((task, view, plots))
    if payload.get("suite"):
        files["suite"] = plot_suite(output, payload)
    files["markdown"] = write_text(output / "report.md", render_markdown(payload, sections, output))
    files["html"] = write_text(output / "report.html", render_html(payload, sections, files))
    return files


def rebuild(output: str | Path) -> dict[str, Path]:
    """Re-render the report of a finished comparison folder from its results.json."""
    output = Path(output)
    return write_report(output, json.loads((output / "results.json").read_text()))


__all__ = ["write_report", "rebuild", "write_json_file", "write_text", "write_csv", "make_plots", "plot_suite",
           "render_markdown", "render_html", "table_rows", "suite_table", "multitask_table", "task_view", "ranked",
           "pareto_flags", "baseline", "trains_all_weights", "format_metric", "format_delta", "format_percent",
           "format_bytes", "format_versus_baseline", "is_number", "PLOTS", "SUITE_PLOT", "CSV_COLUMNS",
           "CATEGORY_COLOURS"]
