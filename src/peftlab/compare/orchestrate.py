"""The comparison itself: check the names, plan the grid (methods x seeds), run each cell in its own process
(or in this one), continue a killed comparison, and write ``results.json`` and the report.

A method the model cannot take is listed as ``unsupported`` before anything trains; a run that crashes or
diverges is a ``failed`` row and the others go on. Every method comes from the registry
(``peftlab.methods``): a method registered from outside peftlab is compared like the built-in ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from peftlab.compare.environment import environment, invocation, resolved_command
from peftlab.compare.measure import LATENCY_SETTINGS
from peftlab.compare.rows import aggregate, compare_rows, eta, one_line, plan_banner, summary
from peftlab.compare.worker import (LOG_FILE, PARENT_PID_ENV, RESULT_FILE, SPEC_FILE, WORKER_ERROR, WORKER_RESULT,
                                    describe_error, failed_result, method_source, run_method, training_identity)
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.report import write_json_file

# The training budget per task kind when the user gives neither --max-train-samples nor --epochs.
# Classification: 2,000 examples x 3 epochs is where the methods separate (LoRA reaches ~0.81 SST-2
# accuracy, prompt tuning is still far behind) and all ten methods fit in the demo's time budget.
# Language models are far slower per example on a CPU (SmolLM2-135M on Alpaca: seconds per example),
# so their default is a smoke-sized budget: raise it (and use a GPU) for a ranking that means much.
DEFAULT_BUDGETS: dict[TaskKind, dict[str, Any]] = {
    TaskKind.SEQ_CLS: {"max_train_samples": 2000, "epochs": 3.0},
    TaskKind.TOKEN_CLS: {"max_train_samples": 2000, "epochs": 3.0},
    TaskKind.CAUSAL_LM: {"max_train_samples": 100, "epochs": 1.0},
    TaskKind.SEQ2SEQ: {"max_train_samples": 500, "epochs": 2.0},
}
# Options compare sets differently from `peftlab train` unless the user gives them: one dev evaluation
# at the end (not per epoch: it would be charged to every method's wall time) and no progress bar (the
# worker's output goes to a log file). Precision stays `auto`: on the AVX512-BF16 CPUs here bf16
# autocast trained LoRA on MiniLM 1.8x faster than fp32 at the same dev accuracy (docs/compare.md).
COMPARE_DEFAULTS: dict[str, Any] = {"eval_each_epoch": False, "progress": False}


def compare(methods: str | list[str] = "all", output: str | os.PathLike | None = None, repeats: int = 1,
            resume: bool = False, train_options: dict[str, Any] | None = None, isolate: bool = True,
            echo: Callable[[str], None] | None = None, latency: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and measure ``methods`` side by side; returns what ``results.json`` holds.

    ``train_options`` are the flat ``peftlab train`` options (``task``, ``model``, ``epochs``,
    ``max_train_samples``, ``lr``, method options such as ``r``...): a method option applies to the
    methods that have it. A key named after a method whose value is a mapping (from a ``--config``
    recipe, e.g. ``lora: {lr: 1e-3}``) overrides options for that method only.
    """
    from peftlab.methods import method_names

    echo = echo or print_now
    started = time.time()
    options = {str(k).replace("-", "_"): v for k, v in (train_options or {}).items() if v is not None}
    per_method = {name: {str(k).replace("-", "_"): v for k, v in options.pop(name).items()}
                  for name in list(options) if name in method_names() and isinstance(options[name], dict)}
    if "method" in options:
        raise PeftlabError("compare trains several methods: choose them with --methods lora,bitfit (not --method).")
    # a compare recipe may name the methods and repeats too (the command line wins)
    latency = {**LATENCY_SETTINGS, **(latency or {})}
    unknown_latency = sorted(set(latency) - set(LATENCY_SETTINGS))
    if unknown_latency:
        raise PeftlabError(f"Unknown latency setting(s) {', '.join(unknown_latency)}; use {', '.join(LATENCY_SETTINGS)}.")
    recipe_methods = options.pop("methods", None)
    recipe_repeats = options.pop("repeats", None)
    if recipe_methods is not None and methods in (None, "all"):
        methods = recipe_methods
    if recipe_repeats is not None and repeats == 1:
        repeats = int(recipe_repeats)
    for key in ("output", "resume", "keep_checkpoints"):
        options.pop(key, None)  # compare decides where each run goes and what resuming means

    names = resolve_methods(methods)
    unknown_overrides = sorted(set(per_method) - set(names))
    if unknown_overrides:
        raise PeftlabError(f"The recipe has options for {', '.join(unknown_overrides)}, which this comparison does "
                           f"not run (methods: {', '.join(names)}).")
    if not isinstance(repeats, int) or repeats < 1:
        raise PeftlabError(f"--repeats must be a positive whole number; got {repeats!r}.")

    from peftlab.tasks import get_task
    from peftlab.training import TrainConfig, config_from_options

    task_name = options.get("task", TrainConfig.task)
    get_task(task_name)  # an unknown task name fails here, listing the valid ones, before any work
    budget_defaults = []
    configs = {name: config_from_options(options_for(name, options, per_method)) for name in names}
    first = configs[names[0]]
    task = get_task(first.task, **first.task_options)
    for key, value in {**DEFAULT_BUDGETS.get(task.kind, {}), **COMPARE_DEFAULTS}.items():
        if key not in options:
            budget_defaults.append(key)
            options[key] = value
    configs = {name: config_from_options(options_for(name, options, per_method)) for name in names}
    first = configs[names[0]]

    out = Path(output or f"runs/compare-{task.name}").expanduser()
    runs_dir = out / "runs"
    finished = sorted(runs_dir.glob(f"*/{RESULT_FILE}")) if runs_dir.is_dir() else []
    if finished and not resume:
        raise PeftlabError(f"'{out}' already holds a comparison ({len(finished)} finished run(s)). Continue it with "
                           "--resume, or choose another --output.")

    reasons = preflight(names, first.model, task, {name: configs[name].method_options for name in names})
    seeds = [first.seed + k for k in range(repeats)]
    plan = []
    for name in names:
        if reasons.get(name):
            continue
        for seed in seeds:
            run_name = name if repeats == 1 else f"{name}-seed{seed}"
            config = dataclasses.replace(configs[name], seed=seed, output=str((runs_dir / run_name).resolve()))
            plan.append((name, seed, run_name, config))
    # where each worker process finds a method registered from outside peftlab (refused here if it cannot)
    sources = {name: method_source(name) for name, *_ in plan} if isolate else {}

    settings = {
        "task": task.name, "model": first.model, "kind": task.kind, "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better, "methods": names, "repeats": repeats, "seeds": seeds,
        "max_train_samples": first.max_train_samples, "max_eval_samples": first.max_eval_samples,
        "epochs": first.epochs, "batch_size": first.batch_size, "max_length": first.max_length,
        "precision": first.precision, "isolate": isolate, "output": str(out), "latency": latency,
        "worker_threads": worker_threads(),
        "defaults_applied": budget_defaults, "per_method_options": per_method,
        "options": {k: v for k, v in options.items()},
    }
    command = invocation()
    resolved = resolved_command(names, out, repeats, options, per_method)
    echo(plan_banner(settings, reasons, len(plan)))
    out.mkdir(parents=True, exist_ok=True)

    runs: dict[str, list[dict]] = {name: [] for name in names}
    times: list[float] = []
    for index, (name, seed, run_name, config) in enumerate(plan, start=1):
        run_dir = runs_dir / run_name
        label = f"[{index}/{len(plan)}] {run_name}"
        previous = finished_run(run_dir, config) if resume else None
        if previous is not None:
            echo(f"{label}: finished earlier, reused ({one_line(previous)})")
            runs[name].append(previous)
            continue
        if resume and (run_dir / RESULT_FILE).is_file():
            echo(f"{label}: failed earlier, running it again")
        spec = {"options": flat_options(config), "resume": bool(resume), "run_name": run_name,
                "seed": seed, "isolated": isolate, "latency": latency, "method_source": sources.get(name)}
        echo(f"{label}: training ({eta(times, len(plan) - index + 1)})")
        began = time.perf_counter()
        threads = settings["worker_threads"]["threads"]
        result = run_isolated(spec, run_dir, threads=threads) if isolate else run_in_process(spec, run_dir, threads)
        times.append(time.perf_counter() - began)
        result.setdefault("wall_seconds", times[-1])
        write_json_file(run_dir / RESULT_FILE, result)  # atomic: a finished run is never half-written
        runs[name].append(result)
        echo(f"{label}: {one_line(result)}")
        write_results(out, settings, command, resolved, started, runs, reasons, names, partial=True)

    payload = write_results(out, settings, command, resolved, started, runs, reasons, names, partial=False)
    from peftlab.report import write_report

    files = write_report(out, payload)
    echo(summary(payload, files))
    return payload


