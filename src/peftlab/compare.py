"""``peftlab compare``: every chosen method trained on the same data, budget and seed, measured side by side.

What one comparison does
------------------------
1. Checks the names (methods, task, options) and which methods can run on the model at all, before
   any training: a method the model cannot take (BitFit on Llama, prompt tuning on token
   classification) is listed as ``unsupported`` with ``check_supported``'s reason, not dropped.
2. Trains each method (and each seed, with ``--repeats``) with its own default hyperparameters, in
   its own process by default (``python -m peftlab.compare worker SPEC``), so peak memory (process
   RSS on CPU, CUDA max allocated on GPU) is the method's own, and a crash, an out-of-memory kill or
   a diverged (NaN) run is recorded as ``failed`` with its error while the others go on.
3. In the same process, after training: reloads the run folder (``peftlab.inference.load_trained``),
   checks the weights are finite, times inference at batch 1 and batch 32 on dev inputs (median of
   repeated runs after warm-up), unmerged and, for mergeable methods, merged (``method.merge`` on a
   freshly loaded copy), and for language models generates from three dev prompts.
4. Persists each finished run as ``DIR/runs/<method>[-seed<k>]/result.json`` (atomically), so a
   killed comparison continues with ``--resume`` at the first unfinished run.
5. Writes ``results.json``, ``results.csv``, ``report.md``, ``report.html`` and the plots
   (``peftlab.report``).

The default budget (when neither ``--max-train-samples`` nor ``--epochs`` is given) is sized so that
``make demo`` (all ten methods on SST-2 with MiniLM) finishes in about a quarter of an hour on a
2-core CPU and still ranks the methods meaningfully; see docs/compare.md for the measured numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from peftlab.errors import PeftlabError
from peftlab.report import write_json_file

# The training budget per task kind when the user gives neither --max-train-samples nor --epochs.
# Classification: 2,000 examples x 3 epochs is where the methods separate (LoRA reaches ~0.81 SST-2
# accuracy, prompt tuning is still far behind) and all ten methods fit in the demo's time budget.
# Language models are far slower per example on a CPU (SmolLM2-135M on Alpaca: seconds per example),
# so their default is a smoke-sized budget: raise it (and use a GPU) for a ranking that means much.
DEFAULT_BUDGETS: dict[str, dict[str, Any]] = {
    "seq-cls": {"max_train_samples": 2000, "epochs": 3.0},
    "token-cls": {"max_train_samples": 2000, "epochs": 3.0},
    "causal-lm": {"max_train_samples": 100, "epochs": 1.0},
    "seq2seq": {"max_train_samples": 500, "epochs": 2.0},
}
# Options compare sets differently from `peftlab train` unless the user gives them: one dev evaluation
# at the end (not per epoch: it would be charged to every method's wall time) and no progress bar (the
# worker's output goes to a log file). Precision stays `auto`: on the AVX512-BF16 CPUs here bf16
# autocast trained LoRA on MiniLM 1.8x faster than fp32 at the same dev accuracy (docs/compare.md).
COMPARE_DEFAULTS: dict[str, Any] = {"eval_each_epoch": False, "progress": False}

LATENCY_ROWS = 32  # dev inputs used for timing: one batch of 32, and single rows cycled for batch 1
# Timing: median of up to N runs after warm-up; a setting stops early (after 3 runs) once its budget
# is spent, so a slow model (a 4-bit base dequantised on the fly on a CPU) cannot stall a comparison.
LATENCY_SETTINGS: dict[str, Any] = {"bs1_warmup": 3, "bs1_runs": 20, "bs32_warmup": 1, "bs32_runs": 5,
                                    "budget_s": 5.0}
SAMPLE_PROMPTS = 3  # generations shown for language-model tasks
SAMPLE_NEW_TOKENS = 32

RESULT_FILE = "result.json"
WORKER_RESULT = "worker-result.json"
WORKER_ERROR = "error.txt"
LOG_FILE = "compare.log"
SPEC_FILE = "compare-spec.json"
PARENT_PID_ENV = "PEFTLAB_COMPARE_PARENT"

# Keys of a run's metrics.json (peftlab.training.train), present (None where unknown) in every row.
METRIC_KEYS = (
    "method", "task", "model", "kind", "category", "metric_name", "metric", "higher_is_better", "metrics",
    "trainable_params", "total_params", "trainable_fraction", "train_examples", "eval_examples", "epochs",
    "steps", "effective_batch_size", "learning_rate", "precision", "device", "train_seconds", "eval_seconds",
    "train_samples_per_second", "train_tokens_per_second", "peak_memory_mb", "final_train_loss", "history",
    "method_options", "resumed", "seed", "peftlab_version",
)
# What compare adds to every row.
COMPARE_KEYS = (
    "status", "error", "reason", "mergeable", "inference_cost", "adapter_bytes",
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
# TrainConfig fields that do not change what is trained (excluded when --resume checks a finished run).
_NOT_TRAINING = ("output", "resume", "progress", "keep_checkpoints", "logging_steps", "save_steps")


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf."""


