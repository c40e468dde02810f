"""One run of a comparison: train one method, check it did not diverge, measure it, write its result.

By default a run is a fresh process, ``python -m peftlab.compare worker DIR/runs/<run>/compare-spec.json``,
so that its peak memory is its own and a crash or an out-of-memory kill ends only that run; the parent
(:mod:`peftlab.compare.orchestrate`) reads ``worker-result.json`` or ``error.txt`` back. With
``--no-isolate`` the same :func:`run_method` runs in the compare process.

A method registered from outside peftlab (``peftlab.methods.register_method`` in a user's module) reaches
the worker through the spec: :func:`method_source` records where its class lives and the worker imports
and registers it before training (:func:`register_from_source`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from peftlab.artifacts import ADAPTER_DIR
from peftlab.compare.measure import TrainingDiverged, divergence, folder_bytes, measure_inference
from peftlab.compare.rows import METRIC_KEYS, empty_row, method_facts
from peftlab.errors import PeftlabError
from peftlab.quiet import quiet_libraries
from peftlab.report import write_json_file

RESULT_FILE = "result.json"
WORKER_RESULT = "worker-result.json"
WORKER_ERROR = "error.txt"
LOG_FILE = "compare.log"
SPEC_FILE = "compare-spec.json"
PARENT_PID_ENV = "PEFTLAB_COMPARE_PARENT"
# The worker's exit status when a job failed in a way a retry would repeat (peftlab's own refusal, a
# diverged run); any other failure (an exception, a signal) is retried once by the parent.
DETERMINISTIC_EXIT = 1
CRASH_EXIT = 3
# TrainConfig fields that do not change what is trained (excluded when --resume checks a finished run).
NOT_TRAINING = ("output", "resume", "overwrite", "progress", "keep_checkpoints", "logging_steps", "save_steps",
                "report_to", "run_name")


def training_identity(config) -> dict[str, Any]:
    """The TrainConfig fields that decide what is trained (what --resume compares)."""
    values = dataclasses.asdict(config)
    for key in NOT_TRAINING:
        values.pop(key, None)
    return json.loads(json.dumps(values, default=str))


def run_paths(spec: dict[str, Any]) -> dict[str, Any]:
    """Where a run's files are, relative to the comparison folder, as its row records them."""
    isolated = bool(spec.get("isolated", True))
    folder = spec.get("relative") or f"runs/{spec['run_name']}"
    return {"run_dir": folder, "log": f"{folder}/{LOG_FILE}" if isolated else None, "isolated": isolated}


# ---- methods defined outside peftlab ----------------------------------------------------------------------

def method_source(name: str) -> dict[str, str] | None:
    """Where a worker process finds method ``name``'s class: None for peftlab's own methods (every process
    has them), else its module, qualified name and the folder to put on ``sys.path``.

    One sentence when the class cannot be imported by name (defined in a script run as ``__main__`` or
    inside a function): a worker process could not find it.
    """
    import inspect

    from peftlab.methods import get_method_class

    method_class = get_method_class(name)
    module = method_class.__module__
    if module.split(".")[0] == "peftlab":
        return None
    if module == "__main__" or "<locals>" in method_class.__qualname__:
        where = "a script run as __main__" if module == "__main__" else f"function {method_class.__qualname__}"
        raise PeftlabError(f"Method '{name}' is defined in {where}, which compare's worker processes cannot import: "
                           "define it at the top level of a module (and register it there), or run the comparison "
                           "in this process (--no-isolate, isolate=False).")
    try:
        file = Path(inspect.getfile(method_class)).resolve()
    except (TypeError, OSError):
        return {"module": module, "qualname": method_class.__qualname__, "path": ""}
    depth = module.count(".") + (1 if file.stem == "__init__" else 0)
    return {"module": module, "qualname": method_class.__qualname__, "path": str(file.parents[depth])}


def register_from_source(name: str, source: dict[str, str] | None) -> None:
    """In a worker: make method ``name`` the class ``source`` names (imported as the parent had it)."""
    if not source:
        return
    from peftlab.methods import get_method_class, method_names, register_method

    if source.get("path") and source["path"] not in sys.path:
        sys.path.insert(0, source["path"])
    target = importlib.import_module(source["module"])
    for part in source["qualname"].split("."):
        target = getattr(target, part)
    if name not in method_names() or get_method_class(name) is not target:
        register_method(target, name)


# ---- the worker process ---------------------------------------------------------------------------------

def die_with_parent() -> None:
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