def print_now(message: str) -> None:
    print(message, flush=True)


def resolve_methods(methods: str | list[str] | None) -> list[str]:
    """'all', 'lora,bitfit' or a list -> validated, de-duplicated names (unknown ones list the valid)."""
    from peftlab.methods import parse_methods

    if methods is None:
        methods = "all"
    if isinstance(methods, str):
        methods = [part.strip() for part in methods.split(",") if part.strip()]
    methods = list(methods)
    if not methods:
        raise PeftlabError("--methods is empty: give 'all' or a comma list such as lora,bitfit.")
    if "all" in methods:
        if methods != ["all"]:
            raise PeftlabError("--methods 'all' cannot be combined with other names.")
        return parse_methods("all")
    names = parse_methods(methods)  # raises PeftlabError naming the valid methods
    return list(dict.fromkeys(names))


def options_for(name: str, options: dict[str, Any], per_method: dict[str, dict]) -> dict[str, Any]:
    """The flat options for one method: training options, plus the method options it has."""
    from peftlab.methods import get_method_class, method_names
    from peftlab.training import TrainConfig

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    own = {f.name for f in get_method_class(name).option_fields()}
    other = set()
    for other_name in method_names():
        other |= {f.name for f in get_method_class(other_name).option_fields()}
    foreign = other - own - train_fields  # another method's option: not for this one
    chosen = {k: v for k, v in options.items() if k not in foreign}
    chosen.update(per_method.get(name, {}))
    chosen["method"] = name
    return chosen