# ---- the comparison --------------------------------------------------------------------------------

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

    echo = echo or _print
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
    echo(_plan_banner(settings, reasons, len(plan)))
    out.mkdir(parents=True, exist_ok=True)

    runs: dict[str, list[dict]] = {name: [] for name in names}
    times: list[float] = []
    for index, (name, seed, run_name, config) in enumerate(plan, start=1):
        run_dir = runs_dir / run_name
        label = f"[{index}/{len(plan)}] {run_name}"
        previous = _finished_run(run_dir, config) if resume else None
        if previous is not None:
            echo(f"{label}: finished earlier, reused ({_one_line(previous)})")
            runs[name].append(previous)
            continue
        if resume and (run_dir / RESULT_FILE).is_file():
            echo(f"{label}: failed earlier, running it again")
        spec = {"options": _flat_options(config), "resume": bool(resume), "run_name": run_name,
                "seed": seed, "isolated": isolate, "latency": latency}
        echo(f"{label}: training ({_eta(times, len(plan) - index + 1)})")
        began = time.perf_counter()
        threads = settings["worker_threads"]["threads"]
        result = run_isolated(spec, run_dir, threads=threads) if isolate else run_in_process(spec, run_dir, threads)
        times.append(time.perf_counter() - began)
        result.setdefault("wall_seconds", times[-1])
        write_json_file(run_dir / RESULT_FILE, result)  # atomic: a finished run is never half-written
        runs[name].append(result)
        echo(f"{label}: {_one_line(result)}")
        _write_results(out, settings, command, resolved, started, runs, reasons, names, partial=True)

    payload = _write_results(out, settings, command, resolved, started, runs, reasons, names, partial=False)
    from peftlab.report import write_report

    files = write_report(out, payload)
    echo(_summary(payload, files))
    return payload


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
    skeleton = _skeleton(model, task)
    for name in names:
        method = get_method(name, **(method_options or {}).get(name, {}))
        if skeleton is None or _needs_special_load(method):
            reasons[name] = unsupported_reason_kind_only(method, task.kind)
        else:
            reasons[name] = unsupported_reason(method, skeleton, task.kind)
    return reasons


def unsupported_reason_kind_only(method, kind: str) -> str | None:
    """The model-independent part of ``check_supported``: does the method handle this task kind."""
    from peftlab.methods.base import Method

    try:
        Method.check_supported(method, None, kind)
    except PeftlabError as error:
        return str(error)
    return None


def _needs_special_load(method) -> bool:
    try:
        return bool(method.model_load_kwargs())
    except Exception:  # noqa: BLE001 - e.g. bitsandbytes missing: the run itself will say so
        return True


