"""One lab's folders, recipe and budgets, as the notebooks read them from the environment.

Every lab is a folder ``labs/<lab>/`` with ``recipe.yaml`` (the Hub default: the paper's model and data,
for a GPU) and ``recipe.offline.yaml`` (the same recipe on the bundled models and ``$PEFTLAB_DATA_DIR``,
runnable on a CPU). See :mod:`peftlab.labs` for the environment variables.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind

SMOKE_ENV = "PEFTLAB_SMOKE"
OUTPUT_ENV = "PEFTLAB_LAB_OUTPUT"
RECIPE_ENV = "PEFTLAB_LAB_RECIPE"
NPROC_ENV = "PEFTLAB_LAB_NPROC"
VARIANTS = ("offline", "hub")

# The smallest budgets that still run every cell (train, evaluate, save, reload, plot).
SMOKE_BUDGET: dict[str, Any] = dict(max_train_samples=32, max_eval_samples=32, epochs=1, batch_size=8,
                                    eval_batch_size=32, logging_steps=1)
SMOKE_GENERATIVE_MAX_LENGTH = 64  # generative tasks: shorter sequences in smoke mode
SMOKE_MODELS = ("smollm2",)  # replaced by smoke_llama() in smoke mode
PATH_OPTIONS = ("model", "data_dir", "train_file", "dev_file", "output")


def smoke() -> bool:
    """True when ``$PEFTLAB_SMOKE`` asks for the smoke budgets."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Lab:
    """One lab's folders and settings (see :mod:`peftlab.labs` for the environment variables)."""

    name: str
    folder: Path  # labs/<name>
    root: Path  # the repository root (relative recipe paths are relative to it, as for the CLI)
    output: Path
    variant: str
    smoke: bool

    @classmethod
    def open(cls, name: str, *, variant: str | None = None, output: str | os.PathLike | None = None) -> "Lab":
        folder = find_lab_folder(name)
        root = folder.parent.parent
        variant = (variant or os.environ.get(RECIPE_ENV) or "offline").strip().lower()
        if variant not in VARIANTS:
            raise PeftlabError(f"${RECIPE_ENV} must be one of {', '.join(VARIANTS)}; got '{variant}'.")
        out = output or os.environ.get(OUTPUT_ENV) or root / "runs" / "labs" / name
        return cls(name=name, folder=folder, root=root, output=Path(out).expanduser().resolve(),
                   variant=variant, smoke=smoke())

    @property
    def default_output(self) -> Path:
        return self.root / "runs" / "labs" / self.name

    @property
    def recipe_path(self) -> Path:
        return self.folder / ("recipe.yaml" if self.variant == "hub" else "recipe.offline.yaml")

    def recipe(self) -> dict[str, Any]:
        """The recipe's options with relative paths made absolute (see :meth:`resolve_path`)."""
        from peftlab.training import load_recipe

        options = load_recipe(self.recipe_path)
        for key in PATH_OPTIONS:
            if isinstance(options.get(key), str):
                options[key] = self.resolve_path(key, options[key])
        return options

    def resolve_path(self, key: str, value: str) -> str:
        """Recipe paths are relative to the repository root (as for ``peftlab train --config`` run there);
        paths inside ``runs/labs/<lab>/`` follow ``$PEFTLAB_LAB_OUTPUT``. Hub ids stay as they are."""
        if key == "model" and not value.startswith(("runs/", "./", "../", "/")) and not (self.root / value).exists():
            return value  # a Hub id or a bundled alias
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.root / path
        path = Path(os.path.normpath(path))
        try:
            return str(self.output / path.relative_to(self.default_output))
        except ValueError:
            return str(path)

    @property
    def eval_limit(self) -> int | None:
        """``max_eval_samples`` for evaluations outside training: the smoke budget's, else the whole dev set."""
        return SMOKE_BUDGET["max_eval_samples"] if self.smoke else None

    @property
    def data_dir(self) -> str | None:
        """The recipe's ``data_dir`` (resolved), or None: then ``$PEFTLAB_DATA_DIR`` or the Hub, as for the CLI."""
        return self.recipe().get("data_dir")

    def run_dir(self, run: str = "run") -> Path:
        return self.output / run

    def options(self, run: str = "run", **overrides) -> dict[str, Any]:
        """Options for ``peftlab.train(**options)``: the recipe, then ``overrides``, then the smoke budget;
        the run goes to ``<output>/<run>``."""
        options = self.recipe()
        options.update(overrides)
        options["output"] = str(self.run_dir(run))
        if self.smoke:
            options.update(SMOKE_BUDGET)
            from peftlab.tasks import get_task

            if TaskKind(get_task(options.get("task", "sst2")).kind).is_generative:
                options["max_length"] = min(int(options.get("max_length", 128)), SMOKE_GENERATIVE_MAX_LENGTH)
            if options.get("model") in SMOKE_MODELS:
                from peftlab.labs.standins import smoke_llama

                options["model"] = str(smoke_llama())
        return options

    def nproc(self, default: int = 2) -> int:
        """Processes for the distributed labs: ``$PEFTLAB_LAB_NPROC``, else ``default``."""
        value = os.environ.get(NPROC_ENV, "").strip()
        if not value:
            return default
        if not value.isdigit() or int(value) < 1:
            raise PeftlabError(f"${NPROC_ENV} must be a positive number of processes; got '{value}'.")
        return int(value)

    def describe(self) -> None:
        print(f"lab      {self.name} ({self.folder})")
        print(f"recipe   {self.recipe_path.name} ({self.variant}; set ${RECIPE_ENV}=hub|offline to switch)")
        print(f"output   {self.output} (${OUTPUT_ENV})")
        print(f"smoke    {'yes: smallest budgets, tiny stand-in for smollm2 (numbers mean nothing)' if self.smoke else 'no'}"
              f" (${SMOKE_ENV})")


def find_lab_folder(name: str) -> Path:
    """``labs/<name>``, found from the working directory (the lab folder itself or the repository)."""
    cwd = Path.cwd().resolve()
    if cwd.name == name and (cwd / "recipe.yaml").is_file():
        return cwd
    for parent in (cwd, *cwd.parents):
        candidate = parent / "labs" / name
        if (candidate / "recipe.yaml").is_file():
            return candidate
    raise PeftlabError(f"Cannot find the lab folder 'labs/{name}' from '{cwd}': open the notebook from the "
                       "repository (labs/<lab>/) or run it from the repository root.")


def fresh_run(run_dir: str | os.PathLike) -> Path:
    """Remove an earlier run in ``run_dir`` so that re-running the training notebook retrains."""
    path = Path(run_dir)
    if path.exists():
        print(f"removing the earlier run in {path}")
        shutil.rmtree(path)
    return path


def load_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise PeftlabError(f"'{run_dir}' has no metrics.json: run the 02-Train notebook first.")
    return json.loads(path.read_text())


def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``<run>/log.jsonl`` (one per logging step and per evaluation)."""
    from peftlab import plots

    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise PeftlabError(f"'{run_dir}' has no log.jsonl: run the 02-Train notebook first.")
    return plots.read_log(path)


__all__ = ["SMOKE_ENV", "OUTPUT_ENV", "RECIPE_ENV", "NPROC_ENV", "VARIANTS", "SMOKE_BUDGET",
           "SMOKE_GENERATIVE_MAX_LENGTH", "SMOKE_MODELS", "PATH_OPTIONS", "smoke", "Lab", "find_lab_folder",
           "fresh_run", "load_metrics", "read_log"]
