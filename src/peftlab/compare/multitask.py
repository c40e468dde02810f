"""The multi-task column of a suite: what serving every task costs, measured.

For each method that finished on every task: the bytes on disk of all its task adapters together, and the
resident memory of **one** ``peftlab serve`` process (``peftlab.serving.build``) holding the base model plus the
adapter of every task after one request to each (the peak is recorded too, but at small models it is the imports'
spike, the same for every process), each measured in a fresh child process (``python -m peftlab.compare serve-memory
SPEC``) so that nothing else in memory counts. The reference is one full fine-tuned model per task: N
serving processes each holding one full model, measured as N times a process holding one copy of the base model's weights (``AutoModel``). Whether
the adapters can share one mixed batch is the method's declared fact (``serving_facts().mixed_batch``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from peftlab.report import write_json_file

SERVE_MEMORY = "serve-memory"
TIMEOUT_S = 600


PROBE = {"question": "What is tested?", "context": "The memory of one serving process is tested here."}


def serve_memory_main(argv: list[str]) -> int:
    """``python -m peftlab.compare serve-memory SPEC.json``: build the engine, answer one request per adapter, and
    write the process's resident memory (and what it held after its imports alone) to SPEC's result."""
    import gc

    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    result_path = Path(spec["result"])
    from peftlab import hardware
    from peftlab.quiet import quiet_libraries
    from peftlab.serving import build

    quiet_libraries()
    runtime_mb = hardware.current_rss_mb()  # Python, torch, transformers and the server code: no weights yet
    engine = None
    try:
        if spec.get("method") and spec.get("method_source"):  # a method registered outside peftlab
            from peftlab.compare.worker import register_from_source

            register_from_source(spec["method"], spec["method_source"])
        if spec["adapters"]:
            engine = build(spec["base"], spec["adapters"], device=spec.get("device", "cpu"), threads=1)
            for name in spec["adapters"]:
                answer_once(engine, name)
        else:  # the reference: one process holding one copy of the model's weights, as a full fine-tune per task
            import torch
            import transformers

            from peftlab.models import load_tokenizer, resolve_model

            model = transformers.AutoModel.from_pretrained(resolve_model(spec["base"]))
            model.eval()
            with torch.no_grad():
                model(**load_tokenizer(spec["base"])(["a test"], return_tensors="pt"))
        gc.collect()
        result = {"status": "ok", "rss_mb": hardware.current_rss_mb(), "runtime_rss_mb": runtime_mb,
                  "peak_rss_mb": hardware.peak_memory_mb(), "adapters": len(spec["adapters"])}
        try:
            import torch

            if torch.cuda.is_available():
                result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        except ImportError:  # pragma: no cover
            pass
    except Exception as error:  # noqa: BLE001 - reported as this method's multi-task failure
        result = {"status": "failed", "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    finally:
        if engine is not None:
            engine.stop()
    write_json_file(result_path, result)
    return 0


def answer_once(engine, name: str) -> None:
    """One request through the engine's worker, as a client's would go (so lazily built parts exist)."""
    from peftlab.kinds import TaskKind
    from peftlab.serving.records import Job

    entry = engine.entry(name)
    kind = TaskKind(entry.spec.kind)
    value = PROBE if kind == TaskKind.QA else "a test sentence"
    record = kind.record_from_input(value, "probe")
    job = Job(entry=entry, op="generate" if kind.is_generative else "predict", records=[record], raw=[value],
              max_new_tokens=4)
    engine.submit(job).result(timeout=300)


def measure_process(base: str, adapters: dict[str, str], folder: Path, name: str,
                    method: str | None = None) -> dict[str, Any]:
    """Run one serve-memory child; its result (or why it failed). ``method``: the adapters' method, so that the
    child can register one defined outside peftlab (:func:`peftlab.compare.worker.method_source`)."""
    from peftlab.compare.worker import method_source

    folder.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = folder / f"{name}-spec.json", folder / f"{name}.json"
    result_path.unlink(missing_ok=True)
    try:
        source = method_source(method) if method else None
    except Exception:  # noqa: BLE001 - a class a child cannot import: the child says what fails
        source = None
    write_json_file(spec_path, {"base": base, "adapters": adapters, "result": str(result_path), "method": method,
                                "method_source": source})
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        process = subprocess.run([sys.executable, "-m", "peftlab.compare", SERVE_MEMORY, str(spec_path)],
                                 capture_output=True, text=True, env=environment, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"did not finish within {TIMEOUT_S} s"}
    if result_path.is_file():
        return json.loads(result_path.read_text())
    tail = " | ".join((process.stdout + process.stderr).strip().splitlines()[-3:])
    return {"status": "failed", "error": f"exited with status {process.returncode}: {tail}"}


def multitask_costs(out: Path, model: str, tasks: list[str], methods: list[str],
                    rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The multi-task table: per method, adapter bytes for all ``tasks`` and one serving process's peak memory,
    against one full model per task."""
    from peftlab.methods import get_method

    by_row = {(r.get("method"), r.get("task")): r for r in rows}
    folder = out / "multitask"
    base_only = measure_process(model, {}, folder, "base-only")
    per_full_model = base_only.get("rss_mb") if base_only.get("status") == "ok" else None
    table = []
    for method in methods:
        task_rows = [by_row.get((method, task)) for task in tasks]
        facts = get_method(method).serving_facts()
        entry: dict[str, Any] = {"method": method, "mixed_batch": bool(facts.mixed_batch),
                                 "serving_mode": facts.mode, "tasks": len(tasks)}
        if not all(r and r.get("status") == "ok" for r in task_rows):
            entry.update(status="incomplete", error="did not finish on every task")
            table.append(entry)
            continue
        folders = {task: str(out / first_run_dir(row)) for task, row in zip(tasks, task_rows)}
        entry["adapter_bytes_total"] = sum(r.get("adapter_bytes") or 0 for r in task_rows)
        missing = [task for task, path in folders.items() if not Path(path).is_dir()]
        if missing:
            entry.update(status="failed", error=f"run folders not on this machine for {', '.join(missing)} (on a Ray "
                                                "cluster, put --output on a shared filesystem)")
            table.append(entry)
            continue
        measured = measure_process(model, folders, folder, method, method=method)
        entry.update(status=measured.get("status"), error=measured.get("error"), serve_rss_mb=measured.get("rss_mb"),
                     serve_peak_rss_mb=measured.get("peak_rss_mb"), runtime_rss_mb=measured.get("runtime_rss_mb"))
        if entry["status"] == "ok" and per_full_model:
            entry["saving_vs_full_per_task"] = 1 - entry["serve_rss_mb"] / (per_full_model * len(tasks))
        table.append(entry)
    return {
        "tasks": tasks,
        "full_model_rss_mb": per_full_model,
        "runtime_rss_mb": base_only.get("runtime_rss_mb"),
        "full_model_per_task_mb": per_full_model * len(tasks) if per_full_model else None,
        "base_only_error": base_only.get("error"),
        "rows": table,
        "how": "resident memory (RSS) of one child process that builds peftlab.serving's engine over the base with "
               "every task's adapter and answers one request per task (threads 1, CPU); the reference is N processes "
               "each holding one full model (measured as N x a process that loads the model with AutoModel and runs "
               "one forward pass). runtime_rss_mb: such a process after its imports, before any weights",
    }


def first_run_dir(row: dict[str, Any]) -> str:
    """The run folder of a row's first seed (an aggregated row of several seeds lists them under ``runs``)."""
    if row.get("run_dir"):
        return row["run_dir"]
    return next(r["run_dir"] for r in row.get("runs") or [] if r.get("status") == "ok" and r.get("run_dir"))


__all__ = ["SERVE_MEMORY", "PROBE", "serve_memory_main", "answer_once", "measure_process", "multitask_costs",
           "first_run_dir"]
