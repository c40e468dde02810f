"""The user's own data: sequence classification (or regression) from CSV, TSV or JSON Lines files.

    peftlab train --method lora --task csv --train-file a.csv --dev-file b.csv \\
        --text-column review --label-column stars [--text-pair-column other] [--regression]

Options (keyword arguments of :class:`FileTask`): ``train_file``, ``dev_file``, ``text_column``,
``label_column`` (all required to load), ``text_pair_column``, ``label_names`` (a list, or a
comma-separated string, fixing the label set and its order; saved with a trained adapter so that
reloading does not need the training file), ``regression`` (labels are numbers; scored by Pearson).

Format: each file is read by its extension (``.csv`` comma-separated, ``.tsv`` tab-separated,
``.jsonl`` one JSON object per line, ``.json`` a JSON list of objects), whichever of ``csv``,
``tsv`` or ``jsonl`` the task is called: ``--task csv`` with a ``.tsv`` file reads it as TSV. A file
with any other extension (``.txt``, none) is read in the task's own format. CSV/TSV files need a
header row naming the columns; when it lacks the requested columns and the file uses another
delimiter (a ``;``-separated ``.csv``), the file is read with that delimiter if its header then has
them (:func:`peftlab.tasks.tabular.read_rows`).

Labels stay strings (JSON numbers and booleans are written as in JSON: ``1``, ``true``). An empty
label, or a missing-value marker as spreadsheets and pandas write them (``NaN``, ``NA``, ``N/A``,
``null``, ``None``, ...: :data:`MISSING_LABELS`), is an error naming the file and line, unless
``label_names`` lists it as a real class; regression labels must be finite numbers. Without
``label_names`` the label set is the sorted distinct labels of the training file (numerically when
every label is a number, so ``2`` comes before ``10``); a dev label outside it is an error naming the
file, line and label. The files are never looked up on the Hub.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from peftlab import metrics
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.tasks.base import SPLITS, Task
from peftlab.tasks.tabular import check_file, read_rows, read_text

FORMATS = {"csv": ",", "tsv": "\t", "jsonl": None}
EXTENSIONS = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".json": None}
FILE_OPTIONS = {"train": ("train_file", "--train-file"), "dev": ("dev_file", "--dev-file")}
KNOWN_OPTIONS = ("train_file", "dev_file", "text_column", "text_pair_column", "label_column", "label_names",
                 "regression")
# What spreadsheets, R and pandas write for a missing value (pandas' default ``na_values``, compared without
# case): such a label is a hole in the data, not a class of its own.
MISSING_LABELS = frozenset({
    "nan", "-nan", "na", "n/a", "#n/a", "#n/a n/a", "#na", "<na>", "null", "none", "nil",
    "1.#ind", "-1.#ind", "1.#qnan", "-1.#qnan",
})


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _as_bool(value: Any, option: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0", ""):
        return value.strip().lower() in ("true", "yes", "1")
    raise PeftlabError(f"Option {_flag(option)} must be true or false, not {value!r}.")


def _as_label_names(value: Any) -> list[str]:
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)):
        names = [_label_string(v) if not isinstance(v, str) else v.strip() for v in value]
    else:
        raise PeftlabError(f"Option --label-names must be a list of labels (or 'a,b,c'), not {value!r}.")
    if not names or any(name == "" for name in names):
        raise PeftlabError(f"Option --label-names has an empty label: {value!r}. Give labels as 'a,b,c'.")
    if len(set(names)) != len(names):
        raise PeftlabError(f"Option --label-names lists a label twice: {', '.join(names)}.")
    return names


def _label_string(value: Any) -> str:
    """A label from a file as a string: CSV text stripped; JSON scalars as JSON writes them."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value)


def _header_line(path: Path) -> int:
    """The line a CSV/TSV header is on (1 unless the file starts with blank lines)."""
    text = read_text(path)
    line = 1
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if raw.strip():
            return line
        line += 1
    return 1


def _sort_labels(labels) -> list[str]:
    """Sorted distinct labels: numerically when all parse as finite numbers, else as strings."""
    labels = set(labels)
    try:
        values = {label: float(label) for label in labels}
    except ValueError:
        return sorted(labels)
    if not all(math.isfinite(v) for v in values.values()):
        return sorted(labels)
    return sorted(labels, key=lambda label: (values[label], label))


