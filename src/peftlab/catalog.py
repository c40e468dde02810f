"""``peftlab methods``: every method in one table, and what it costs on a given model.

Without a model the table is the registry's own description (category, mergeable, extra inference
cost, summary, default learning rate). With ``--model`` each method is applied to a fresh copy of that
model (with the task's head) and its trainable parameters are counted, so the numbers are what
``peftlab train`` would train, not a formula. A local folder with weights is loaded as training loads
it; a folder holding only a ``config.json``, a Hub id or a built-in name (``meta-llama/Llama-2-7b-hf``) is
built from its config on PyTorch's ``meta`` device (shapes, no weights: a 7B model counts in seconds;
``peftlab.memory.footprints``). A method that cannot run on the model or task gets its reason
(``check_supported``'s message) instead of numbers.

The support check is shared with ``peftlab compare``, which runs it before training anything.
"""

from __future__ import annotations

import copy
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind

# Files that hold a model's weights (safetensors, PyTorch, GGUF, TensorFlow, Flax); their index files too.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def describe(name: str) -> dict[str, Any]:
    """The registry's facts about one method (no model needed)."""
    from peftlab.methods import get_method

    method = get_method(name)
    return {
        "method": name,
        "category": method.category,
        "mergeable": bool(method.mergeable),
        "inference_cost": method.inference_cost(),
        "summary": method.summary,
        "paper": method.paper,
        "kinds": list(method.kinds),
        "default_lr": method.learning_rate,
    }


def unsupported_reason(method, model, kind: str) -> str | None:
    """``check_supported``'s one-sentence reason, or None when the method can run on ``model``/``kind``."""
    try:
        method.check_supported(model, kind)
    except PeftlabError as error:
        return str(error)
    return None


def default_task_for(model: str) -> str:
    """sst2 for encoders, alpaca for decoder-only language models, billsum for encoder-decoders (from the config)."""
    from peftlab.memory import architecture, load_config

    try:
        config, _ = load_config(model)
    except (OSError, ValueError, PeftlabError):
        return "sst2"
    return {"decoder": "alpaca", "encoder-decoder": "billsum"}.get(architecture(config), "sst2")


def has_local_weights(model: str) -> bool:
    """Whether ``model`` is a bundled alias or a local folder with weight files (not a config alone, not a Hub id)."""
    from pathlib import Path

    from peftlab.models import BUNDLED, resolve_model

    if model in BUNDLED:
        return True
    path = Path(model).expanduser()
    if not path.is_dir():
        return path.exists()  # a Hub id or built-in name is counted from its config
    resolve_model(model)  # a folder without config.json: one sentence saying so
    return any(file.name.endswith(WEIGHT_SUFFIXES) for file in path.iterdir())


def task_labels(task) -> list[str] | None:
    """The label set a classification head is sized from (a binary stand-in for user files)."""
    if not TaskKind(task.kind).is_classification or task.is_regression:
        return None
    return task.label_names or ["0", "1"]


def methods_table(model: str | None = None, task: str | None = None) -> list[dict[str, Any]]:
    """One row per method; with ``model``, trainable parameters counted on that model for ``task``."""
    from peftlab.methods import get_method, method_names

    names = method_names()
    rows = [describe(name) for name in names]
    if model is None:
        if task is not None:
            from peftlab.tasks import get_task

            kind = get_task(task).kind
            for row in rows:
                supported = kind in row["kinds"]
                row["status"] = "ok" if supported else "unsupported"
                row["reason"] = None if supported else f"does not support {kind} tasks"
        return rows

    from peftlab.tasks import get_task

    task_object = get_task(task or default_task_for(model))
    kind = task_object.kind
    labels = task_labels(task_object)
    for row in rows:
        row.update(model=model, task=task_object.name, kind=kind, status="ok", reason=None,
                   trainable_params=None, total_params=None, trainable_fraction=None)
    if has_local_weights(model):
        count_on_loaded_model(rows, model, task_object, labels)
    else:
        count_on_meta_model(rows, model, kind, 1 if task_object.is_regression else len(labels or [0, 1]))
    return rows


def count_on_meta_model(rows: list[dict[str, Any]], model: str, kind: str, num_labels: int) -> None:
    """Fill the rows from the model's config alone: each method applied on the ``meta`` device."""
    from peftlab.memory import footprints

    counted = footprints(model, kind, num_labels)
    for row in rows:
        row["counted_on"] = "config (meta device)"
        footprint = counted[row["method"]]
        if not footprint.supported:
            row.update(status="unsupported", reason=footprint.reason)
            continue
        row.update(trainable_params=footprint.trainable, total_params=footprint.total,
                   trainable_fraction=footprint.trainable / footprint.total)


