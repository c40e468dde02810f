"""``GET /metrics``: the server's numbers in the Prometheus text format (``prometheus-client``).

=====================================  =======================================================================
``peftlab_requests_total``             counter: requests by ``adapter_name``, ``endpoint`` and HTTP ``status``
``peftlab_request_duration_seconds``   histogram: latency by ``adapter_name`` and ``endpoint`` (finished requests)
``peftlab_request_inputs_total``       counter: inputs (texts, prompts) by ``adapter_name``
``peftlab_batch_rows``                 histogram: rows per forward pass of the inference worker
``peftlab_mixed_adapter_batches_total`` counter: forwards that ran several adapters at once
``peftlab_queue_depth``                gauge: requests waiting for the inference worker
``peftlab_adapters_loaded``            gauge: adapters loaded; ``peftlab_adapter_info`` one series per adapter
                                       (``adapter_name``, ``method``, ``kind``, ``group``) with value 1
``peftlab_worker_up``                  gauge: 1 while the inference worker runs
``peftlab_uptime_seconds``             gauge
=====================================  =======================================================================

Each engine has its own registry (several servers in one process do not mix). A request that names no
loaded adapter counts under ``adapter_name="unknown"``: label values never come from what a client may type.
The JSON summary that ``/metrics`` used to return is ``GET /v1/stats``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

UNKNOWN = "unknown"
ADAPTER = "adapter_name"  # the label naming the adapter (or the base model) a series is about
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("prometheus_client") is not None


class ServingMetrics:
    """The Prometheus series of one engine. ``state`` returns what is read at scrape time: queue depth,
    adapters (their info dicts), whether the worker is alive, start time."""

    def __init__(self, state: Callable[[], dict[str, Any]]):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("peftlab_requests", "Requests by adapter, endpoint and HTTP status.",
                                [ADAPTER, "endpoint", "status"], registry=self.registry)
        self.latency = Histogram("peftlab_request_duration_seconds", "Request latency by adapter and endpoint.",
                                 [ADAPTER, "endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inputs = Counter("peftlab_request_inputs", "Inputs (texts, prompts) received, by adapter.",
                              [ADAPTER], registry=self.registry)
        self.batch_rows = Histogram("peftlab_batch_rows", "Rows per forward pass of the inference worker.",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.mixed_batches = Counter("peftlab_mixed_adapter_batches", "Forward passes that ran several adapters.",
                                     registry=self.registry)
        self.registry.register(_StateCollector(state))

    def record_request(self, adapter: str, endpoint: str, status: int, seconds: float, inputs: int) -> None:
        self.requests.labels(adapter, endpoint, str(status)).inc()
        self.inputs.labels(adapter).inc(inputs)
        if status < 400:
            self.latency.labels(adapter, endpoint).observe(seconds)

    def record_batch(self, rows: int, mixed: bool) -> None:
        self.batch_rows.observe(rows)
        if mixed:
            self.mixed_batches.inc()

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) for ``GET /metrics``."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StateCollector:
    """Gauges read from the engine when Prometheus scrapes."""

    def __init__(self, state: Callable[[], dict[str, Any]]):
        self.state = state

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        state = self.state()
        yield GaugeMetricFamily("peftlab_queue_depth", "Requests waiting for the inference worker.",
                                value=state["queue_depth"])
        adapters = state["adapters"]
        yield GaugeMetricFamily("peftlab_adapters_loaded", "Adapters loaded.", value=len(adapters))
        info = GaugeMetricFamily("peftlab_adapter_info", "One series per loaded adapter (value 1).",
                                 labels=[ADAPTER, "method", "kind", "group"])
        for adapter in adapters:
            info.add_metric([adapter["name"], str(adapter["method"]), str(adapter["kind"]), str(adapter["group"])], 1)
        yield info
        yield GaugeMetricFamily("peftlab_worker_up", "1 while the inference worker runs.", value=int(state["alive"]))
        yield GaugeMetricFamily("peftlab_uptime_seconds", "Seconds since the server started.",
                                value=time.time() - state["started_at"])


__all__ = ["ServingMetrics", "available", "UNKNOWN"]
