"""Writing the report's files: atomically, readable by others, JSON without NaN, the CSV table."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

CSV_COLUMNS = (
    "method", "task", "status", "category", "trainable_params", "total_params", "trainable_percent", "metric_name",
    "metric", "metric_std", "metric_ci_low", "metric_ci_high", "score", "baseline_metric", "no_better_than_baseline",
    "metric_delta_vs_full", "pareto", "lr_source", "learning_rate", "train_seconds", "train_seconds_std",
    "train_tokens_per_second", "train_samples_per_second", "peak_memory_mb", "adapter_bytes", "latency_ms_bs1",
    "latency_ms_bs1_merged", "latency_ms_bs32", "latency_ms_bs32_merged", "mergeable", "inference_cost", "epochs",
    "train_examples", "eval_examples", "precision", "device", "repeats", "seeds", "attempts", "error", "reason",
)
GENERATION_PREFIX = "generation_"  # compare --generate: one column per generation metric (generation_rougeL...)


def write_text(path: Path, text: str) -> Path:
    """Atomic (temp file + rename), and readable by others like any report (mkstemp creates files 0600)."""
    from peftlab.artifacts import atomic_write_text

    atomic_write_text(path, text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)


def write_json_file(path: Path, payload: Any) -> Path:
    """JSON (NaN/inf written as null, numpy scalars as numbers), atomically, world-readable."""
    return write_text(path, json.dumps(clean(payload), indent=2, default=jsonable) + "\n")


def clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return clean(value.item())
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """One line per result row (method, or method x task), the table's numbers unrounded."""
    from peftlab.report.tables import is_number

    generated: list[str] = []
    for row in rows:
        generated += [k for k in ((row.get("generation") or {}).get("metrics") or {}) if k not in generated]
    columns = list(CSV_COLUMNS) + [GENERATION_PREFIX + k for k in generated]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record = {key: row.get(key) for key in CSV_COLUMNS}
        scores = (row.get("generation") or {}).get("metrics") or {}
        record.update({GENERATION_PREFIX + k: scores.get(k) for k in generated})
        record["trainable_percent"] = 100 * row["trainable_fraction"] if is_number(row.get("trainable_fraction")) else None
        record["seeds"] = " ".join(map(str, row.get("seeds") or []))
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return write_text(path, buffer.getvalue())


__all__ = ["CSV_COLUMNS", "GENERATION_PREFIX", "write_text", "write_json_file", "clean", "jsonable", "write_csv"]
