"""Where the jobs of a comparison run: one after another, ``--workers N`` at once on this machine, or on a Ray
cluster (:mod:`peftlab.compare.ray_backend`).

On a machine with GPUs each worker gets one GPU of its own (``CUDA_VISIBLE_DEVICES``), so ``--workers``
is capped at the number of GPUs; on a CPU machine the cores are split between the workers (each worker's
torch gets ``cores // N`` threads) and ``--workers`` is capped at the number of cores. Either cap is said
in one note. Every backend runs a job through :func:`peftlab.compare.runner.run_job` and reports it back
to the comparison in this process, which alone writes ``results.json``.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from peftlab.errors import PeftlabError


@dataclass
class Job:
    """One unit of work: a run (method x task x seed) or a cell's tuning (method x task)."""

    key: tuple  # ("run", task, method, seed) or ("tune", task, method)
    label: str  # what the progress display calls it
    method: str
    task: str
    run_dir: Path
    spec: dict[str, Any]


@dataclass
class Workers:
    """How many jobs run at once and what each worker gets."""

    count: int
    slots: list[dict[str, Any]] = field(default_factory=list)  # per worker: threads and environment
    notes: list[str] = field(default_factory=list)
    why: str = ""


def worker_threads() -> dict[str, Any]:
    """How many threads each worker's torch uses (one worker at a time), and why.

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


def check_workers(workers) -> int:
    if workers is None:
        return 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PeftlabError(f"--workers must be a positive whole number; got {workers!r}.")
    return workers


def plan_workers(requested: int, *, gpus: int | None = None, cores: int | None = None) -> Workers:
    """``--workers N`` on this machine: capped at its GPUs (one each) or cores (threads split between them)."""
    from peftlab import hardware

    if gpus is None:
        gpus = gpu_count()
    cores = cores or hardware.cpu_count()
    notes = []
    if gpus:
        count = min(requested, gpus)
        if count < requested:
            notes.append(f"--workers {requested} capped at {count}: this machine has {gpus} GPU(s), one per worker")
        if count == 1:  # one run at a time sees the GPUs this process sees, as before
            return Workers(1, [{"threads": None, "environment": {}}], notes, "one run at a time")
        # the GPUs this process may use (a CUDA_VISIBLE_DEVICES of the user's is honoured: its entries, in order)
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        devices = visible[:gpus] if visible else [str(index) for index in range(gpus)]
        threads = max(1, cores // count)
        slots = [{"threads": threads, "environment": {"CUDA_VISIBLE_DEVICES": devices[index]}} for index in range(count)]
        return Workers(count, slots, notes, f"one GPU per worker ({count} of {gpus})")
    count = min(requested, cores)
    if count < requested:
        notes.append(f"--workers {requested} capped at {count}: this machine has {cores} CPU core(s), and a worker "
                     "needs at least one")
    if count == 1:
        choice = worker_threads()
        return Workers(1, [{"threads": choice["threads"], "environment": {}}], notes, choice["why"])
    threads = max(1, cores // count)
    slots = [{"threads": threads, "environment": {}} for _ in range(count)]
    return Workers(count, slots, notes, f"{cores} cores split between {count} workers: {threads} thread(s) each")


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA: a CPU machine
        return 0


def run_jobs(jobs: list[Job], workers: Workers, call: Callable[[Job, dict[str, Any]], dict[str, Any]], *,
             on_start: Callable[[Job], None], on_done: Callable[[Job, dict[str, Any]], None]) -> None:
    """Run ``jobs`` on ``workers``: ``call(job, slot)`` in a worker thread (it starts the job's process);
    ``on_start`` from that thread, ``on_done`` in this one, in the order the jobs finish."""
    if workers.count == 1:
        for job in jobs:
            on_start(job)
            on_done(job, call(job, workers.slots[0]))
        return
    free: queue.Queue = queue.Queue()
    for slot in workers.slots:
        free.put(slot)

    def work(job: Job) -> dict[str, Any]:
        slot = free.get()
        try:
            on_start(job)
            return call(job, slot)
        finally:
            free.put(slot)

    with ThreadPoolExecutor(max_workers=workers.count, thread_name_prefix="peftlab-compare") as pool:
        pending = {pool.submit(work, job): job for job in jobs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                on_done(pending.pop(future), future.result())


__all__ = ["Job", "Workers", "worker_threads", "check_workers", "plan_workers", "gpu_count", "run_jobs"]