def _skeleton(model: str, task):
    """The task model built from ``model``'s config on the meta device, or None if the config is unreachable."""
    try:
        import torch
        import transformers

        from peftlab.catalog import task_labels
        from peftlab.models import AUTO_CLASSES, resolve_model

        config = transformers.AutoConfig.from_pretrained(resolve_model(model))
        labels = task_labels(task)
        if task.kind in ("seq-cls", "token-cls"):
            config.num_labels = 1 if task.is_regression else len(labels)
        auto_class = getattr(transformers, AUTO_CLASSES[task.kind])
        with torch.device("meta"):
            return auto_class.from_config(config)
    except PeftlabError:
        raise
    except Exception:  # noqa: BLE001 - offline Hub id, exotic config: the runs will report the problem
        return None


# ---- one run: in a worker process (default) or in this process ---------------------------------------

def run_isolated(spec: dict[str, Any], run_dir: Path, threads: int | None = None) -> dict[str, Any]:
    """Run one method in a fresh ``python -m peftlab.compare worker`` process; never raises for its failures."""
    spec_path = _prepare_run_dir(run_dir, spec)
    log_path = run_dir / LOG_FILE
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                   PARENT_PID_ENV: str(os.getpid())}
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "a") as log:
        process = subprocess.Popen([sys.executable, "-m", "peftlab.compare", "worker", str(spec_path)],
                                   stdout=log, stderr=subprocess.STDOUT, env=environment)
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
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
        error = f"the worker process was killed by {name}" + (
            " (out of memory? the kernel's OOM killer sends SIGKILL)" if returncode == -signal.SIGKILL else "")
    else:
        error = f"the worker process exited with status {returncode}: {_tail(log_path)}"
    return failed_result(spec, error, run_dir)


def run_in_process(spec: dict[str, Any], run_dir: Path, threads: int | None = None) -> dict[str, Any]:
    """``--no-isolate``: the same steps in this process (faster start; peak memory is no longer per method)."""
    import torch

    _prepare_run_dir(run_dir, spec)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run_method(spec)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - one method's failure is a result, not the end of the comparison
        traceback.print_exc()
        return failed_result(spec, _describe(error), run_dir)
    finally:
        torch.set_num_threads(previous)


def _prepare_run_dir(run_dir: Path, spec: dict[str, Any]) -> Path:
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
            resumable = _identity_of(earlier) == _identity_of(spec)
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


def _identity_of(spec: dict[str, Any]) -> dict[str, Any]:
    from peftlab.training import config_from_options

    return training_identity(config_from_options(spec["options"]))


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM when compare dies, so a killed comparison leaves no training behind.

    Set by the worker itself (not a ``preexec_fn``, which is unsafe in a process with threads); a parent
    that died before this point is caught by comparing the parent's pid.
    """
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        return
    if str(os.getppid()) != expected:
        sys.exit(143)


def worker_main(argv: list[str]) -> int:
    """``python -m peftlab.compare worker SPEC.json``: train and measure one method, write its result."""
    if len(argv) != 2 or argv[0] != "worker":
        print("usage: python -m peftlab.compare worker SPEC.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[1])
    _die_with_parent()
    spec = json.loads(spec_path.read_text())
    run_dir = spec_path.parent
    _quiet_libraries()
    try:
        result = run_method(spec)
    except KeyboardInterrupt:
        return 130
    except BaseException as error:  # noqa: BLE001 - reported to the parent as this method's failure
        traceback.print_exc()
        from peftlab.artifacts import atomic_write_text

        atomic_write_text(run_dir / WORKER_ERROR, _describe(error) + "\n")
        return 1
    write_json_file(run_dir / WORKER_RESULT, result)
    return 0


def run_method(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one method, check it did not diverge, then measure it (adapter size, latency, samples)."""
    import torch

    from peftlab import hardware
    from peftlab.methods import get_method_class
    from peftlab.training import config_from_options, train

    config = config_from_options(spec["options"])
    run_dir = config.output_dir()
    resumable = spec.get("resume") and ((run_dir / "checkpoints").is_dir() or (run_dir / "metrics.json").is_file())
    config = dataclasses.replace(config, resume=bool(resumable))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # per method even without isolation
    began = time.perf_counter()
    cpu_began = time.process_time()
    metrics = train(config)
    cpu_seconds = time.process_time() - cpu_began
    problem = divergence(metrics, run_dir / "log.jsonl")
    if problem:
        raise TrainingDiverged(problem)
    method_class = get_method_class(config.method)
    result = {key: metrics.get(key) for key in METRIC_KEYS}
    result.update({key: value for key, value in metrics.items() if key not in result})
    result.update(
        status="ok", error=None, reason=None, mergeable=bool(method_class.mergeable),
        adapter_bytes=folder_bytes(run_dir / "adapter"), isolated=bool(spec.get("isolated", True)),
        train_config=training_identity(config), run_dir=f"runs/{spec['run_name']}",
        log=f"runs/{spec['run_name']}/{LOG_FILE}" if spec.get("isolated", True) else None,
        cpu_seconds=cpu_seconds, threads=torch.get_num_threads(),
    )
    if not spec.get("isolated", True) and hardware.device_type() == "cpu":
        result["peak_memory_note"] = ("not isolated: peak RSS of the whole compare process so far, "
                                      "not of this method alone")
    result.update(measure_inference(run_dir, config, latency=spec.get("latency")))
    result["wall_seconds"] = time.perf_counter() - began
    return result