def worker_threads() -> dict[str, Any]:
    """How many threads each worker's torch uses, and why.

    PyTorch runs one OpenMP thread per core, and OpenMP threads spin while they wait for each other.
    On a CPU that other processes already keep busy (load average at or above the core count) that
    spinning costs far more than the second thread gains: measured on the shared 2-core machines
    here, a LoRA step took 5 to 20 times longer with 2 threads than with 1. So on a busy machine the
    workers run single-threaded. ``OMP_NUM_THREADS`` set by the user always wins. Decided once per
    comparison, so every method runs under the same setting, which ``results.json`` records.
    """
    from peftlab import hardware

    if os.environ.get("OMP_NUM_THREADS"):
        return {"threads": None, "why": f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} (yours)"}
    cores = hardware.cpu_count()
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on this platform
        load = 0.0
    if cores > 1 and load >= cores:
        return {"threads": 1, "why": f"the machine is busy (load average {load:.1f} on {cores} cores): one thread per "
                                     "worker avoids OpenMP spin-waiting; set OMP_NUM_THREADS to choose"}
    return {"threads": None, "why": "torch's default (one per core)"}


# ---- before any training: what can run at all --------------------------------------------------------------

def preflight(names: list[str], model: str, task, method_options: dict[str, dict] | None = None
              ) -> dict[str, str | None]:
    """Why each method cannot run on ``model`` for ``task`` (None: it can), checked on a weightless copy.

    The model is built from its config on PyTorch's meta device (no weights are read), which is all
    ``check_supported`` looks at. Methods that need a special load (QLoRA's 4-bit base) get only the
    task-kind check here; anything else they reject shows up as a failed run. A model whose config
    cannot be read here (a Hub id offline) is not pre-checked: the runs report what goes wrong.
    """
    from peftlab.catalog import unsupported_reason
    from peftlab.methods import get_method

    reasons: dict[str, str | None] = {}
    model_skeleton = skeleton(model, task)
    for name in names:
        method = get_method(name, **(method_options or {}).get(name, {}))
        if model_skeleton is None or needs_special_load(method):
            reasons[name] = unsupported_reason_kind_only(method, task.kind)
        else:
            reasons[name] = unsupported_reason(method, model_skeleton, task.kind)
    return reasons


def unsupported_reason_kind_only(method, kind: str) -> str | None:
    """The model-independent part of ``check_supported``: does the method handle this task kind."""
    from peftlab.methods.base import Method

    try:
        Method.check_supported(method, None, kind)
    except PeftlabError as error:
        return str(error)
    return None


def needs_special_load(method) -> bool:
    try:
        return bool(method.model_load_kwargs())
    except Exception:  # noqa: BLE001 - e.g. bitsandbytes missing: the run itself will say so
        return True


def skeleton(model: str, task):
    """The task model built from ``model``'s config on the meta device, or None if the config is unreachable."""
    try:
        import torch
        import transformers

        from peftlab.catalog import task_labels
        from peftlab.models import resolve_model

        kind = TaskKind(task.kind)
        config = transformers.AutoConfig.from_pretrained(resolve_model(model))
        if kind.is_classification:
            config.num_labels = 1 if task.is_regression else len(task_labels(task))
        auto_class = getattr(transformers, kind.auto_class)
        with torch.device("meta"):
            return auto_class.from_config(config)
    except PeftlabError:
        raise
    except Exception:  # noqa: BLE001 - offline Hub id, exotic config: the runs will report the problem
        return None


# ---- one run: in a worker process (default) or in this process ---------------------------------------

