"""The comparison itself: check the names, plan the grid (tasks x methods x seeds, tuning first with ``--tune``),
run every job (one after another, ``--workers N`` at once, or on Ray), continue a killed comparison, and write
``results.json`` and the report.

A method the model cannot take is listed as ``unsupported`` before anything trains; a task whose data cannot be
loaded is left out with one sentence; a job that crashes is retried once and then recorded ``failed``, and the
others go on. Every method comes from the registry (``peftlab.methods``): a method registered from outside
peftlab is compared like the built-in ones.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

from peftlab.compare.environment import environment, invocation, resolved_command
from peftlab.compare.measure import LATENCY_SETTINGS
from peftlab.compare.parallel import Job, check_workers, plan_workers, run_jobs, worker_threads
from peftlab.compare.plan import (COMPARE_DEFAULTS, DEFAULT_BUDGETS, TaskPlan, generation_refusal,  # noqa: F401
                                  make_job, needs_special_load, options_for, plan_task, preflight, resolve_methods, skeleton,
                                  unsupported_reason_kind_only)
from peftlab.compare.progress import Progress, one_line, plan_banner, print_now, summary
from peftlab.compare.rows import aggregate, compare_rows
from peftlab.compare.runner import (finished_run, flat_options, identity_of, log_tail, prepare_run_dir,  # noqa: F401
                                    run_in_process, run_isolated, run_job)
from peftlab.compare.suite import parse_tasks, suite_rows
from peftlab.compare.tuning import TUNE_FILE, check_tune
from peftlab.compare.worker import RESULT_FILE, failed_result, method_source
from peftlab.errors import PeftlabError
from peftlab.report import write_json_file

# Keys of a compare recipe that are compare's own flags (the command line wins over them).
RECIPE_FLAGS = ("methods", "repeats", "tasks", "suite", "tune", "trials", "workers", "generate", "max_new_tokens")
GENERATE_NEW_TOKENS = 64  # --generate's default --max-new-tokens (peftlab eval's)
# The folders a comparison writes besides runs/ (the plots of a suite, tuning, the multi-task measurement).
COMPARE_FOLDERS = ("plots", "tuning", "multitask")


def default_output(task_names: list[str], suite: str | None = None) -> Path:
    """``runs/compare-<task>``, ``runs/compare-<suite>`` or ``runs/compare-<task1>-<task2>...``."""
    label = task_names[0] if len(task_names) == 1 else (suite or "-".join(task_names))
    return Path(f"runs/compare-{label}")


def compare(methods: str | list[str] = "all", output: str | Path | None = None, repeats: int = 1,
            resume: bool = False, train_options: dict[str, Any] | None = None, isolate: bool = True,
            echo: Callable[[str], None] | None = None, latency: dict[str, Any] | None = None, *,
            tasks: str | list[str] | None = None, suite: str | None = None, tune: str | None = None,
            trials: int | None = None, workers: int | None = None, ray: str | bool | None = None,
            multitask: bool = True, live: bool | None = None, generate: int | None = None,
            max_new_tokens: int | None = None) -> dict[str, Any]:
    """Train and measure ``methods`` side by side on one task or several; returns what ``results.json`` holds.

    ``train_options`` are the flat ``peftlab train`` options (``task``, ``model``, ``epochs``,
    ``max_train_samples``, ``lr``, method options such as ``r``...): a method option applies to the
    methods that have it. A key named after a method whose value is a mapping (from a ``--config``
    recipe, e.g. ``lora: {lr: 1e-3}``) overrides options for that method only. ``tasks``/``suite``: several
    tasks (a suite average per method). ``tune="lr"``: each method's learning rate searched per task with
    ``trials`` Optuna trials first. ``workers``: jobs at once on this machine; ``ray``: run on Ray (True or
    "local": a local instance; else a cluster address). ``multitask``: measure serving all tasks (suites).
    ``generate``: generation tasks also generate for the first N dev examples with each trained run and score
    the texts (``task.generation_metrics``), ``max_new_tokens`` each.
    ``echo``: where plain progress lines go (default: a live table on a terminal, else stdout).
    """
    from peftlab.methods import method_names

    started = time.time()
    options = {str(k).replace("-", "_"): v for k, v in (train_options or {}).items() if v is not None}
    per_method = {name: {str(k).replace("-", "_"): v for k, v in options.pop(name).items()}
                  for name in list(options) if name in method_names() and isinstance(options[name], dict)}
    if "method" in options:
        raise PeftlabError("compare trains several methods: choose them with --methods lora,bitfit (not --method).")
    latency = {**LATENCY_SETTINGS, **(latency or {})}
    unknown_latency = sorted(set(latency) - set(LATENCY_SETTINGS))
    if unknown_latency:
        raise PeftlabError(f"Unknown latency setting(s) {', '.join(unknown_latency)}; use {', '.join(LATENCY_SETTINGS)}.")
    recipe = {key: options.pop(key) for key in RECIPE_FLAGS if key in options}  # a recipe may name these too
    methods = recipe["methods"] if "methods" in recipe and methods in (None, "all") else methods
    repeats = int(recipe["repeats"]) if "repeats" in recipe and repeats == 1 else repeats
    tasks = tasks if tasks is not None or suite is not None else recipe.get("tasks")
    suite = suite if suite is not None or tasks is not None else recipe.get("suite")
    tune = tune if tune is not None else recipe.get("tune")
    trials = trials if trials is not None else recipe.get("trials")
    workers = workers if workers is not None else recipe.get("workers")
    generate = generate if generate is not None else recipe.get("generate", 0)
    max_new_tokens = max_new_tokens if max_new_tokens is not None else recipe.get("max_new_tokens", GENERATE_NEW_TOKENS)
    generate, max_new_tokens = check_generate(generate, max_new_tokens)
    for key in ("output", "resume", "keep_checkpoints", "overwrite"):
        options.pop(key, None)  # compare decides where each run goes and what resuming means
    comparison_name = options.pop("run_name", None)  # --run-name names the comparison; each run is named for itself

    names = resolve_methods(methods)
    unknown_overrides = sorted(set(per_method) - set(names))
    if unknown_overrides:
        raise PeftlabError(f"The recipe has options for {', '.join(unknown_overrides)}, which this comparison does "
                           f"not run (methods: {', '.join(names)}).")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise PeftlabError(f"--repeats must be a positive whole number; got {repeats!r}.")
    tune, trials = check_tune(tune, trials)
    if tune and "lr" in options:
        raise PeftlabError("--tune lr searches each method's learning rate: drop --lr (a recipe may still give one "
                           "method its rate, which becomes the centre of its search).")
    workers = check_workers(workers)
    use_ray = ray not in (None, False)
    if not isolate and (workers > 1 or use_ray):
        raise PeftlabError("--workers and --ray run each job in its own process: drop --no-isolate.")
    task_names = parse_tasks(tasks, suite, options.pop("task", None))
    several = len(task_names) > 1
    plans = [plan_task(name, names, options, per_method) for name in task_names]
    available = [plan for plan in plans if not plan.missing]
    if not available:
        raise PeftlabError(" ".join(plan.missing for plan in plans))
    scored: dict[str, dict[str, int] | None] = {plan.name: None for plan in available}
    generation_notes: list[str] = []
    if generate:
        refusals = {plan.name: generation_refusal(plan.task) for plan in available}
        if all(refusals.values()):
            raise PeftlabError(f"--generate {generate}: {' '.join(refusals.values())} Leave out --generate.")
        scored = {name: None if why else {"examples": generate, "max_new_tokens": max_new_tokens}
                  for name, why in refusals.items()}
        generation_notes = [f"--generate leaves out {name}: {why}" for name, why in refusals.items() if why]

    out = Path(output or default_output(task_names, suite)).expanduser()
    earlier = [p for folder in ("runs", "tuning") if (out / folder).is_dir()
               for p in (out / folder).rglob("*.json") if p.name in (RESULT_FILE, TUNE_FILE)]
    if earlier and not resume:
        raise PeftlabError(f"'{out}' already holds a comparison ({len(earlier)} finished job(s)). Continue it with "
                           "--resume, or choose another --output.")

    notes: list[str] = []
    ray_module, ray_started = None, False
    if use_ray:
        from peftlab.compare.ray_backend import LOCAL, connect, plan_ray_workers

        address = None if ray in (True, "", LOCAL) else str(ray)
        ray_module, ray_started = connect(address)
        plan = plan_ray_workers(ray_module, workers if workers > 1 else None)
        backend_text = f"on Ray ({'a local instance' if address is None else address}): {plan.why}"
    else:
        plan = plan_workers(workers)
        backend_text = (f"{plan.count} at once ({plan.why})" if plan.count > 1 else "one at a time")
    notes += plan.notes + generation_notes
    first = available[0]
    first_config = first.configs[names[0]]
    seeds = [first_config.seed + k for k in range(repeats)]
    settings = {
        "task": first.name, "tasks": task_names, "suite": suite, "model": first_config.model, "kind": first.task.kind,
        "metric_name": first.task.metric_name, "higher_is_better": first.task.higher_is_better,
        "task_info": {p.name: p.info() for p in plans}, "methods": names, "repeats": repeats, "seeds": seeds,
        "max_train_samples": first_config.max_train_samples, "max_eval_samples": first_config.max_eval_samples,
        "epochs": first_config.epochs, "batch_size": first_config.batch_size, "max_length": first_config.max_length,
        "precision": first_config.precision, "isolate": isolate, "output": str(out), "latency": latency,
        "worker_threads": {"threads": plan.slots[0]["threads"], "why": plan.why},
        "backend": "ray" if use_ray else ("local" if plan.count > 1 else "sequential"), "workers": plan.count,
        "backend_text": backend_text, "ray_address": (str(ray) if use_ray and ray not in (True, "") else None),
        "tune": {"parameter": tune, "trials": trials} if tune else None, "notes": notes,
        "defaults_applied": first.defaults_applied, "per_method_options": per_method,
        "options": dict(first.options),
        "generate": {"examples": generate, "max_new_tokens": max_new_tokens} if generate else None,
    }
    extra = {"task": None if several else first.name, "suite": suite, "tasks": None if suite or not several else
             ",".join(task_names), "tune": tune, "trials": trials if tune else None,
             "workers": workers if workers > 1 else None, "ray": (True if settings["ray_address"] is None else
                                                                   settings["ray_address"]) if use_ray else None}
    run = Comparison(out=out, settings=settings, plans=plans, names=names, seeds=seeds, started=started,
                     command=invocation(), resolved=resolved_command(
                         names, out, repeats, {k: v for k, v in first.options.items() if k != "task"}, per_method,
                         extra))
    print_line = echo or print_now
    print_line(plan_banner(settings, {p.name: p.reasons for p in available}, len(available) * len(names) * repeats,
                           notes + [f"{p.name}: left out: {p.missing}" for p in plans if p.missing]))
    out.mkdir(parents=True, exist_ok=True)
    run.write(partial=True)  # the folder is a comparison from now on (resumable, recognised by the CLI)
    # where each worker process finds a method registered from outside peftlab (refused here if it cannot)
    planned = [name for name in names if any(not p.reasons.get(name) for p in available)]
    sources = {name: method_source(name) for name in planned} if isolate else {}
    common = {"isolated": isolate, "latency": latency, "resume": bool(resume)}

    def execute(jobs: list[Job], phase: str, reuse: Callable[[Job], dict | None], save: str) -> None:
        progress = Progress(jobs, echo=echo, live=live, workers=plan.count, phase=phase)
        try:
            todo = []
            for job in jobs:
                previous = reuse(job) if resume else None
                if previous is not None:
                    run.record(job, previous)
                    progress.reused(job, one_line(previous))
                    continue
                if resume and (job.run_dir / save).is_file():
                    progress.note(f"{progress.prefix(job)}: failed earlier, running it again")
                todo.append(job)

            def done(job: Job, result: dict[str, Any]) -> None:
                write_json_file(job.run_dir / save, result)  # atomic: a finished job is never half-written
                run.record(job, result)
                progress.done(job, result, one_line(result))
                run.write(partial=True)

            if use_ray:
                from peftlab.compare.ray_backend import run_on_ray

                run_on_ray(todo, ray_module, plan, on_start=lambda job: progress.start(job, "queued on Ray"),
                           on_done=done,
                           failed=lambda job, error: failed_result(job.spec, error, job.run_dir))
            else:
                run_jobs(todo, plan, lambda job, slot: run_job(job.spec, job.run_dir, isolate=isolate,
                                                               threads=slot["threads"],
                                                               environment=slot["environment"]),
                         on_start=progress.start, on_done=done)
        finally:
            progress.close()

    from peftlab import tracking

    comparison_name = comparison_name or out.name
    report_to = options.get("report_to")
    try:
        # --report-to: every run is a run of the comparison's experiment / group, the table its summary
        with tracking.comparison(report_to, comparison_name, out):
            if tune:
                jobs = [make_job("tune", p, name, seeds[0], p.configs[name], out=out, several_tasks=several,
                                 repeats=repeats, common={**common, "tune": {"parameter": tune, "trials": trials},
                                                          "method_source": sources.get(name)})
                        for p in available for name in names if not p.reasons.get(name)]
                execute(jobs, "tuning", lambda job: reusable_tuning(job, trials), TUNE_FILE)
            jobs = []
            for p in available:
                for name in names:
                    if p.reasons.get(name):
                        continue
                    config, source = run.final_config(p, name, options, per_method)
                    jobs += [make_job("run", p, name, seed, config, out=out, several_tasks=several, repeats=repeats,
                                      common={**common, "lr_source": source, "method_source": sources.get(name),
                                              "generate": scored.get(p.name)})
                             for seed in seeds]
            execute(jobs, "runs", reusable_run, RESULT_FILE)
            payload = run.write(partial=False)
            if several and multitask:
                from peftlab.compare.multitask import multitask_costs

                print_line("Measuring the multi-task serving cost (one serve process per method, all tasks "
                           "loaded)...")
                payload["multitask"] = multitask_costs(out, first_config.model, [p.name for p in available], names,
                                                       payload["results"])
                write_json_file(out / "results.json", payload)
            if tracking.parse_report_to(report_to):
                tracking.log_comparison(report_to, comparison_name, out, payload["results"])
    finally:
        if ray_started:
            ray_module.shutdown()
    from peftlab.report import write_report

    files = write_report(out, payload)
    print_line(summary(payload, files))
    return payload


def config_of(job: Job):
    from peftlab.training import config_from_options

    return config_from_options(job.spec["options"])


def reusable_run(job: Job) -> dict[str, Any] | None:
    """A finished run ``--resume`` keeps: same training, and the generations ``--generate`` asks for."""
    previous = finished_run(job.run_dir, config_of(job))
    wanted = job.spec.get("generate")
    if previous is None or not wanted:
        return previous
    had = previous.get("generation") or {}
    return previous if had.get("examples_asked") == wanted["examples"] and \
        had.get("max_new_tokens") == wanted["max_new_tokens"] else None


def check_generate(generate, max_new_tokens) -> tuple[int, int]:
    """``--generate N`` (0: off) and ``--max-new-tokens`` as whole numbers, or one sentence."""
    for flag, value, least in (("--generate", generate, 0), ("--max-new-tokens", max_new_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise PeftlabError(f"{flag} must be a whole number of at least {least}; got {value!r}.")
    return generate, max_new_tokens


def reusable_tuning(job: Job, trials: int) -> dict[str, Any] | None:
    previous = finished_run(job.run_dir, config_of(job), file=TUNE_FILE)
    return previous if previous is not None and previous.get("trials") == trials else None


@dataclasses.dataclass
class Comparison:
    """What one comparison has so far, and how it becomes ``results.json``."""

    out: Path
    settings: dict[str, Any]
    plans: list[TaskPlan]
    names: list[str]
    seeds: list[int]
    started: float
    command: str | None
    resolved: str
    runs: dict[tuple, dict[str, Any]] = dataclasses.field(default_factory=dict)  # (task, method, seed) -> result
    tuning: dict[tuple, dict[str, Any]] = dataclasses.field(default_factory=dict)  # (task, method) -> tune.json

    def record(self, job: Job, result: dict[str, Any]) -> None:
        if job.key[0] == "tune":
            self.tuning[(job.task, job.method)] = result
        else:
            result.setdefault("task", job.task)
            self.runs[(job.task, job.method, job.spec["seed"])] = result

    def final_config(self, plan: TaskPlan, name: str, options: dict[str, Any], per_method: dict[str, dict]):
        """The config of the reported runs: the tuned learning rate if tuning chose one; where the rate came from."""
        config = plan.configs[name]
        tuned = self.tuning.get((plan.name, name))
        if tuned and tuned.get("status") == "ok" and tuned.get("chosen_lr"):
            return dataclasses.replace(config, lr=float(tuned["chosen_lr"])), "tuned"
        given = "lr" in options or "lr" in per_method.get(name, {})
        return config, "given" if given else "default"

    def write(self, *, partial: bool) -> dict[str, Any]:
        """``results.json``: one object per method x task x seed (``runs``), one per method x task with the
        seeds aggregated (``results``), the baselines, the tuning, and the suite average."""
        rows, baselines, runs = [], {}, []
        for plan in self.plans:
            if plan.missing:
                continue
            task_rows = []
            for name in self.names:
                task_runs = [self.runs[key] for key in ((plan.name, name, s) for s in self.seeds) if key in self.runs]
                runs += task_runs
                reason = plan.reasons.get(name)
                if not reason and not task_runs:
                    continue
                row = aggregate(name, task_runs, reason, plan.score_metrics)
                if reason:
                    row.update(task=plan.name, metric_name=plan.task.metric_name,
                               higher_is_better=plan.task.higher_is_better)
                tuned = self.tuning.get((plan.name, name))
                if tuned:
                    row["tune"] = {k: tuned.get(k) for k in ("chosen_lr", "default_lr", "best_score", "default_score",
                                                             "trials", "status", "error")}
                task_rows.append(row)
            compare_rows(task_rows, higher_is_better=plan.task.higher_is_better, trivial=plan.baseline)
            rows += task_rows
            baselines[plan.name] = plan.baseline
        payload = {
            "environment": environment(self.command, self.resolved, self.settings),
            "settings": self.settings,
            "complete": not partial,
            "wall_seconds": time.time() - self.started,
            "results": rows,
            "runs": runs,
            "baselines": baselines,
            "tuning": [dict(result, task=task, method=method) for (task, method), result in self.tuning.items()],
            "suite": None,
        }
        if len(self.settings["tasks"]) > 1:
            payload["suite"] = suite_rows(runs, rows, self.settings["task_info"], baselines, self.names, self.seeds)
        write_json_file(self.out / "results.json", payload)
        return payload


def write_results(out: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Write a results payload (e.g. edited by hand) back to ``out/results.json``."""
    write_json_file(Path(out) / "results.json", payload)
    return json.loads((Path(out) / "results.json").read_text())


__all__ = ["DEFAULT_BUDGETS", "COMPARE_DEFAULTS", "RECIPE_FLAGS", "COMPARE_FOLDERS", "default_output", "compare", "resolve_methods", "options_for",
           "worker_threads", "preflight", "unsupported_reason_kind_only", "needs_special_load", "skeleton",
           "run_isolated", "run_in_process", "log_tail", "prepare_run_dir", "identity_of", "flat_options",
           "finished_run", "write_results", "print_now", "config_of", "reusable_run", "reusable_tuning", "check_generate",
           "GENERATE_NEW_TOKENS", "Comparison"]