def measure_inference(run_dir: Path, config, latency: dict[str, Any] | None = None) -> dict[str, Any]:
    """Latency at batch 1 and 32 (unmerged and merged), extra inference cost, and sample generations.

    Every model is reloaded from the run folder, as a user would deploy it. The merged timing uses a
    second fresh copy (``method.merge`` consumes the model it is given).
    """
    import gc

    from peftlab.inference import load_trained, predict

    loaded = load_trained(run_dir)
    bad = non_finite_parameters(loaded.model)
    if bad:
        raise TrainingDiverged(f"training diverged: {len(bad)} trained tensor(s) hold NaN/inf after training "
                               f"(for example {bad[0]}); try a lower --lr")
    inputs = latency_inputs(loaded, config)
    result: dict[str, Any] = {"inference_cost": loaded.method.inference_cost(), "latency_precision": "fp32"}
    settings = {**LATENCY_SETTINGS, **(latency or {})}
    bs1, bs32, runs = time_model(loaded.model, inputs, **settings)
    result.update(latency_ms_bs1=bs1, latency_ms_bs32=bs32, latency_runs=runs,
                  latency_ms_bs1_merged=None, latency_ms_bs32_merged=None, samples=None)
    if loaded.kind in ("causal-lm", "seq2seq"):
        prompts = inputs["raw"][:SAMPLE_PROMPTS]
        key = "prompt" if loaded.kind == "causal-lm" else "source"
        generated = predict(loaded, [{key: row[key]} for row in prompts], max_new_tokens=SAMPLE_NEW_TOKENS,
                            batch_size=SAMPLE_PROMPTS)
        reference_key = "response" if loaded.kind == "causal-lm" else "target"
        result["samples"] = [{"prompt": row[key], "generated": out.get("generated"),
                              "reference": row.get(reference_key)} for row, out in zip(prompts, generated)]
    mergeable = bool(loaded.method.mergeable)
    del loaded
    gc.collect()
    if mergeable:
        fresh = load_trained(run_dir)
        model = fresh.model
        merged = fresh.method.merge(model)
        if merged is model and not _is_peft(model):
            # BitFit, full fine-tuning: the trained model already is a plain model, merging changes nothing
            result.update(latency_ms_bs1_merged=result["latency_ms_bs1"],
                          latency_ms_bs32_merged=result["latency_ms_bs32"], latency_merged_note="same model")
        else:
            merged.eval()
            bs1, bs32, _ = time_model(merged, inputs, **settings)
            result.update(latency_ms_bs1_merged=bs1, latency_ms_bs32_merged=bs32)
        del fresh, model, merged
        gc.collect()
    return result


