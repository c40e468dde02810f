"""What the lab notebooks show: the machine, the data, training curves, predictions and their latency,
merged and served models. Each helper returns a table (pandas) or a figure the notebook displays.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterable

from peftlab import plots
from peftlab.artifacts import ADAPTER_DIR
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.labs.lab import load_metrics, read_log

UNTRUNCATED = 10**6  # max_length for counting tokens: longer than any text a lab reads


# ---- stage 01: machine and data --------------------------------------------------------------------

def device_check(size: int = 512, repeats: int = 5) -> dict[str, Any]:
    """Device, bf16 support, the precision ``auto`` picks, and a small matmul timed in fp32 and bf16
    (median of ``repeats`` runs after one warm-up, :func:`peftlab.latency.time_call`)."""
    import torch

    from peftlab import hardware
    from peftlab.latency import time_call

    device = hardware.device_type()
    result: dict[str, Any] = {"device": device, "bf16_native": hardware.bf16_supported(),
                              "auto_precision": hardware.resolve_precision("auto"),
                              "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        seconds = time_call(lambda _: a @ b, warmup=1, runs=repeats, device=device).median_seconds
        result[f"{label}_gflops"] = round(2 * size**3 / seconds / 1e9, 1)
    return result


def show_examples(dataset, n: int = 3, width: int = 160):
    """The first ``n`` examples as a table (long strings shortened to ``width`` characters)."""
    import pandas as pd

    def short(value):
        if isinstance(value, list):
            value = " ".join(map(str, value))
        if isinstance(value, str) and len(value) > width:
            return value[: width - 1] + "…"
        return value

    rows = [{key: short(value) for key, value in dataset[i].items()} for i in range(min(n, len(dataset)))]
    return pd.DataFrame(rows)


def token_lengths(dataset, kind: str, tokenizer, limit: int = 500) -> list[int]:
    """Untruncated token counts of up to ``limit`` examples, as the model would see them in training
    (``peftlab.preprocess.tokenize``: a language model's prompt and response together)."""
    from peftlab.preprocess import tokenize

    rows = dataset.select(range(min(limit, len(dataset))))
    with _quiet_datasets():
        # labels never change the input length except where the response is part of the input (generative kinds)
        tokenized = tokenize(rows, kind, tokenizer, max_length=UNTRUNCATED, label_names=None,
                             with_labels=TaskKind(kind).is_generative)
    return list(tokenized["length"])


@contextlib.contextmanager
def _quiet_datasets():
    """No ``datasets`` progress bars in a notebook cell (restored afterwards)."""
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def plot_token_lengths(lengths: dict[str, list[int]] | list[int], max_length: int | None = None,
                       title: str = "Token lengths"):
    """Histogram of token lengths (one panel per dataset when given a dict), with the truncation line."""
    groups = lengths if isinstance(lengths, dict) else {"": lengths}
    figure = plots.figure(3.6 * len(groups) + 1, 3.2)
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    for axis, (name, values) in zip(axes, groups.items()):
        axis.hist(values, bins=30, color="tab:blue", alpha=0.8)
        if max_length:
            cut = sum(v > max_length for v in values) / max(1, len(values))
            axis.axvline(max_length, color="tab:red", linestyle="--", label=f"max_length {max_length} ({cut:.0%} cut)")
            axis.legend(fontsize=8)
        axis.set_xlabel("tokens")
        axis.set_ylabel("examples")
        axis.set_title(f"{title} {name}".strip(), fontsize=10)
    return figure


# ---- stage 02: training curves ---------------------------------------------------------------------

def plot_loss(runs: dict[str, str | os.PathLike] | str | os.PathLike, title: str = ""):
    """Training loss per step (left) and the dev metric per epoch (right), one line per run."""
    runs = runs if isinstance(runs, dict) else {Path(runs).name: runs}
    figure = plots.figure(10, 3.6)
    loss_axis, metric_axis = figure.subplots(1, 2)
    metric_names = set()
    for label, run in runs.items():
        records = read_log(run)
        metric_name = load_metrics(run)["metric_name"] if (Path(run) / "metrics.json").is_file() else None
        train = [r for r in records if r.get("type") == "train" and "loss" in r]
        loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], marker="." if len(train) < 20 else None,
                       label=label)
        evals = [r for r in records if r.get("type") == "eval"]
        if metric_name and evals:
            metric_names.add(metric_name)
            metric_axis.plot([r["epoch"] for r in evals], [r.get(f"eval_{metric_name}") for r in evals], "o-",
                             label=f"{label} ({metric_name})")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss")
    loss_axis.set_title("training loss", fontsize=10)
    metric_axis.set_xlabel("epoch")
    metric_axis.set_ylabel(", ".join(sorted(metric_names)) or "dev metric")
    metric_axis.set_title("dev metric per epoch", fontsize=10)
    for axis in (loss_axis, metric_axis):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return figure