def run_isolated(spec: dict[str, Any], run_dir: Path, threads: int | None = None) -> dict[str, Any]:
    """Run one method in a fresh ``python -m peftlab.compare worker`` process; never raises for its failures."""
    spec_path = prepare_run_dir(run_dir, spec)
    log_path = run_dir / LOG_FILE
    child_environment = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                         PARENT_PID_ENV: str(os.getpid())}
    if threads:
        child_environment["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "a") as log:
        process = subprocess.Popen([sys.executable, "-m", "peftlab.compare", "worker", str(spec_path)],
                                   stdout=log, stderr=subprocess.STDOUT, env=child_environment)
        try:
            returncode = process.wait()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    result_path = run_dir / WORKER_RESULT
    if returncode == 0 and result_path.is_file():
        result = json.loads(result_path.read_text())
        result_path.unlink()
        return result
    error_path = run_dir / WORKER_ERROR
    if error_path.is_file():
        error = error_path.read_text().strip()
    elif returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        error = f"the worker process was killed by {name}" + (
            " (out of memory? the kernel's OOM killer sends SIGKILL)" if returncode == -signal.SIGKILL else "")
    else:
        error = f"the worker process exited with status {returncode}: {log_tail(log_path)}"
    return failed_result(spec, error, run_dir)


def run_in_process(spec: dict[str, Any], run_dir: Path, threads: int | None = None) -> dict[str, Any]:
    """``--no-isolate``: the same steps in this process (faster start; peak memory is no longer per method)."""
    import torch

    prepare_run_dir(run_dir, spec)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run_method(spec)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - one method's failure is a result, not the end of the comparison
        traceback.print_exc()
        return failed_result(spec, describe_error(error), run_dir)
    finally:
        torch.set_num_threads(previous)


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


# ---- resuming ---------------------------------------------------------------------------------------------

def prepare_run_dir(run_dir: Path, spec: dict[str, Any]) -> Path:
    """A clean folder for a fresh run, or the folder of a killed run that can continue; returns the spec file.

    With --resume, a run folder is continued (from its step checkpoints, or from its finished training
    when only the measurements are missing) only if it was started with the same training options;
    anything else starts over.
    """
    spec_path = run_dir / SPEC_FILE
    resumable = False
    if spec["resume"] and ((run_dir / "checkpoints").is_dir() or (run_dir / "metrics.json").is_file()):
        try:
            earlier = json.loads(spec_path.read_text())
            resumable = identity_of(earlier) == identity_of(spec)
        except (OSError, json.JSONDecodeError, PeftlabError):
            resumable = False
    if run_dir.exists() and not resumable:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (WORKER_RESULT, WORKER_ERROR, RESULT_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    spec["resume"] = resumable
    write_json_file(spec_path, spec)
    return spec_path


def identity_of(spec: dict[str, Any]) -> dict[str, Any]:
    from peftlab.training import config_from_options

    return training_identity(config_from_options(spec["options"]))


def flat_options(config) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    method_options = values.pop("method_options")
    task_options = values.pop("task_options")
    return {**values, "method_options": method_options, "task_options": task_options}


def finished_run(run_dir: Path, config) -> dict[str, Any] | None:
    """A run's result from an earlier (killed) comparison, if it finished and was trained the same way."""
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if previous.get("status") != "ok":
        return None
    wanted = training_identity(config)
    had = previous.get("train_config") or {}
    differences = [f"{key} {had.get(key)!r} -> {wanted.get(key)!r}" for key in sorted(set(wanted) | set(had))
                   if key != "data_dir" and had.get(key) != wanted.get(key)]
    if differences:
        raise PeftlabError(
            f"'{run_dir}' was trained with other options than this comparison asks for ({'; '.join(differences)}). "
            "Resume with the same options, or choose another --output.")
    return previous


# ---- results.json ------------------------------------------------------------------------------------------

def write_results(out: Path, settings, command, resolved, started, runs, reasons, names, *, partial):
    rows = [aggregate(name, runs[name], reasons.get(name)) for name in names
            if reasons.get(name) or runs[name]]
    compare_rows(rows, higher_is_better=settings["higher_is_better"])
    payload = {
        "environment": environment(command, resolved, settings),
        "settings": settings,
        "complete": not partial,
        "wall_seconds": time.time() - started,
        "results": rows,
    }
    write_json_file(out / "results.json", payload)
    return payload


__all__ = ["DEFAULT_BUDGETS", "COMPARE_DEFAULTS", "compare", "resolve_methods", "options_for", "worker_threads",
           "preflight", "unsupported_reason_kind_only", "needs_special_load", "skeleton", "run_isolated",
           "run_in_process", "log_tail", "prepare_run_dir", "identity_of", "flat_options", "finished_run",
           "write_results", "print_now"]
