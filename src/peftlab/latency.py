"""Timing, written once: the median of repeated runs after untimed warm-up runs.

``peftlab compare`` times a model's forward pass at batch 1 and batch 32 (:func:`forward_latency`); the
lab notebooks time ``peftlab.predict`` end to end and a matmul on the device (:func:`time_call`). Both
use the same rules:

* untimed warm-up runs first (lazy initialisation, allocator growth, kernel selection);
* the median of the timed runs, not the mean: one run slowed by another process does not move it;
* an optional time budget: once ``budget_s`` is spent (counted after warm-up) and at least
  ``min(3, runs)`` runs are in, timing stops early, so a slow model (a 4-bit base dequantised on the fly
  on a CPU) cannot stall a comparison;
* CUDA is synchronised before and after every timed run (kernels are asynchronous), and nothing is
  recorded for autograd (``torch.no_grad()``).

torch is imported only inside the functions.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Timing:
    """What :func:`time_call` measured: the median seconds of one run and how many runs it is over."""

    median_seconds: float
    runs: int

    @property
    def median_ms(self) -> float:
        return 1000 * self.median_seconds


def synchronizer(device) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work: ``torch.cuda.synchronize`` on CUDA, else nothing."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_call(call: Callable[[int], Any], *, warmup: int = 1, runs: int = 5, budget_s: float | None = None,
              device=None) -> Timing:
    """Median wall time of ``call(i)`` (``i``: the run's index, for cycling through inputs).

    ``warmup`` untimed runs (indices 0 .. warmup-1), then up to ``runs`` timed runs (at least one, indices
    from 0 again), stopping early after ``min(3, runs)`` of them once ``budget_s`` seconds have passed since
    the first timed run started. ``device`` (a torch device or its name) is synchronised around every run.
    """
    import torch

    sync = synchronizer(device)
    wanted = max(1, runs)
    durations: list[float] = []
    with torch.no_grad():
        for index in range(warmup):
            call(index)
        began = time.perf_counter()
        while len(durations) < wanted:
            sync()
            start = time.perf_counter()
            call(len(durations))
            sync()
            durations.append(time.perf_counter() - start)
            if (budget_s is not None and len(durations) >= min(3, wanted)
                    and time.perf_counter() - began > budget_s):
                break
    return Timing(median_seconds=statistics.median(durations), runs=len(durations))


def forward_latency(model, batches: list[dict[str, Any]], *, warmup: int = 1, runs: int = 5,
                    budget_s: float | None = None) -> Timing:
    """Median time of ``model(**batch)`` in eval mode, cycling through ``batches`` (moved to the model's device)."""
    from peftlab.evaluation import model_device

    device = model_device(model)
    model.eval()
    on_device = [{key: value.to(device) for key, value in batch.items()} for batch in batches]
    return time_call(lambda index: model(**on_device[index % len(on_device)]), warmup=warmup, runs=runs,
                     budget_s=budget_s, device=device)


__all__ = ["Timing", "time_call", "forward_latency", "synchronizer"]