def summary(runs: dict[str, str | os.PathLike]):
    """One row per run: method, task, model, trainable parameters, dev metric, time, speed, memory."""
    import pandas as pd

    rows = []
    for label, run in runs.items():
        m = load_metrics(run)
        rows.append({"run": label, "method": m["method"], "task": m["task"], "model": Path(str(m["model"])).name,
                     "trainable": f"{m['trainable_params']:,}", "trainable %": round(100 * m["trainable_fraction"], 3),
                     "dev metric": m["metric_name"], "value": round(m["metric"], 4),
                     "train s": round(m["train_seconds"], 1),
                     "examples/s": round(m["train_samples_per_second"], 1),
                     "peak MB": round(m["peak_memory_mb"])})
    return pd.DataFrame(rows)


# ---- stage 03: inference ---------------------------------------------------------------------------

def dev_inputs(run_dir_or_loaded, n: int, data_dir: str | None = None) -> list[dict[str, Any]]:
    """``n`` inputs for ``peftlab.predict`` from the run's dev set (repeated when it is smaller)."""
    from peftlab.artifacts import read_run
    from peftlab.inference import Loaded
    from peftlab.tasks import get_task
    from peftlab.tasks.base import select

    manifest = (run_dir_or_loaded.manifest if isinstance(run_dir_or_loaded, Loaded)
                else read_run(run_dir_or_loaded)[0])
    task = get_task(manifest.task, **(manifest.task_options or {}))
    dev = select(task.load("dev", data_dir), max(n, 1), 42)
    kind = TaskKind(task.kind)
    return [kind.record_from_example(dev[i % len(dev)]) for i in range(n)]


def base_of(loaded):
    """A ``Loaded`` whose model is the plain base model (no adapter): the reference for latency."""
    import torch

    from peftlab.inference import Loaded
    from peftlab.models import load_model

    manifest = loaded.manifest
    base = load_model(manifest.model, manifest.kind, label_names=manifest.label_names,
                      is_regression=manifest.is_regression, dtype=torch.float32)
    base.eval()
    return Loaded(model=base, tokenizer=loaded.tokenizer, manifest=manifest, method=None,
                  adapter_dir=loaded.adapter_dir)


def measure_latency(loaded, inputs: list[Any], batch_sizes: Iterable[int] = (1, 32), repeats: int = 3,
                    max_new_tokens: int = 16) -> list[dict[str, Any]]:
    """Wall time of ``peftlab.predict`` over all ``inputs`` in batches of ``b``, for each batch size ``b``
    (median of ``repeats``, :func:`peftlab.latency.time_call`; tokenisation included; generative models
    generate ``max_new_tokens`` greedily). Every batch size processes the same inputs, so ms per example
    compares like with like."""
    from peftlab.evaluation import model_device
    from peftlab.inference import predict
    from peftlab.latency import time_call

    inputs = list(inputs)
    predict(loaded, inputs[:1], batch_size=1, max_new_tokens=2)  # warm-up, once for every batch size
    results = []
    for size in batch_sizes:
        timing = time_call(lambda _: predict(loaded, inputs, batch_size=size, max_new_tokens=max_new_tokens),
                           warmup=0, runs=repeats, device=model_device(loaded.model))
        seconds = timing.median_seconds
        batches = math.ceil(len(inputs) / size)
        results.append({"batch_size": size, "ms_per_batch": round(1000 * seconds / batches, 2),
                        "ms_per_example": round(1000 * seconds / len(inputs), 2),
                        "examples_per_second": round(len(inputs) / seconds, 1)})
    return results


