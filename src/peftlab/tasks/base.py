"""What a task is: where its data comes from, what an example looks like, how it is scored.

Every task module returns its splits as a ``datasets.Dataset`` in one normalized schema per task
kind, so that preprocessing, training and scoring never look at a raw file layout:

=============  ==============================================================================
kind           columns
=============  ==============================================================================
``seq-cls``    ``text`` (str), ``text_pair`` (str or None), ``label`` (str; float for regression)
``token-cls``  ``tokens`` (list[str]), ``tags`` (list[str], IOB2)
``causal-lm``  ``prompt`` (str), ``response`` (str)
``seq2seq``    ``source`` (str), ``target`` (str)
``qa``         ``id`` (str), ``question`` (str), ``context`` (str), ``answers`` ({``text``: [str], ``answer_start``: [int]})
=============  ==============================================================================

Labels stay strings here; the label <-> id mapping is decided once from the task (fixed label sets
such as GLUE's) or from the training data (user files) and saved with the adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from peftlab.errors import PeftlabError
from peftlab.kinds import ALL_KINDS, TaskKind  # noqa: F401 (TaskKind re-exported for task modules)

TASK_KINDS = ALL_KINDS
SPLITS = ("train", "dev")
DATA_DIR_ENV = "PEFTLAB_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """--data-dir wins over $PEFTLAB_DATA_DIR; None means 'use the Hugging Face Hub'."""
    value = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        source = "--data-dir" if data_dir else f"${DATA_DIR_ENV}"
        raise PeftlabError(
            f"Data directory '{path}' (from {source}) does not exist. Point {source} at a folder in the "
            "official raw layouts (for example glue/SST-2/train.tsv), or unset it to load from the Hub."
        )
    return path


@dataclass
class Task:
    """One task: a loader per split and a scorer. Subclasses fill in ``_load_local``/``_load_hub``."""

    name: str
    kind: str
    metric_name: str
    description: str = ""
    label_names: list[str] | None = None  # fixed label set; None = taken from the training data
    is_regression: bool = False
    higher_is_better: bool = True  # False for loss/perplexity
    options: dict[str, Any] = field(default_factory=dict)  # what the user passed (files, columns)

    def __post_init__(self):
        self.kind = TaskKind.parse(self.kind)

    def load(self, split: str, data_dir: str | os.PathLike | None = None):
        """The split as a normalized ``datasets.Dataset`` (see the module docstring)."""
        if split not in SPLITS:
            raise PeftlabError(f"Unknown split '{split}' for task '{self.name}'. Use one of: {', '.join(SPLITS)}.")
        directory = None if self.local_only else resolve_data_dir(data_dir)
        if directory is not None or self.local_only:
            dataset = self._load_local(split, directory)
        else:
            dataset = self._load_hub(split)
        if len(dataset) == 0:
            raise PeftlabError(f"The {split} split of task '{self.name}' is empty. Check the data files.")
        return dataset

    @property
    def local_only(self) -> bool:
        """Tasks over the user's own files never go to the Hub."""
        return False

    def _load_local(self, split: str, data_dir: Path | None):  # pragma: no cover - abstract
        raise NotImplementedError

    def _load_hub(self, split: str):  # pragma: no cover - abstract
        raise NotImplementedError

    def labels_from(self, train_dataset) -> list[str] | None:
        """The label set to train with: fixed for known tasks; user-file tasks derive it from train."""
        return self.label_names

    def use_saved_label_names(self, saved: list[str] | None) -> None:
        """Load labels under the names a trained run saved when they spell this task's label set another way.

        Call it before scoring a saved run on freshly loaded data. GLUE runs saved before peftlab used
        GLUE's own names stored ``"0"``/``"1"`` (:meth:`peftlab.tasks.glue.GlueTask.use_saved_label_names`);
        other tasks have nothing to adapt."""

    def prepare_tokenizer(self, tokenizer):
        """The tokenizer as this task renders with it (own chat data: ``--chat-template``); unchanged by default."""
        return tokenizer

    def save_with_adapter(self, adapter_dir: Path, tokenizer) -> None:
        """Write what predict and serve need beside the trained weights (own chat data: the chat template)."""

    def recorded_options(self) -> dict[str, Any]:
        """Options the run must remember beyond those given (a dev split made here: its fraction and seed)."""
        return {}

    def compute_metrics(self, predictions, references) -> dict[str, float]:  # pragma: no cover
        """``predictions`` and ``references`` in the task's own terms (label ids, tag lists, ...)."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "metric_name": self.metric_name,
            "label_names": self.label_names,
            "is_regression": self.is_regression,
            "options": self.options,
        }


def select(dataset, limit: int | None, seed: int):
    """A seeded random subset of ``limit`` examples (the whole set when ``limit`` is None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit <= 0:
        raise PeftlabError(f"The example limit must be positive; got {limit}.")
    return dataset.shuffle(seed=seed).select(range(limit))


def load_hub_dataset(path: str, name: str | None, split: str, task_name: str):
    """``datasets.load_dataset`` with one clear message when the Hub cannot be reached."""
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as error:  # the Hub raises many different types when offline
        raise PeftlabError(
            f"Could not load task '{task_name}' from the Hugging Face Hub ({path}"
            f"{'/' + name if name else ''}, split {split}): {type(error).__name__}: {str(error).splitlines()[0][:200]}. "
            f"To run offline, point --data-dir or ${DATA_DIR_ENV} at a folder with the raw files "
            "(for example glue/SST-2/train.tsv); see docs/data.md."
        ) from None


TaskFactory = Callable[..., Task]
