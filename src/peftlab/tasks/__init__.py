"""The task registry: a task name -> the module and factory that build it.

Adding a task is one new module under ``peftlab/tasks/`` plus one line here.
"""

from __future__ import annotations

import importlib

from peftlab.errors import PeftlabError, did_you_mean
from peftlab.tasks.base import DATA_DIR_ENV, TASK_KINDS, Task, resolve_data_dir

# name -> (module, factory attribute). GLUE tasks share one factory, keyed by name.
_REGISTRY: dict[str, tuple[str, str]] = {
    **{name: ("peftlab.tasks.glue", "GlueTask") for name in
       ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")},
    "conll2003": ("peftlab.tasks.conll2003", "Conll2003Task"),
    "imdb": ("peftlab.tasks.imdb", "ImdbTask"),
    "alpaca": ("peftlab.tasks.alpaca", "AlpacaTask"),
    "billsum": ("peftlab.tasks.billsum", "BillsumTask"),
    "guanaco": ("peftlab.tasks.guanaco", "GuanacoTask"),
    "imdb-gen": ("peftlab.tasks.imdb_gen", "ImdbGenTask"),
    "squad": ("peftlab.tasks.squad", "SquadTask"),
    # the user's own files, any kind: --task csv|tsv|jsonl|json --train-file ... and the column options
    "csv": ("peftlab.tasks.files", "FileTask"),
    "tsv": ("peftlab.tasks.files", "FileTask"),
    "jsonl": ("peftlab.tasks.files", "FileTask"),
    "json": ("peftlab.tasks.files", "FileTask"),
    # any Hub dataset (or local dataset folder) with the same column options: --dataset ORG/NAME
    "hub": ("peftlab.tasks.hub_dataset", "HubDatasetTask"),
}
OWN_DATA_TASKS = ("csv", "tsv", "jsonl", "json", "hub")  # built from the user's options, never from a data folder


def task_names() -> list[str]:
    return list(_REGISTRY)


def register_task(name: str, module: str, factory: str) -> None:
    """Make a task available by name (for plugins and tests)."""
    _REGISTRY[name] = (module, factory)


def get_task(name: str, **options) -> Task:
    """Build a task by name. ``options`` are task-specific (files and columns for user data)."""
    if name not in _REGISTRY:
        raise PeftlabError(f"Unknown task '{name}'. {did_you_mean(name, task_names())}")
    module_name, factory_name = _REGISTRY[name]
    factory = getattr(importlib.import_module(module_name), factory_name)
    options = {key: value for key, value in options.items() if value is not None}
    return factory(name, **options)


__all__ = ["Task", "TASK_KINDS", "DATA_DIR_ENV", "OWN_DATA_TASKS", "get_task", "task_names", "register_task",
           "resolve_data_dir"]