def _is_peft(model) -> bool:
    try:
        import peft

        return isinstance(model, peft.PeftModel)
    except ImportError:  # pragma: no cover
        return False


def latency_inputs(loaded, config) -> dict[str, Any]:
    """The first LATENCY_ROWS dev examples (the evaluation subset's order), tokenized without labels."""
    from peftlab.inference import task_for_manifest
    from peftlab.preprocess import collator, tokenize
    from peftlab.tasks.base import select

    task = task_for_manifest(loaded.manifest, None, None)
    dev = select(task.load("dev", config.data_dir), config.max_eval_samples, config.seed)
    raw = dev.select(range(min(LATENCY_ROWS, len(dev))))
    tokenized = tokenize(raw, loaded.kind, loaded.tokenizer, max_length=loaded.manifest.max_length,
                         label_names=loaded.label_names, is_regression=loaded.manifest.is_regression,
                         with_labels=False)
    collate = collator(loaded.kind, loaded.tokenizer)

    def batch(rows):  # model inputs only (the seq2seq collator adds labels=None)
        return {k: v for k, v in collate(rows).items() if k != "labels" and hasattr(v, "to")}

    rows = [tokenized[i] for i in range(len(tokenized))]
    return {"raw": [raw[i] for i in range(len(raw))], "batch": batch(rows), "singles": [batch([row]) for row in rows[:16]]}


