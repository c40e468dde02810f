"""What the serving engine keeps: slots, hosted adapters, queued jobs, request statistics, its errors."""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from peftlab.errors import PeftlabError
from peftlab.serving.adapters import AdapterSpec


class UnknownAdapter(PeftlabError):
    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        listing = ", ".join(known) if known else "none loaded"
        super().__init__(f"Unknown adapter '{name}'. Loaded adapters: {listing}.")


class AdapterGone(PeftlabError):
    """The adapter was unloaded between accepting a request and running it."""


class AdapterConflict(PeftlabError):
    pass


class Overloaded(PeftlabError):
    pass


@dataclass
class Slot:
    """One module tree over the shared base weights, holding one or more compatible adapters."""

    id: str
    key: tuple
    kind: str
    model: Any
    peft_type: str | None
    adapters: dict[str, str] = field(default_factory=dict)  # public name -> internal (peft) name
    mixed: bool = False  # several adapters in one forward (peft's adapter_names=)
    alive: bool = True

    @property
    def is_peft(self) -> bool:
        return self.peft_type is not None


@dataclass
class AdapterEntry:
    spec: AdapterSpec
    slot: Slot
    internal: str
    loaded_at: float
    tokenizer: Any
    generation_tokenizer: Any
    unloaded: bool = False  # set by the worker thread when its weights are gone

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/adapters`` shows: names, methods, kinds, never a server path."""
        manifest = self.spec.manifest
        return {
            "name": self.name,
            "method": self.spec.method_name,
            "task": manifest.task,
            "kind": manifest.kind,
            "labels": self.spec.label_names,
            "is_regression": manifest.is_regression,
            "max_length": manifest.max_length,
            "peft_type": self.spec.peft_type,
            "group": self.slot.id,
            "group_adapters": sorted(self.slot.adapters),
            "mixed_batching": self.slot.mixed,
            "adapter_parameters": self.spec.parameters,
            "loaded_at": self.loaded_at,
            "notes": self.spec.notes,
        }


@dataclass
class BaseModelEntry:
    """The base model itself, for OpenAI requests whose ``model`` is the base's name (no adapter)."""

    name: str
    kind: str
    slot: Slot
    generation_tokenizer: Any
    max_length: int | None = None
    internal: str = ""
    unloaded: bool = False


@dataclass
class Job:
    entry: AdapterEntry | BaseModelEntry
    op: str  # "predict" | "generate" | "complete" (OpenAI: one prompt, sampled, maybe streamed)
    records: list[dict]  # normalised inputs (peftlab.kinds.TaskKind.record_from_input); "complete": [{"prompt"}]
    raw: list[Any]
    max_new_tokens: int = 32
    sampling: Any = None  # "complete": a peftlab.serving.generation.Sampling
    future: Future = field(default_factory=Future)

    @property
    def rows(self) -> int:
        return len(self.records)


@dataclass
class Control:
    """A function to run on the worker thread, between batches (loading into or unloading from a live slot)."""

    function: Callable[[], Any]
    future: Future = field(default_factory=Future)


STOP = object()


class LatencyStats:
    """Counts and a bounded window of latencies (ms) for percentiles."""

    def __init__(self, window: int = 4096):
        self.requests = 0
        self.errors = 0
        self.inputs = 0
        self.latencies: deque[float] = deque(maxlen=window)

    def record(self, milliseconds: float, inputs: int, error: bool) -> None:
        self.requests += 1
        self.inputs += inputs
        if error:
            self.errors += 1
        else:
            self.latencies.append(milliseconds)

    def summary(self) -> dict[str, Any]:
        values = sorted(self.latencies)
        return {"requests": self.requests, "errors": self.errors, "inputs": self.inputs,
                "latency_ms": {"p50": percentile(values, 50), "p95": percentile(values, 95),
                               "p99": percentile(values, 99), "window": len(values)}}


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return round(sorted_values[rank], 3)