def is_deterministic(error: BaseException) -> bool:
    """Would running the job again fail the same way (peftlab's refusal, a diverged run)?"""
    return isinstance(error, (PeftlabError, TrainingDiverged))


def describe_error(error: BaseException) -> str:
    """A run's failure in one line: peftlab's own sentence, or the exception's type and message."""
    if is_deterministic(error):
        return str(error)
    return f"{type(error).__name__}: {error}".strip()


def worker_main(argv: list[str]) -> int:
    """``python -m peftlab.compare worker SPEC.json``: one job (train and measure one method, or tune its learning
    rate), its result written beside the spec."""
    if len(argv) != 2 or argv[0] != "worker":
        print("usage: python -m peftlab.compare worker SPEC.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[1])
    die_with_parent()
    spec = json.loads(spec_path.read_text())
    run_dir = spec_path.parent
    quiet_libraries()
    try:
        result = run_job_spec(spec)
    except KeyboardInterrupt:
        return 130
    except BaseException as error:  # noqa: BLE001 - reported to the parent as this method's failure
        traceback.print_exc()
        from peftlab.artifacts import atomic_write_text

        atomic_write_text(run_dir / WORKER_ERROR, describe_error(error) + "\n")
        return DETERMINISTIC_EXIT if is_deterministic(error) else CRASH_EXIT
    write_json_file(run_dir / WORKER_RESULT, result)
    return 0


def run_job_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A job's work: ``spec["job"]`` is ``"run"`` (:func:`run_method`) or ``"tune"``
    (:func:`peftlab.compare.tuning.tune_method`)."""
    register_from_source(spec["options"]["method"], spec.get("method_source"))
    if spec.get("job", "run") == "tune":
        from peftlab.compare.tuning import tune_method

        result = tune_method(spec)
        from peftlab.training import config_from_options

        result.update(status="ok", train_config=training_identity(config_from_options(spec["options"])))
        return result
    return run_method(spec)


def run_method(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one method, check it did not diverge, then measure it (adapter size, latency, samples)."""
    import torch

    from peftlab import hardware
    from peftlab.training import config_from_options, train

    register_from_source(spec["options"]["method"], spec.get("method_source"))
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
    facts = method_facts(config.method)
    result = {key: metrics.get(key) for key in METRIC_KEYS}
    result.update({key: value for key, value in metrics.items() if key not in result})
    result.update(
        status="ok", error=None, reason=None, mergeable=facts["mergeable"],
        trains_all_weights=facts["trains_all_weights"], adapter_bytes=folder_bytes(run_dir / ADAPTER_DIR),
        train_config=training_identity(config), cpu_seconds=cpu_seconds, threads=torch.get_num_threads(),
        lr_source=spec.get("lr_source", "default"), **run_paths(spec),
    )
    if not spec.get("isolated", True) and hardware.device_type() == "cpu":
        result["peak_memory_note"] = ("not isolated: peak RSS of the whole compare process so far, "
                                      "not of this method alone")
    result.update(measure_inference(run_dir, config, latency=spec.get("latency"), generate=spec.get("generate")))
    result["wall_seconds"] = time.perf_counter() - began
    return result


def failed_result(spec: dict[str, Any], error: str, run_dir: Path) -> dict[str, Any]:
    """A row for a run that did not finish: what is known (method, category, options) and the error."""
    from peftlab.training import config_from_options

    config = config_from_options(spec["options"])
    result = empty_row(config.method)
    result.update(status="failed", error=error, task=config.task, model=config.model, seed=config.seed,
                  train_config=training_identity(config), lr_source=spec.get("lr_source"), **run_paths(spec))
    metrics_path = Path(run_dir) / "metrics.json"
    if metrics_path.is_file():  # it trained; the failure came after (divergence, inference)
        metrics = json.loads(metrics_path.read_text())
        for key in METRIC_KEYS:
            if metrics.get(key) is not None and key not in ("method",):
                result[key] = metrics[key]
    return result


__all__ = ["RESULT_FILE", "WORKER_RESULT", "WORKER_ERROR", "LOG_FILE", "SPEC_FILE", "PARENT_PID_ENV", "NOT_TRAINING",
           "DETERMINISTIC_EXIT", "CRASH_EXIT", "training_identity", "run_paths", "method_source",
           "register_from_source", "die_with_parent", "quiet_libraries", "is_deterministic", "describe_error",
           "worker_main", "run_job_spec", "run_method", "failed_result"]