def time_model(model, inputs: dict[str, Any], *, bs1_warmup: int = 3, bs1_runs: int = 20, bs32_warmup: int = 1,
               bs32_runs: int = 5, budget_s: float = 5.0) -> tuple[float, float, dict[str, int]]:
    """Median milliseconds of a forward pass at batch 1 (single dev rows, cycled) and at batch 32.

    Each timing is the median of repeated runs after untimed warm-up runs, stopping early (after at
    least 3 runs) once ``budget_s`` is spent. fp32, no autocast,
    no gradients; CUDA is synchronised around every run.
    """
    import torch

    from peftlab.evaluation import model_device

    device = model_device(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.eval()

    def timed(batches: list[dict], warmup: int, runs: int) -> tuple[float, int]:
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        durations: list[float] = []
        with torch.no_grad():
            for i in range(warmup):
                model(**batches[i % len(batches)])
            began = time.perf_counter()
            while len(durations) < max(1, runs):
                batch = batches[len(durations) % len(batches)]
                sync()
                start = time.perf_counter()
                model(**batch)
                sync()
                durations.append(time.perf_counter() - start)
                if len(durations) >= min(3, runs) and time.perf_counter() - began > budget_s:
                    break
        return 1000 * statistics.median(durations), len(durations)

    bs1, n1 = timed(inputs["singles"], bs1_warmup, bs1_runs)
    bs32, n32 = timed([inputs["batch"]], bs32_warmup, bs32_runs)
    return bs1, bs32, {"bs1": n1, "bs32": n32, "bs32_rows": int(inputs["batch"]["input_ids"].shape[0])}


def divergence(metrics: dict[str, Any], log_path: Path) -> str | None:
    """Why the run diverged (NaN/inf in the loss, the gradient norm or the metric), or None.

    The loss alone is not enough: the Trainer's ``logging_nan_inf_filter`` (on by default) replaces a
    NaN/inf step loss by the running mean, so a run whose weights have become NaN can log a loss of
    0.0. Its gradient norm is logged unfiltered. Under fp16 loss scaling a step with an infinite
    gradient is skipped and is normal, so there only the last logged step counts.
    """
    for key in ("final_train_loss", "metric"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return f"training diverged: {key.replace('_', ' ')} is {value} (try a lower --lr)"
    for key, value in (metrics.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return f"training diverged: dev {key} is {value} (try a lower --lr)"
    records = []
    if Path(log_path).is_file():
        for line in Path(log_path).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    train_records = [r for r in records if r.get("type") in ("train", "summary")]
    for record in train_records:
        for key in ("loss", "train_loss"):
            value = record.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                return (f"training diverged: {key.replace('_', ' ')} became {value} at step {record.get('step')} "
                        "(try a lower --lr)")
    with_norm = [r for r in train_records if isinstance(r.get("grad_norm"), (int, float))]
    checked = with_norm[-1:] if metrics.get("precision") == "fp16" else with_norm
    for record in checked:
        if not math.isfinite(record["grad_norm"]):
            return (f"training diverged: the gradient norm became {record['grad_norm']} at step {record.get('step')} "
                    f"(learning rate {record.get('learning_rate', '?'):g}); try a lower --lr")
    return None


def non_finite_parameters(model) -> list[str]:
    import torch

    return [name for name, parameter in model.named_parameters()
            if parameter.is_floating_point() and not bool(torch.isfinite(parameter).all())]


def folder_bytes(path: Path) -> int | None:
    path = Path(path)
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def failed_result(spec: dict[str, Any], error: str, run_dir: Path) -> dict[str, Any]:
    """A row for a run that did not finish: what is known (method, category, options) and the error."""
    from peftlab.methods import get_method_class
    from peftlab.training import config_from_options

    config = config_from_options(spec["options"])
    method_class = get_method_class(config.method)
    result = empty_row(config.method)
    result.update(status="failed", error=error, task=config.task, model=config.model, seed=config.seed,
                  train_config=training_identity(config), run_dir=f"runs/{spec['run_name']}",
                  log=f"runs/{spec['run_name']}/{LOG_FILE}" if spec.get("isolated", True) else None,
                  isolated=bool(spec.get("isolated", True)), mergeable=bool(method_class.mergeable))
    metrics_path = Path(run_dir) / "metrics.json"
    if metrics_path.is_file():  # it trained; the failure came after (divergence, inference)
        metrics = json.loads(metrics_path.read_text())
        for key in METRIC_KEYS:
            if metrics.get(key) is not None and key not in ("method",):
                result[key] = metrics[key]
    return result


def empty_row(name: str) -> dict[str, Any]:
    from peftlab.methods import get_method

    method = get_method(name)
    row: dict[str, Any] = {key: None for key in (*METRIC_KEYS, *COMPARE_KEYS)}
    row.update(method=name, category=method.category, mergeable=bool(method.mergeable),
               inference_cost=method.inference_cost())
    return row


def training_identity(config) -> dict[str, Any]:
    """The TrainConfig fields that decide what is trained (what --resume compares)."""
    values = dataclasses.asdict(config)
    for key in _NOT_TRAINING:
        values.pop(key, None)
    return json.loads(json.dumps(values, default=str))


def _flat_options(config) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    method_options = values.pop("method_options")
    task_options = values.pop("task_options")
    return {**values, "method_options": method_options, "task_options": task_options}


def _finished_run(run_dir: Path, config) -> dict[str, Any] | None:
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


# ---- aggregation ------------------------------------------------------------------------------------

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


def _write_results(out: Path, settings, command, resolved, started, runs, reasons, names, *, partial):
    from peftlab.report import pareto_flags

    rows = [aggregate(name, runs[name], reasons.get(name)) for name in names
            if reasons.get(name) or runs[name]]
    full = next((r for r in rows if r["method"] == "full" and r["status"] == "ok"), None)
    for row in rows:
        ok = row["status"] == "ok" and isinstance(row.get("metric"), (int, float))
        row["metric_delta_vs_full"] = row["metric"] - full["metric"] if ok and full else None
    flags = pareto_flags(rows, higher_is_better=settings["higher_is_better"])
    for row, flag in zip(rows, flags):
        row["pareto"] = flag
    payload = {
        "environment": environment(command, resolved, settings),
        "settings": settings,
        "complete": not partial,
        "wall_seconds": time.time() - started,
        "results": rows,
    }
    write_json_file(out / "results.json", payload)
    return payload


# ---- environment and commands -------------------------------------------------------------------------

def environment(command: str | None, resolved: str, settings: dict[str, Any]) -> dict[str, Any]:
    import datetime
    import importlib.metadata
    import platform

    import torch

    from peftlab import __version__, hardware

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    device = hardware.device_type()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "bitsandbytes": version("bitsandbytes"),
        "peftlab": __version__,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "threads": torch.get_num_threads(),
        "worker_threads": _threads_text(settings.get("worker_threads")),
        "cpu_cores": hardware.cpu_count(),
        "cpu": cpu_name(),
        "bf16_native": hardware.bf16_supported(),
        "precision": settings.get("precision"),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or resolved,
        "resolved_command": resolved,
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except (ImportError, OSError):  # pragma: no cover
        pass
    return info


def _threads_text(choice: dict[str, Any] | None) -> str | None:
    if not choice:
        return None
    return f"{choice['threads'] or 'default'}: {choice['why']}"


def cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def invocation() -> str | None:
    """The command line as typed, when compare was started from the ``peftlab`` command."""
    argv = sys.argv
    if argv and Path(argv[0]).name in ("peftlab", "cli.py", "__main__.py") and "compare" in argv[1:]:
        return "peftlab " + shlex.join(argv[1:])
    return None


def resolved_command(names, out: Path, repeats: int, options: dict[str, Any], per_method: dict) -> str:
    """A ``peftlab compare`` command with every option this comparison used spelled out."""
    parts = ["peftlab", "compare", "--methods", ",".join(names), "--output", str(out)]
    if repeats != 1:
        parts += ["--repeats", str(repeats)]
    for key, value in sorted(options.items()):
        if isinstance(value, dict):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            parts += [flag, ",".join(map(str, value))]
        else:
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    command = shlex.join(parts)
    if per_method:
        command += "  # plus per-method options from the recipe: " + "; ".join(
            f"{name}: {', '.join(f'{k}={v}' for k, v in values.items())}" for name, values in per_method.items())
    return command


# ---- console output -------------------------------------------------------------------------------------

def _print(message: str) -> None:
    print(message, flush=True)


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _plan_banner(settings, reasons, planned: int) -> str:
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


def _one_line(result: dict[str, Any]) -> str:
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


def _eta(times: list[float], remaining: int) -> str:
    if not times:
        return f"{remaining} run(s) to go"
    left = statistics.fmean(times) * remaining
    return f"{remaining} run(s) to go, about {left / 60:.0f} min left" if left >= 90 else \
        f"{remaining} run(s) to go, about {left:.0f} s left"


def _summary(payload: dict[str, Any], files: dict[str, Path]) -> str:
    from peftlab.report import format_metric, ranked

    settings = payload["settings"]
    lines = [f"\nRanking by dev {settings['metric_name']} "
             f"({'higher' if settings['higher_is_better'] else 'lower'} is better):"]
    for rank, row in enumerate(ranked(payload["results"], settings["higher_is_better"]), start=1):
        if row["status"] == "ok":
            delta = row.get("metric_delta_vs_full")
            lines.append(f"  {rank:>2}. {row['method']:<14} {format_metric(row, settings['metric_name'])}"
                         f"{'' if delta is None or row['method'] == 'full' else f'  ({delta:+.4f} vs full)'}"
                         f"{'  [Pareto]' if row.get('pareto') else ''}")
        else:
            detail = row.get("reason") or row.get("error") or ""
            lines.append(f"   - {row['method']:<14} {row['status']}: {detail[:160]}")
    lines.append(f"Report: {files.get('html')}  (also {files.get('markdown')}, results.json, results.csv)")
    return "\n".join(lines)


def _describe(error: BaseException) -> str:
    if isinstance(error, (PeftlabError, TrainingDiverged)):
        return str(error)
    return f"{type(error).__name__}: {error}".strip()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