def plot_latency(results: dict[str, list[dict[str, Any]]], title: str = "Latency"):
    """Grouped bars: milliseconds per example at each batch size, one colour per model variant."""
    figure = plots.figure(7, 3.6)
    axis = figure.subplots()
    labels = list(results)
    sizes = sorted({r["batch_size"] for rows in results.values() for r in rows})
    width = 0.8 / max(1, len(labels))
    for index, label in enumerate(labels):
        by_size = {r["batch_size"]: r["ms_per_example"] for r in results[label]}
        xs = [position + index * width for position in range(len(sizes))]
        bars = axis.bar(xs, [by_size.get(s, 0.0) for s in sizes], width=width, label=label)
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
    axis.set_xticks([position + width * (len(labels) - 1) / 2 for position in range(len(sizes))])
    axis.set_xticklabels([f"batch {s}" for s in sizes])
    axis.set_ylabel("ms per example")
    axis.set_title(title, fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def generation_scores(loaded, n: int = 16, max_new_tokens: int = 64, data_dir: str | None = None) -> dict[str, Any]:
    """Generate for ``n`` dev examples and score them with the task's ``generation_metrics`` (BillSum:
    ROUGE-L F1). Returns the scores and the examples (what ``peftlab eval --generate n`` reports)."""
    from peftlab import inference
    from peftlab.tasks import get_task
    from peftlab.tasks.base import select

    manifest = loaded.manifest
    task = get_task(manifest.task, **(manifest.task_options or {}))
    scored = inference.generation_scores(loaded, task, select(task.load("dev", data_dir), n, 42),
                                         max_new_tokens=max_new_tokens)
    return {"scores": scored["metrics"], "examples": scored["samples"]}


# ---- stage 04: merged and served models ------------------------------------------------------------

def loaded_from_folder(folder: str | os.PathLike, like):
    """A ``Loaded`` for a merged model folder (plain transformers, no peft), reusing ``like``'s manifest,
    so that ``peftlab.predict`` and :func:`measure_latency` treat it like the adapter it came from."""
    import torch
    import transformers

    from peftlab.inference import Loaded

    auto_class = getattr(transformers, TaskKind(like.manifest.kind).auto_class)
    model = auto_class.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Loaded(model=model, tokenizer=tokenizer, manifest=like.manifest, method=None, adapter_dir=Path(folder))


def optional(module: str, name: str | None = None):
    """``module`` (or its attribute ``name``) if this peftlab has it, else None with a one-line note, so that a
    notebook step degrades clearly on an install without merge / export / serve."""
    import importlib

    try:
        loaded = importlib.import_module(module)
        return getattr(loaded, name) if name else loaded
    except (ImportError, AttributeError) as error:
        print(f"This peftlab has no {module}{'.' + name if name else ''} ({error}): the step is skipped.")
        return None


@contextlib.contextmanager
def served(base: str, adapters: dict[str, str | os.PathLike]):
    """``peftlab serve`` in this process: the FastAPI app behind a test client (no port, no server).
    Yields the client; ``client.post("/v1/predict", json={"adapter": name, "inputs": [...]})``."""
    from fastapi.testclient import TestClient

    from peftlab.serving import build
    from peftlab.serving.app import create_app

    engine = build(base, {name: str(path) for name, path in adapters.items()})
    try:
        with TestClient(create_app(engine, stop_engine_on_shutdown=True)) as client:
            yield client
    finally:
        engine.stop()


def folder_size_mb(folder: str | os.PathLike) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


def adapter_tensors(run_dir: str | os.PathLike):
    """Every tensor in ``<run>/adapter/*.safetensors``: name, shape, elements and norm. An empty tensor here
    is the classic failure of saving under ZeRO-3 without gathering (peftlab gathers first)."""
    import pandas as pd
    from safetensors.torch import load_file

    files = sorted((Path(run_dir) / ADAPTER_DIR).glob("*.safetensors"))
    if not files:
        raise PeftlabError(f"'{run_dir}' has no adapter/*.safetensors: run the 02-Train notebook first.")
    rows = []
    for file in files:
        for key, tensor in load_file(str(file)).items():
            rows.append({"tensor": key, "shape": tuple(tensor.shape), "elements": tensor.numel(),
                         "norm": float(tensor.float().norm()) if tensor.numel() else 0.0})
    return pd.DataFrame(rows)


def parameter_count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.{max(0, 2 - int(math.log10(n / size)))}f}{unit}"
    return str(n)


__all__ = ["device_check", "show_examples", "token_lengths", "plot_token_lengths", "plot_loss", "summary",
           "dev_inputs", "base_of", "measure_latency", "plot_latency", "generation_scores", "loaded_from_folder",
           "optional", "served", "folder_size_mb", "adapter_tensors", "parameter_count"]
