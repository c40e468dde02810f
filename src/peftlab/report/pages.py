"""``report.md`` and the self-contained ``report.html``: the same sections, from the same tables.

Sections: the budget sentence; for a suite, the suite table (methods x tasks + average), its Pareto plot, the
multi-task serving cost and the tuning; then per task its table (trivial baseline first) and plots; sample
generations; how it was measured; the command as typed and resolved; the environment.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from peftlab.report.charts import PLOTS, SUITE_PLOT
from peftlab.report.tables import NO_BETTER, multitask_table, suite_table, table_rows

LEGEND = ("★ on the Pareto front (no other method is both smaller and at least as good; a method no better than the "
          f"baseline never is). ⚠ {NO_BETTER}: not above the trivial baseline with 95% confidence (one-sided test on "
          "the dev set with one seed, the 95% t-interval over seeds with several). ≈ after a rank: its 95% interval "
          "overlaps the one ranked above it. Δ vs full: dev metric minus full fine-tuning's. Learning rate: the "
          "method's default, one given, or tuned (--tune).")


def title(payload: dict[str, Any]) -> str:
    settings = payload["settings"]
    tasks = settings.get("tasks") or [settings["task"]]
    what = tasks[0] if len(tasks) == 1 else f"{settings.get('suite') or 'suite'} ({', '.join(tasks)})"
    return f"peftlab compare: {what} with {settings['model']}"


def short(text, limit: int) -> str:
    text = str(text or "")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def samples(view) -> list[tuple[str, list[dict]]]:
    return [(r["method"], r["samples"]) for r in view["results"] if r.get("status") == "ok" and r.get("samples")]


def budget_sentence(payload) -> str:
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
    tasks = settings.get("tasks") or [settings["task"]]
    tune = settings.get("tune")
    rate = (f"each with the learning rate {tune['trials']} Optuna trials chose on a validation split carved from its "
            "training examples (marked 'tuned')" if tune else "each with its own default learning rate")
    text = (f"Every method trained on the same {examples_text} "
            f"{settings['task'] if len(tasks) == 1 else 'training examples per task (first task; see each task)'} "
            f"{'training examples ' if len(tasks) == 1 else ''}for {settings.get('epochs') or 0:g} "
            f"epoch{'s' if settings.get('epochs') != 1 else ''} (batch {settings.get('batch_size')}, precision "
            f"{settings.get('precision')}), {rate}, and scored on the same {dev}. "
            f"Seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
            f"{' (mean ± standard deviation over seeds, 95% t-intervals)' if len(seeds) > 1 else ''}. "
            f"Device: {device}. Date: {environment.get('date', '?')}. "
            f"Comparison wall time: {payload.get('wall_seconds', 0) / 60:.1f} min"
            f"{' (' + settings['backend_text'] + ')' if settings.get('backend_text') else ''}.")
    if not payload.get("complete", True):
        text += " **Partial: the comparison is still running or was interrupted.**"
    return text


def method_notes(payload) -> list[str]:
    environment = payload.get("environment", {})
    latency = payload["settings"].get("latency") or {}
    memory = ("CUDA max allocated memory of the method's own process" if environment.get("device") == "cuda"
              else "peak resident set size (ru_maxrss) of the method's own process: model, optimizer, activations "
                   "and the Python runtime")
    return [
        "trivial baseline: the majority class of the training examples (classification; MCC 0), the training "
        "mean (regression), the most frequent tag (NER), or the empty answer (QA), scored on the same dev set.",
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


def environment_items(environment: dict[str, Any]) -> list[tuple[str, str]]:
    keys = ("date", "device", "gpu", "cpu", "cpu_cores", "threads", "worker_threads", "bf16_native", "precision",
            "memory_gb", "load_average", "python", "torch", "transformers", "peft", "bitsandbytes", "peftlab", "platform")
    return [(key, str(environment[key])) for key in keys if environment.get(key) is not None]


def suite_notes(payload) -> list[str]:
    suite = payload["suite"]
    notes = [f"Average: {suite['rule']}."]
    notes += [f"{task} is left out of the average: {why}." for task, why in suite.get("left_out", {}).items()]
    missing = {t: i["missing"] for t, i in (payload["settings"].get("task_info") or {}).items() if i.get("missing")}
    notes += [f"{task} did not run: {why}" for task, why in missing.items()]
    notes.append("A method that did not finish every task has no average.")
    return notes


def tuning_rows(payload) -> tuple[list[str], list[list[str]]] | None:
    tuning = payload.get("tuning") or []
    if not tuning:
        return None
    header = ["method", "task", "default lr", "chosen lr", "validation score: default", "validation score: chosen",
              "trials", "validation examples"]
    cells = []
    for entry in tuning:
        def number(value, pattern="{:.4f}"):
            return pattern.format(value) if isinstance(value, (int, float)) else "-"

        cells.append([entry.get("method"), entry.get("task"), number(entry.get("default_lr"), "{:.3g}"),
                      number(entry.get("chosen_lr"), "{:.3g}") if entry.get("status") == "ok" else
                      f"failed: {entry.get('error')}", number(entry.get("default_score")),
                      number(entry.get("best_score")),
                      " ".join(f"{r.get('lr', 0):.2g}:{r.get('state')}" for r in entry.get("trial_records") or []),
                      str(entry.get("validation_examples") or "-")])
    return header, cells


# ---- markdown ------------------------------------------------------------------------------------------

def md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header, cells) -> list[str]:
    return (["| " + " | ".join(md_escape(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in cells] + [""])


def render_markdown(payload: dict[str, Any], sections: list[tuple[str, dict, dict]], output: Path) -> str:
    environment = payload.get("environment", {})
    several = len(sections) > 1 or payload.get("suite") is not None
    lines = [f"# {title(payload)}", "", budget_sentence(payload), ""]
    if payload.get("suite"):
        header, cells, _ = suite_table(payload)
        lines += ["## Suite average", "", *md_table(header, cells), *[f"- {n}" for n in suite_notes(payload)], "",
                  f"![{SUITE_PLOT[1]}]({SUITE_PLOT[0]})", ""]
    multitask = multitask_table(payload)
    if multitask:
        lines += ["## Serving every task", "", *md_table(*multitask), payload["multitask"]["how"] + ".", ""]
    tuning = tuning_rows(payload)
    if tuning:
        lines += ["## Tuning", "", *md_table(*tuning)]
    for task, view, plots in sections:
        header, cells, _ = table_rows(view)
        lines += ([f"## {task}: dev {view['settings']['metric_name']}", ""] if several else [])
        lines += [*md_table(header, cells), LEGEND, ""]
        skipped = [r for r in view["results"] if r.get("status") != "ok"]
        if skipped:
            lines += ["### Not compared" if several else "## Not compared", ""]
            lines += [f"- **{r['method']}** ({r['status']}): {md_escape(r.get('reason') or r.get('error') or '')}"
                      for r in skipped]
            lines.append("")
        lines += ["### Plots" if several else "## Plots", ""]
        for key, (filename, plot_title) in PLOTS.items():
            if key in plots:
                lines += [f"![{plot_title}]({Path(plots[key]).relative_to(output).as_posix()})", ""]
        for method, items in samples(view):
            lines += [f"### Sample generations: {method}", ""]
            for item in items:
                lines += [f"- prompt: `{md_escape(short(item.get('prompt'), 300))}`",
                          f"  - generated: {md_escape(item.get('generated') or '')}",
                          f"  - reference: {md_escape(short(item.get('reference'), 300))}"]
            lines.append("")
    lines += ["## How this was measured", "", *[f"- {line}" for line in method_notes(payload)], ""]
    lines += ["## Command", "", "```", environment.get("command", ""), "```", ""]
    if environment.get("resolved_command") and environment.get("resolved_command") != environment.get("command"):
        lines += ["Every option spelled out:", "", "```", environment["resolved_command"], "```", ""]
    lines += ["## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {md_escape(value)} |" for key, value in environment_items(environment)]
    lines.append("")
    return "\n".join(lines)


# ---- HTML --------------------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #1d2430; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #dde3ea; }
p.lead { color: #444; max-width: 70em; } p.legend { color: #555; font-size: 0.9em; max-width: 80em; }
table { border-collapse: collapse; font-size: 0.86em; margin: 0.5em 0; }
th, td { border: 1px solid #d5dbe3; padding: 0.35em 0.55em; text-align: right; vertical-align: top; }
th { background: #eef2f7; text-align: center; }
td.text { text-align: left; max-width: 22em; }
div.scroll { overflow-x: auto; }
tr.baseline td { background: #f3f4f6; font-style: italic; } tr.no-better td { color: #7a7a7a; }
tr.failed td { background: #fdecea; } tr.unsupported td { background: #fff8e1; } tr.pareto td:nth-child(2) { font-weight: bold; }
.status-ok { color: #1b7f3b; } .status-failed { color: #b3261e; font-weight: bold; } .status-unsupported { color: #8a6d00; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #e3e7ec; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f5f7fa; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; }
.sample { margin: 0.4em 0 1em 0; } .sample div { margin: 0.15em 0; } .label { color: #666; font-size: 0.85em; }
"""
TEXT_COLUMNS = ("method", "category", "status", "extra inference cost", "learning rate", "task", "vs baseline")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def html_table(header, cells, kinds=None) -> list[str]:
    e = html.escape
    parts = ['<div class="scroll"><table><thead><tr>', *[f"<th>{e(h)}</th>" for h in header], "</tr></thead><tbody>"]
    for index, row in enumerate(cells):
        parts.append(f'<tr class="{e(kinds[index])}">' if kinds else "<tr>")
        for column, value in zip(header, row):
            css = ' class="text"' if column in TEXT_COLUMNS else ""
            value_html = f'<span class="status-{e(value)}">{e(value)}</span>' if column == "status" else e(value)
            parts.append(f"<td{css}>{value_html}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table></div>")
    return parts