class FileTask(Task):
    """Sequence classification or regression over the user's CSV/TSV/JSON Lines files."""

    def __init__(self, name: str = "csv", **options):
        if name not in FORMATS:
            raise PeftlabError(f"File task '{name}' is not one of: {', '.join(FORMATS)}.")
        regression = _as_bool(options.get("regression", False), "regression")
        label_names = options.get("label_names")
        if label_names is not None:
            if regression:
                raise PeftlabError("--label-names and --regression exclude each other: regression labels are numbers.")
            label_names = _as_label_names(label_names)
            options = {**options, "label_names": label_names}
        for option in ("train_file", "dev_file", "text_column", "text_pair_column", "label_column"):
            value = options.get(option)
            allowed = (str, os.PathLike) if option.endswith("_file") else str
            if value is not None and not isinstance(value, allowed):
                raise PeftlabError(f"Option {_flag(option)} must be a {'path' if option.endswith('_file') else 'column name'}, "
                                   f"not {value!r}.")
        super().__init__(
            name=name,
            kind=TaskKind.SEQ_CLS,
            metric_name="pearson" if regression else "accuracy",
            description=f"your own {name.upper()} files: "
                        f"{'regression (Pearson)' if regression else 'classification (accuracy, macro F1 above 2 labels)'}",
            label_names=label_names,
            is_regression=regression,
            options=options,
        )
        self._fixed_labels = label_names is not None
        self._train_labels: list[str] | None = None  # derived from the training file, cached

    @property
    def local_only(self) -> bool:
        return True

    def load(self, split: str, data_dir=None):
        """The split from the user's file. ``data_dir`` (and $PEFTLAB_DATA_DIR) play no part here.

        Overrides ``Task.load`` only because that resolves the data folder first, so a stale
        $PEFTLAB_DATA_DIR would fail a task that never reads it.
        """
        if split not in SPLITS:
            raise PeftlabError(f"Unknown split '{split}' for task '{self.name}'. Use one of: {', '.join(SPLITS)}.")
        return self._load_local(split, None)

    # -- loading ---------------------------------------------------------------------------------

    def _missing_options(self, split: str) -> None:
        needed = [FILE_OPTIONS[split][0], "text_column", "label_column"]
        missing = [option for option in needed if not self.options.get(option)]
        if missing:
            flags = [_flag(option) for option in missing]
            raise PeftlabError(
                f"Task '{self.name}' (your own files) needs {_join(flags)} to load the {split} split. "
                f"Example: peftlab train --method lora --task {self.name} --train-file train.{self.name} "
                f"--dev-file dev.{self.name} --text-column text --label-column label."
            )

    def _delimiter(self, path: Path) -> str | None:
        return EXTENSIONS.get(path.suffix.lower(), FORMATS[self.name])

    def _read(self, split: str) -> tuple[Path, list[tuple[int, dict]], list[dict]]:
        """(path, raw rows, normalized records) of one split; labels not yet checked against a set."""
        self._missing_options(split)
        option, flag = FILE_OPTIONS[split]
        path = Path(self.options[option]).expanduser()
        check_file(path, flag)
        text_column = self.options["text_column"]
        pair_column = self.options.get("text_pair_column")
        label_column = self.options["label_column"]
        columns = [text_column] + ([pair_column] if pair_column else []) + [label_column]
        rows = read_rows(path, delimiter=self._delimiter(path), columns=columns)
        records = []
        for index, (line_number, row) in enumerate(rows):
            missing = [c for c in columns if c not in row]
            if missing:
                if self._delimiter(path) is not None:  # CSV/TSV: every row has the header's columns
                    where = f"line {_header_line(path)} (the header)"
                else:
                    where = f"line {line_number}{' (first record)' if index == 0 else ''}"
                flags = {pair_column: "--text-pair-column", label_column: "--label-column", text_column: "--text-column"}
                raise PeftlabError(
                    f"{path}, {where}: no column {', '.join(repr(c) for c in missing)} "
                    f"(from {', '.join(flags[c] for c in missing)}). "
                    f"Columns present: {', '.join(repr(str(c)) for c in row)}."
                )
            record = {
                "text": self._text(path, line_number, row, text_column),
                "text_pair": self._text(path, line_number, row, pair_column) if pair_column else None,
                "label": self._label(path, line_number, row, label_column),
            }
            records.append(record)
        return path, rows, records

    def _text(self, path: Path, line_number: int, row: dict, column: str) -> str:
        value = row[column]
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise PeftlabError(
            f"{path}, line {line_number}: field '{column}' is "
            f"{'null' if value is None else 'a JSON ' + type(value).__name__}, not text."
        )

    def _label(self, path: Path, line_number: int, row: dict, column: str):
        value = row[column]
        where = f"{path}, line {line_number}: field '{column}' (the label)"
        if value is None or (isinstance(value, (list, dict))):
            raise PeftlabError(
                f"{where} is {'null' if value is None else 'a JSON ' + type(value).__name__}, not a label; "
                "fill it in or drop the row."
            )
        if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN / Infinity
            raise PeftlabError(f"{where} is {json.dumps(value)}, not a "
                               f"{'finite number' if self.is_regression else 'label'}; fill it in or drop the row.")
        label = _label_string(value)
        if label == "":
            raise PeftlabError(f"{where} is empty; fill it in or drop the row.")
        if self.is_regression:
            try:
                number = float(label)
            except ValueError:
                raise PeftlabError(f"{where} is '{label}', not a number (--regression needs numeric labels); "
                                   "fix it or drop the row.") from None
            if not math.isfinite(number):
                raise PeftlabError(f"{where} is '{label}', not a finite number (--regression needs numeric "
                                   "labels); fix it or drop the row.")
            return number
        if label.lower() in MISSING_LABELS and not (self._fixed_labels and label in self.label_names):
            raise PeftlabError(
                f"{where} is '{label}', a missing-value marker rather than a class; fill in the label or drop the "
                f"row (if '{label}' is a real class, list it in --label-names)."
            )
        return label

    def _check_labels(self, path: Path, rows, records, known: list[str]) -> None:
        allowed = set(known)
        for (line_number, _), record in zip(rows, records):
            if record["label"] not in allowed:
                source = "--label-names" if self._fixed_labels else f"the training file {self.options['train_file']}"
                raise PeftlabError(
                    f"{path}, line {line_number}: unknown label '{record['label']}' in field "
                    f"'{self.options['label_column']}'. Known labels (from {source}): {', '.join(known)}. "
                    + ("Fix the label, or add it to --label-names." if self._fixed_labels else
                       "Fix the label, or add examples of it to the training data.")
                )

    def _derive_train_labels(self, records: list[dict]) -> list[str]:
        if self._train_labels is None:
            self._train_labels = _sort_labels(r["label"] for r in records)
        return self._train_labels

    def _load_local(self, split: str, data_dir: Path | None):
        import datasets

        path, rows, records = self._read(split)
        if not self.is_regression:
            if self._fixed_labels:
                known = self.label_names
            elif split == "train":
                known = self._derive_train_labels(records)
            else:
                if self._train_labels is None:  # dev loaded first: the label set comes from train
                    self._derive_train_labels(self._read("train")[2])
                known = self._train_labels
            self._check_labels(path, rows, records, known)
        features = datasets.Features({
            "text": datasets.Value("string"),
            "text_pair": datasets.Value("string"),
            "label": datasets.Value("float64" if self.is_regression else "string"),
        })
        return datasets.Dataset.from_list(records, features=features)

    # -- labels and scores -----------------------------------------------------------------------

    def labels_from(self, train_dataset) -> list[str] | None:
        """The label set: ``label_names`` if given, else the sorted distinct labels of ``train_dataset``.

        Sets :attr:`label_names` (and ``options["label_names"]``, so that ``info()`` reloads the same
        mapping). None for regression.
        """
        if self.is_regression:
            return None
        if not self._fixed_labels:
            labels = _sort_labels(train_dataset["label"])
            if not labels:
                raise PeftlabError(f"Task '{self.name}': the training data has no labels.")
            self.label_names = labels
            self.options["label_names"] = list(labels)
        return self.label_names

    def compute_metrics(self, predictions, references):
        """Accuracy (+ macro F1 with more than two labels) over label ids; Pearson for regression."""
        if self.is_regression:
            return metrics.regression(predictions, references)
        n_labels = len(self.label_names) if self.label_names else len(set(list(references)))
        if n_labels > 2:
            return metrics.classification(predictions, references, f1=True, average="macro")
        return metrics.classification(predictions, references)
