"""``--ray [ADDRESS]``: the comparison's jobs scheduled on a Ray cluster (``pip install peftlab[ray]``).

Without an address Ray starts locally on this machine; with one (``HOST:PORT`` of a running cluster's head,
``ray://HOST:PORT`` for Ray Client, or ``auto``) the jobs go to that cluster. Each job is one Ray task that
asks for its resources (one GPU when the cluster has GPUs; CPUs split as ``--workers`` says) and runs the job
exactly as the other backends do, in a worker process of its own (:func:`peftlab.compare.runner.run_job`),
retried once if killed; a task lost with its node is resubmitted once by Ray (``max_retries=1``). The results
come back to this process, which writes ``results.json``: the same file a sequential run writes.

The run folders are written where the task runs: on a single machine that is ``--output``; on a cluster of
several machines ``--output`` must be on a filesystem every node mounts at the same path (the results come
back either way; the adapters stay on the node that trained them otherwise).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from peftlab.compare.parallel import Job, Workers
from peftlab.errors import PeftlabError

CONNECT_TIMEOUT_S = 5.0  # the TCP check of an address before Ray is asked to join it
LOCAL = "local"
# Environment a job's worker process needs from this one (Ray's own workers may not inherit it on a cluster).
FORWARDED_ENVIRONMENT = ("PEFTLAB_DATA_DIR", "PEFTLAB_PLUGINS", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME",
                         "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS", "PEFTLAB_DEBUG",
                         # --report-to: the comparison's experiment and stores (peftlab.tracking.comparison)
                         "PEFTLAB_EXPERIMENT", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "WANDB_RUN_GROUP")


def import_ray():
    try:
        import ray
    except ImportError:
        raise PeftlabError("--ray needs Ray: pip install 'peftlab[ray]' (or pip install ray).") from None
    return ray


def address_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) to check before joining ``address``; None for ``auto`` (Ray finds a local cluster itself)."""
    if address == "auto":
        return None
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not parsed.hostname or port is None:
        raise PeftlabError(f"--ray address '{address}' is not HOST:PORT (for example 127.0.0.1:6379, "
                           "ray://head:10001, or auto); give none to start Ray on this machine.")
    return parsed.hostname, port


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """One sentence, within ``timeout`` seconds, when nothing listens at the cluster address."""
    endpoint = address_endpoint(address)
    if endpoint is None:
        return
    host, port = endpoint
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise PeftlabError(f"Cannot reach the Ray cluster at '{address}' ({reason} after at most {timeout:g} s): start "
                           "it (ray start --head), check the address and port, or give --ray without an address "
                           "to run Ray on this machine.") from None


def connect(address: str | None, *, cpus: int | None = None):
    """``ray.init`` for a local instance (``address`` None or 'local') or the cluster at ``address``; returns
    (ray, started_here). An address nothing listens at fails in one sentence within
    :data:`CONNECT_TIMEOUT_S` seconds (checked over TCP first, since Ray itself retries for minutes). Ray must
    be initialised from the main thread (its GCS client does not survive a join from another thread)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address in (None, "", LOCAL):
        options.update(num_cpus=cpus or os.cpu_count() or 1, object_store_memory=256 * 2**20)
    else:
        check_reachable(address)
        options["address"] = address
    try:
        ray.init(**options)
    except Exception as error:  # noqa: BLE001 - Ray raises many types (ConnectionError, RuntimeError, ...)
        where = f"the Ray cluster at '{address}'" if options.get("address") else "a local Ray instance"
        message = str(error).splitlines()[0][:200] if str(error) else ""
        raise PeftlabError(f"Could not start or join {where}: {type(error).__name__}: {message}") from None
    return ray, not options.get("address")


def plan_ray_workers(ray, requested: int | None) -> Workers:
    """What each job asks Ray for: one GPU when the cluster has GPUs, and the cluster's CPUs split so that at
    most ``requested`` jobs (default: one per GPU, else one per CPU) run at once."""
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    count = requested or (gpus or cpus)
    notes = []
    if gpus and count > gpus:
        notes.append(f"--workers {count} capped at {gpus}: the Ray cluster has {gpus} GPU(s), one per job")
        count = gpus
    if count > cpus:
        notes.append(f"--workers {count} capped at {cpus}: the Ray cluster has {cpus} CPU(s)")
        count = cpus
    threads = max(1, cpus // max(count, 1))
    slot = {"threads": threads, "num_cpus": threads, "num_gpus": 1 if gpus else 0, "environment": {}}
    return Workers(count, [slot], notes, f"Ray: each job asks for {threads} CPU(s)"
                                         f"{' and 1 GPU' if gpus else ''} ({cpus} CPUs, {gpus} GPUs in the cluster)")


def ray_job(spec: dict[str, Any], run_dir: str, threads: int | None, environment: dict[str, str]) -> dict[str, Any]:
    """The Ray task: one job in its own worker process on whichever node Ray chose."""
    from peftlab.compare.runner import run_job

    return run_job(spec, Path(run_dir), isolate=True, threads=threads, environment=environment)


def run_on_ray(jobs: list[Job], ray, workers: Workers, *, on_start: Callable[[Job], None],
               on_done: Callable[[Job, dict[str, Any]], None], failed: Callable[[Job, str], dict[str, Any]]) -> None:
    """Submit every job at once (Ray queues them on its resources); report each as it finishes."""
    slot = workers.slots[0]
    environment = {key: os.environ[key] for key in FORWARDED_ENVIRONMENT if key in os.environ}
    environment.pop("OMP_NUM_THREADS", None)  # each job's thread count is the CPUs it asked for
    task = ray.remote(ray_job).options(num_cpus=slot["num_cpus"], num_gpus=slot["num_gpus"], max_retries=1)
    pending = {}
    for job in jobs:
        pending[task.remote(job.spec, str(job.run_dir), slot["threads"], environment)] = job
        on_start(job)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except Exception as error:  # noqa: BLE001 - a task Ray could not run (node lost twice): a failed job
            result = failed(job, f"Ray could not run this job: {type(error).__name__}: "
                                 f"{str(error).splitlines()[0][:200] if str(error) else ''}")
        on_done(job, result)


__all__ = ["CONNECT_TIMEOUT_S", "LOCAL", "FORWARDED_ENVIRONMENT", "import_ray", "address_endpoint",
           "check_reachable", "connect", "plan_ray_workers", "ray_job", "run_on_ray"]