def count_on_loaded_model(rows: list[dict[str, Any]], model: str, task_object, labels: list[str] | None) -> None:
    """Fill the rows on the real model: one plain load, deep-copied per method (QLoRA loads its own 4-bit base)."""
    import torch

    from peftlab.methods import get_method
    from peftlab.modelinfo import count_parameters
    from peftlab.models import load_model

    kind = task_object.kind
    pristine = None  # one plain load, deep-copied per method (a fresh, untouched model each time)
    for row in rows:
        row["counted_on"] = "weights"
        method = get_method(row["method"])
        try:
            load_kwargs = method.model_load_kwargs()
            if load_kwargs:  # qlora: the base is quantised at load time, so it needs its own load
                base = load_model(model, kind, label_names=labels, is_regression=task_object.is_regression,
                                  **load_kwargs)
            else:
                if pristine is None:
                    pristine = load_model(model, kind, label_names=labels, is_regression=task_object.is_regression)
                base = copy.deepcopy(pristine)
            reason = unsupported_reason(method, base, kind)
            if reason is not None:
                row.update(status="unsupported", reason=reason)
                continue
            if load_kwargs:
                applied = method.apply(base, kind)  # on the quantised base, as training builds it
            else:  # as training would, without a run: a method whose schedule needs the step count gets a stand-in
                applied, _ = method.apply_for_estimate(base, kind)
            trainable, total = count_parameters(applied)
            row.update(trainable_params=trainable, total_params=total, trainable_fraction=trainable / total)
            del applied, base
        except PeftlabError as error:
            row.update(status="unsupported", reason=str(error))
        except Exception as error:  # noqa: BLE001 - one broken cell must not hide the others
            row.update(status="error", reason=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def render_methods(rows: list[dict[str, Any]], *, model: str | None = None, task: str | None = None) -> None:
    """The table on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    counted = any("trainable_params" in row for row in rows)
    title = "peftlab methods"
    if counted:
        title += f" on {rows[0].get('model', model)} ({rows[0].get('task', task)}, {rows[0].get('kind')})"
        if rows[0].get("counted_on", "weights") != "weights":
            title += ", counted from its config.json on the meta device (no weights loaded)"
    table = Table(title=title, title_justify="left", show_lines=counted)
    # names and numbers never wrap; the prose columns (cost, summary, reasons) take what width is left
    table.add_column("method", style="bold", no_wrap=True)
    table.add_column("category", no_wrap=True)
    if counted:
        table.add_column("trainable params", justify="right", no_wrap=True)
        table.add_column("trainable %", justify="right")
    table.add_column("mergeable", no_wrap=True)
    table.add_column("extra inference cost", ratio=2)
    table.add_column("default lr", justify="right", no_wrap=True)
    if not counted:
        table.add_column("summary", ratio=2)
    notes = counted and any(row.get("status") != "ok" for row in rows)
    if notes:
        table.add_column("why not", ratio=3)
    for row in rows:
        cells = [row["method"], row["category"]]
        if counted:
            if row.get("status") == "ok":
                cells += [f"{row['trainable_params']:,}", format_percent(row["trainable_fraction"])]
            else:
                colour = "yellow" if row.get("status") == "unsupported" else "red"
                cells += [f"[{colour}]{row.get('status')}[/]", "-"]
        cells += ["yes" if row["mergeable"] else "no", row["inference_cost"], f"{row['default_lr']:g}"]
        if not counted:
            cells.append(row["summary"])
        if notes:
            cells.append(row.get("reason") or "")
        table.add_row(*cells)
    Console().print(table)
    if not counted:
        Console().print("Count trainable parameters on a model: peftlab methods --model minilm --task sst2")


def format_percent(fraction: float | None) -> str:
    """A trainable fraction as a percentage with enough digits to tell 0.01% from 0.0001%."""
    if fraction is None:
        return "-"
    percent = 100 * fraction
    if percent >= 10:
        return f"{percent:.1f}%"
    if percent >= 0.1:
        return f"{percent:.2f}%"
    if percent >= 0.001:
        return f"{percent:.4f}%"
    return f"{percent:.2e}%"