def figure(path, caption: str) -> str:
    if not path or not Path(path).is_file():
        return ""
    return (f'<figure><img alt="{html.escape(caption)}" src="{data_uri(path)}">'
            f"<figcaption>{html.escape(caption)} ({html.escape(Path(path).name)})</figcaption></figure>")


def render_html(payload: dict[str, Any], sections: list[tuple[str, dict, dict]], files: dict[str, Path]) -> str:
    e = html.escape
    environment = payload.get("environment", {})
    several = len(sections) > 1 or payload.get("suite") is not None
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title(payload))}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{e(title(payload))}</h1>",
             f'<p class="lead">{e(budget_sentence(payload)).replace("**", "")}</p>']
    if payload.get("suite"):
        header, cells, kinds = suite_table(payload)
        parts += ["<h2>Suite average</h2>", *html_table(header, cells, kinds), "<ul>",
                  *[f"<li>{e(n)}</li>" for n in suite_notes(payload)], "</ul>", figure(files.get("suite"), SUITE_PLOT[1])]
    multitask = multitask_table(payload)
    if multitask:
        parts += ["<h2>Serving every task</h2>", *html_table(*multitask),
                  f'<p class="legend">{e(payload["multitask"]["how"])}.</p>']
    tuning = tuning_rows(payload)
    if tuning:
        parts += ["<h2>Tuning</h2>", *html_table(*tuning)]
    for task, view, plots in sections:
        header, cells, kinds = table_rows(view)
        parts.append(f"<h2>{e(task)}: dev {e(view['settings']['metric_name'])}</h2>" if several else "<h2>Results</h2>")
        parts += [*html_table(header, cells, kinds), f'<p class="legend">{e(LEGEND)}</p>']
        skipped = [r for r in view["results"] if r.get("status") != "ok"]
        if skipped:
            parts.append("<h3>Not compared</h3><ul>" if several else "<h2>Not compared</h2><ul>")
            parts += [f"<li><b>{e(r['method'])}</b> ({e(r['status'])}): {e(r.get('reason') or r.get('error') or '')}"
                      "</li>" for r in skipped]
            parts.append("</ul>")
        parts.append("<h3>Plots</h3>" if several else "<h2>Plots</h2>")
        parts += [figure(plots.get(key), plot_title) for key, (_, plot_title) in PLOTS.items()]
        for method, items in samples(view):
            parts.append(f"<h3>Sample generations: {e(method)}</h3>")
            for item in items:
                parts.append('<div class="sample">'
                             f'<div><span class="label">prompt</span><pre>{e(short(item.get("prompt"), 600))}</pre></div>'
                             f'<div><span class="label">generated</span><pre>{e(item.get("generated") or "")}</pre></div>'
                             f'<div><span class="label">reference</span><pre>{e(short(item.get("reference"), 600))}</pre>'
                             "</div></div>")
    parts += ["<h2>How this was measured</h2><ul>", *[f"<li>{e(line)}</li>" for line in method_notes(payload)], "</ul>"]
    parts += ["<h2>Command</h2>", f"<pre>{e(environment.get('command', ''))}</pre>"]
    if environment.get("resolved_command") and environment.get("resolved_command") != environment.get("command"):
        parts += ["<p>Every option spelled out:</p>", f"<pre>{e(environment['resolved_command'])}</pre>"]
    parts.append("<h2>Environment</h2><table><tbody>")
    parts += [f'<tr><th>{e(k)}</th><td class="text">{e(v)}</td></tr>' for k, v in environment_items(environment)]
    parts += ["</tbody></table>", "</body></html>", ""]
    return "\n".join(part for part in parts if part)


__all__ = ["LEGEND", "CSS", "title", "budget_sentence", "method_notes", "environment_items", "suite_notes",
           "tuning_rows", "render_markdown", "render_html", "md_table", "html_table", "figure", "data_uri"]
