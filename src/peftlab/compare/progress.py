"""What a person sees while a comparison runs: on a terminal a live table (rich) with each method's status,
the runs done and an ETA; otherwise (a log file, CI, a notebook's captured output, ``echo=`` given) plain
lines, one per event, as before.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from typing import Any, Callable

from peftlab.compare.parallel import Job


class Progress:
    """Thread-safe progress of the jobs of one phase (tuning, then runs)."""

    def __init__(self, jobs: list[Job], *, echo: Callable[[str], None] | None = None, live: bool | None = None,
                 workers: int = 1, phase: str = "runs"):
        self.jobs = jobs
        self.total = len(jobs)
        self.workers = max(1, workers)
        self.phase = phase
        self.echo = echo or print_now
        self.live_mode = (echo is None and sys.stdout.isatty()) if live is None else live
        self.lock = threading.Lock()
        self.index: dict[tuple, int] = {job.key: n for n, job in enumerate(jobs, start=1)}
        self.started: dict[tuple, float] = {}
        self.durations: list[float] = []
        self.finished = 0
        self.began = time.time()
        self.methods: dict[str, dict[str, Any]] = {}
        for job in jobs:
            state = self.methods.setdefault(job.method, {"total": 0, "done": 0, "status": "waiting", "last": ""})
            state["total"] += 1
        self.live = None
        if self.live_mode and jobs:
            from rich.live import Live

            self.live = Live(get_renderable=self.render, refresh_per_second=2, transient=False)
            self.live.start()

    # ---- events -------------------------------------------------------------------------------------
    def start(self, job: Job, what: str | None = None) -> None:
        what = what or ("tuning" if job.key[0] == "tune" else "training")
        with self.lock:
            self.started[job.key] = time.time()
            self.methods[job.method]["status"] = f"{what} {job.label}"
            if not self.live:
                self.echo(f"{self.prefix(job)}: {what} ({self.eta_text()})")

    def done(self, job: Job, result: dict[str, Any], line: str) -> None:
        with self.lock:
            began = self.started.pop(job.key, None)
            if began is not None:
                self.durations.append(time.time() - began)
            self.finished += 1
            state = self.methods[job.method]
            state["done"] += 1
            state["last"] = f"{job.label}: {line}"
            state["status"] = "done" if state["done"] == state["total"] else "waiting"
            if result.get("status") not in (None, "ok"):
                state["status"] = "failed" if state["done"] == state["total"] else "waiting (a run failed)"
            if self.live:
                self.live.console.print(f"{self.prefix(job)}: {line}", highlight=False, markup=False)
            else:
                self.echo(f"{self.prefix(job)}: {line}")

    def reused(self, job: Job, line: str) -> None:
        with self.lock:
            self.finished += 1
            state = self.methods[job.method]
            state["done"] += 1
            state["last"] = f"{job.label}: reused"
            state["status"] = "done" if state["done"] == state["total"] else "waiting"
            message = f"{self.prefix(job)}: finished earlier, reused ({line})"
            if self.live:
                self.live.console.print(message, highlight=False, markup=False)
            else:
                self.echo(message)

    def note(self, text: str) -> None:
        with self.lock:
            if self.live:
                self.live.console.print(text, highlight=False, markup=False)
            else:
                self.echo(text)

    def close(self) -> None:
        if self.live:
            self.live.stop()
            self.live = None

    # ---- text ---------------------------------------------------------------------------------------
    def prefix(self, job: Job) -> str:
        return f"[{self.index.get(job.key, '?')}/{self.total}] {job.label}"

    def eta_text(self) -> str:
        remaining = self.total - self.finished
        return eta(self.durations, remaining, self.workers)

    def render(self):
        from rich.console import Group
        from rich.table import Table

        table = Table(title=f"peftlab compare: {self.phase}", expand=False, show_lines=False)
        for column in ("method", "done", "status", "last result"):
            table.add_column(column, overflow="fold", max_width=70 if column == "last result" else None)
        for method, state in self.methods.items():
            style = {"done": "green", "failed": "red"}.get(state["status"], None)
            table.add_row(method, f"{state['done']}/{state['total']}", state["status"], state["last"], style=style)
        elapsed = time.time() - self.began
        footer = f"{self.finished}/{self.total} {self.phase} done · {format_duration(elapsed)} elapsed · {self.eta_text()}"
        return Group(table, footer)


def print_now(message: str) -> None:
    print(message, flush=True)


def format_duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def eta(times: list[float], remaining: int, workers: int = 1) -> str:
    if remaining <= 0:
        return "all done"
    if not times:
        return f"{remaining} to go"
    left = statistics.fmean(times) * remaining / max(1, workers)
    return f"{remaining} to go, about {format_duration(left)} left"


def one_line(result: dict[str, Any]) -> str:
    """A finished run in one line (``ok: dev accuracy 0.8123 · train 12.3 s · ...`` or ``FAILED: ...``)."""
    if result.get("status") != "ok":
        return f"FAILED: {result.get('error')}"
    if result.get("chosen_lr") is not None:  # a tuning job
        best = result.get("best_score")
        return (f"tuned: lr {result['chosen_lr']:.3g} (default {result['default_lr']:.3g}); validation "
                f"{result.get('metric_name')} {best if best is None else f'{best:.4f}'} vs default "
                f"{_number(result.get('default_score'))}")
    parts = [f"ok: dev {result.get('metric_name')} {result['metric']:.4f}"]
    if result.get("train_seconds") is not None:
        parts.append(f"train {result['train_seconds']:.1f} s")
    if result.get("peak_memory_mb") is not None:
        parts.append(f"peak {result['peak_memory_mb']:,.0f} MB")
    if result.get("latency_ms_bs1") is not None:
        parts.append(f"latency bs1 {result['latency_ms_bs1']:.1f} ms")
    scores = (result.get("generation") or {}).get("metrics") or {}
    if scores:
        parts.append("generated: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, (int, float))))
    if (result.get("attempts") or 1) > 1:
        parts.append(f"after {result['attempts'] - 1} retry")
    return " · ".join(parts)


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def plan_banner(settings: dict[str, Any], reasons: dict[str, dict[str, str | None]], planned: int,
                notes: list[str]) -> str:
    tasks = settings["tasks"]
    dev = f"{settings['max_eval_samples']:,} dev examples" if settings["max_eval_samples"] else "the whole dev set"
    budget = (f"{settings['max_train_samples'] or 'all'} train examples x {settings['epochs']:g} epochs, {dev}, "
              f"seed{'s' if len(settings['seeds']) > 1 else ''} {', '.join(map(str, settings['seeds']))}, "
              f"precision {settings['precision']}")
    what = settings["task"] if len(tasks) == 1 else f"{len(tasks)} tasks ({', '.join(tasks)})"
    lines = [f"peftlab compare: {len(settings['methods'])} method(s) on {what} with {settings['model']}",
             f"  budget: {budget}" + (" (first task; per task in results.json)" if len(tasks) > 1 else ""),
             f"  {planned} run(s), {'each in its own process' if settings['isolate'] else 'in this process'}, "
             f"{settings['backend_text']}; results in {settings['output']}"]
    if settings.get("tune"):
        tune = settings["tune"]
        lines.append(f"  tuning: {tune['parameter']} by {tune['trials']} Optuna TPE trial(s) per method and task on a "
                     "validation split carved from the training examples (the dev set is not used)")
    threads = settings.get("worker_threads") or {}
    if threads.get("threads"):
        lines.append(f"  threads: {threads['threads']} per worker, because {threads['why']}")
    if settings["defaults_applied"]:
        lines.append("  compare defaults used for: " + ", ".join(
            f"{k}={settings['options'][k]}" for k in settings["defaults_applied"]))
    lines += [f"  {note}" for note in notes]
    for task, task_reasons in reasons.items():
        for name, reason in task_reasons.items():
            if reason:
                lines.append(f"  {name}{'' if len(tasks) == 1 else f' on {task}'}: unsupported here: {reason}")
    return "\n".join(lines)


def summary(payload: dict[str, Any], files: dict[str, Any]) -> str:
    """The ranking printed at the end (per task; and the suite average), marking rows no better than the
    trivial baseline and neighbours whose 95% intervals overlap."""
    from peftlab.report import format_metric, ranked, trains_all_weights

    settings = payload["settings"]
    lines = []
    for task in settings["tasks"]:
        info = settings["task_info"][task]
        if info.get("missing"):
            lines.append(f"\n{task}: not run: {info['missing']}")
            continue
        rows = [r for r in payload["results"] if r.get("task") in (task, None)]
        trivial = (payload.get("baselines") or {}).get(task)
        lines.append(f"\nRanking on {task} by dev {info['metric_name']} "
                     f"({'higher' if info['higher_is_better'] else 'lower'} is better):")
        if trivial:
            lines.append(f"   - {'baseline':<14} {trivial['metric']:.4f}  ({trivial['description']})")
        ordered = ranked(rows, info["higher_is_better"])
        for rank, row in enumerate(ordered, start=1):
            if row["status"] == "ok":
                delta = row.get("metric_delta_vs_full")
                following = ordered[rank] if rank < len(ordered) else None
                tie = "  ≈ next (95% intervals overlap)" if following and following["method"] in (
                    row.get("overlaps") or []) else ""
                lines.append(f"  {rank:>2}. {row['method']:<14} {format_metric(row, info['metric_name'])}"
                             f"{'' if delta is None or trains_all_weights(row) else f'  ({delta:+.4f} vs full)'}"
                             f"{'  [Pareto]' if row.get('pareto') else ''}"
                             f"{'  [tuned lr]' if row.get('lr_source') == 'tuned' else ''}"
                             f"{'  [no better than the baseline]' if row.get('no_better_than_baseline') else ''}{tie}")
            else:
                detail = row.get("reason") or row.get("error") or ""
                lines.append(f"   - {row['method']:<14} {row['status']}: {detail[:160]}")
    suite = payload.get("suite")
    if suite and suite.get("rows"):
        lines.append(f"\nSuite average over {', '.join(suite['tasks'])} (GLUE convention for two-metric tasks):")
        if suite.get("baseline_average") is not None:
            lines.append(f"   - {'baseline':<14} {suite['baseline_average']:.4f}")
        for entry in sorted(suite["rows"], key=lambda e: -(e["average"] if e["average"] is not None else -1e9)):
            if entry["average"] is None:
                lines.append(f"   - {entry['method']:<14} {entry['status']}"
                             f"{': missing ' + ', '.join(entry['missing_tasks']) if entry['missing_tasks'] else ''}")
                continue
            spread = f" ± {entry['average_sd']:.4f}" if entry.get("average_sd") is not None else ""
            lines.append(f"     {entry['method']:<14} {entry['average']:.4f}{spread}"
                         f"{'  [Pareto]' if entry.get('pareto') else ''}"
                         f"{'  [no better than the baseline]' if entry.get('no_better_than_baseline') else ''}")
    lines.append(f"Report: {files.get('html')}  (also {files.get('markdown')}, results.json, results.csv)")
    return "\n".join(lines)


__all__ = ["Progress", "print_now", "format_duration", "eta", "one_line", "plan_banner", "summary"]
