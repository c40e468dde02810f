"""One job of a comparison (a run, or a cell's tuning) in its own worker process or in this one, retried once
when it was killed or crashed, and what ``--resume`` finds of it.

Every backend (sequential, ``--workers``, ``--ray``) runs a job through :func:`run_job`, so a job's folder,
its files and its result are the same whichever ran it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from peftlab.compare.worker import (DETERMINISTIC_EXIT, LOG_FILE, PARENT_PID_ENV, RESULT_FILE, SPEC_FILE, WORKER_ERROR,
                                    WORKER_RESULT, describe_error, failed_result, is_deterministic, run_job_spec,
                                    training_identity)
from peftlab.errors import PeftlabError
from peftlab.report import write_json_file

RETRIES = 1  # a killed or crashed job runs once more; a deterministic failure (divergence, a refusal) does not


def run_job(spec: dict[str, Any], run_dir: Path, *, isolate: bool = True, threads: int | None = None,
            environment: dict[str, str] | None = None, retries: int = RETRIES) -> dict[str, Any]:
    """Run ``spec`` in ``run_dir``; never raises for the job's own failure. A job killed by a signal or ended by
    an unexpected exception is started over (fresh) up to ``retries`` times; its row records ``attempts``."""
    import time

    run_dir = Path(run_dir)
    attempt, earlier_log, began = 0, "", time.perf_counter()
    while True:
        attempt += 1
        if isolate:
            result = run_isolated(spec, run_dir, threads=threads, environment=environment, log_prefix=earlier_log)
        else:
            result = run_in_process(spec, run_dir, threads)
        retryable = bool(result.pop("retryable", False))
        if result.get("status") == "ok" or not retryable or attempt > retries:
            result["attempts"] = attempt
            result.setdefault("wall_seconds", time.perf_counter() - began)
            if attempt > 1 and result.get("status") != "ok":
                result["error"] = f"{result.get('error')} (failed again after {attempt - 1} retry)"
            return result
        earlier_log = (f"{_read(run_dir / LOG_FILE)}\n---- attempt {attempt} failed: {result.get('error')}; "
                       f"attempt {attempt + 1} ----\n")
        spec = {**spec, "resume": False}  # a retry starts over: a crash may have left a bad checkpoint


def _read(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def run_isolated(spec: dict[str, Any], run_dir: Path, threads: int | None = None,
                 environment: dict[str, str] | None = None, log_prefix: str = "") -> dict[str, Any]:
    """Run one job in a fresh ``python -m peftlab.compare worker`` process; never raises for its failures.

    ``environment``: variables for the worker on top of this process's (``CUDA_VISIBLE_DEVICES`` of its GPU).
    The result carries ``retryable``: the process was killed, or died of something other than peftlab's
    own refusal or a diverged run."""
    spec_path = prepare_run_dir(run_dir, spec)
    log_path = run_dir / LOG_FILE
    child_environment = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                         PARENT_PID_ENV: str(os.getpid()), **(environment or {})}
    if threads:
        child_environment["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "a") as log:
        log.write(log_prefix)
        log.flush()
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
    result = failed_result(spec, error, run_dir)
    result["retryable"] = returncode != DETERMINISTIC_EXIT
    return result


def run_in_process(spec: dict[str, Any], run_dir: Path, threads: int | None = None) -> dict[str, Any]:
    """``--no-isolate``: the same steps in this process (faster start; peak memory is no longer per method)."""
    import torch

    prepare_run_dir(run_dir, spec)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run_job_spec(spec)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - one method's failure is a result, not the end of the comparison
        traceback.print_exc()
        result = failed_result(spec, describe_error(error), run_dir)
        result["retryable"] = not is_deterministic(error)
        return result
    finally:
        torch.set_num_threads(previous)


def log_tail(path: Path, lines: int = 5) -> str:
    text = _read(path).strip().splitlines()
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

    return {"job": spec.get("job", "run"), "tune": spec.get("tune"),
            **training_identity(config_from_options(spec["options"]))}


def flat_options(config) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    method_options = values.pop("method_options")
    task_options = values.pop("task_options")
    return {**values, "method_options": method_options, "task_options": task_options}


def finished_run(run_dir: Path, config, file: str = RESULT_FILE) -> dict[str, Any] | None:
    """A job's result from an earlier (killed) comparison, if it finished and was trained the same way."""
    path = run_dir / file
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if previous.get("status", "ok") != "ok":
        return None
    wanted = training_identity(config)
    had = previous.get("train_config") or {}
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    differences = [f"{key} {had.get(key)!r} -> {wanted.get(key)!r}" for key in sorted(set(wanted) | set(had))
                   if key != "data_dir" and had.get(key) != wanted.get(key)
                   # an option added to TrainConfig after that run was written, left at its default
                   and not (key not in had and wanted.get(key) == defaults.get(key))]
    if differences:
        raise PeftlabError(
            f"'{run_dir}' was trained with other options than this comparison asks for ({'; '.join(differences)}). "
            "Resume with the same options, or choose another --output.")
    return previous


__all__ = ["RETRIES", "run_job", "run_isolated", "run_in_process", "log_tail", "prepare_run_dir", "identity_of",
           "flat_options", "finished_run"]
