"""The GLUE benchmark: every task from its column spec alone.

Local layout is what GLUE's own download script produces: ``<data_dir>/glue/<DIR>/{train,dev}.tsv``
(MNLI's dev is ``dev_matched.tsv``; CoLA's files have no header). The Hub source is
``nyu-mll/glue``.

Labels are the names GLUE gives them, in the id order of the ``datasets`` library's GLUE features
(``ClassLabel(names=[...])``): CoLA unacceptable/acceptable, SST-2 negative/positive, MRPC
not_equivalent/equivalent, QQP not_duplicate/duplicate, MNLI entailment/neutral/contradiction, QNLI
and RTE entailment/not_entailment, WNLI not_entailment/entailment. The raw TSV files write some as ids
(``0``/``1``: CoLA, SST-2, MRPC, QQP, WNLI) and some as names (MNLI, QNLI, RTE); either is read.
Scores are computed on label ids, so the names change nothing there. Runs saved before peftlab used
these names stored ``"0"``/``"1"``: :meth:`GlueTask.use_saved_label_names` reads the data under those.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from peftlab import metrics
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.tasks.base import Task, load_hub_dataset
from peftlab.tasks.tabular import is_file, read_rows, require_columns


@dataclass(frozen=True)
class GlueSpec:
    directory: str  # folder under glue/
    text: str  # column of the first text (local TSV)
    text_pair: str | None  # column of the second text, if any
    label: str  # label column (local TSV)
    hub_text: str
    hub_text_pair: str | None
    label_names: tuple[str, ...] | None  # in id order, as GLUE names them; None = regression
    metric_name: str
    dev_file: str = "dev.tsv"
    headerless: tuple[str, ...] | None = None  # column names for headerless files
    description: str = ""


GLUE = {
    "cola": GlueSpec("CoLA", "sentence", None, "label", "sentence", None, ("unacceptable", "acceptable"), "mcc",
                     headerless=("source", "label", "original_label", "sentence"),
                     description="grammatical acceptability (Matthews correlation)"),
    "sst2": GlueSpec("SST-2", "sentence", None, "label", "sentence", None, ("negative", "positive"), "accuracy",
                     description="movie-review sentiment, binary (accuracy)"),
    "mrpc": GlueSpec("MRPC", "#1 String", "#2 String", "Quality", "sentence1", "sentence2",
                     ("not_equivalent", "equivalent"), "f1",
                     description="paraphrase detection (F1 and accuracy)"),
    "qqp": GlueSpec("QQP", "question1", "question2", "is_duplicate", "question1", "question2",
                    ("not_duplicate", "duplicate"), "f1",
                    description="duplicate Quora questions (F1 and accuracy)"),
    "stsb": GlueSpec("STS-B", "sentence1", "sentence2", "score", "sentence1", "sentence2", None, "pearson",
                     description="semantic similarity 0-5, regression (Pearson)"),
    "mnli": GlueSpec("MNLI", "sentence1", "sentence2", "gold_label", "premise", "hypothesis",
                     ("entailment", "neutral", "contradiction"), "accuracy", dev_file="dev_matched.tsv",
                     description="natural language inference, 3 classes (accuracy, matched dev)"),
    "qnli": GlueSpec("QNLI", "question", "sentence", "label", "question", "sentence",
                     ("entailment", "not_entailment"), "accuracy", description="question/answer entailment (accuracy)"),
    "rte": GlueSpec("RTE", "sentence1", "sentence2", "label", "sentence1", "sentence2",
                    ("entailment", "not_entailment"), "accuracy", description="textual entailment (accuracy)"),
    "wnli": GlueSpec("WNLI", "sentence1", "sentence2", "label", "sentence1", "sentence2",
                     ("not_entailment", "entailment"), "accuracy",
                     description="Winograd NLI (accuracy)"),
}


class GlueTask(Task):
    def __init__(self, name: str, **options):
        spec = GLUE[name]
        super().__init__(
            name=name,
            kind=TaskKind.SEQ_CLS,
            metric_name=spec.metric_name,
            description=f"GLUE {spec.directory}: {spec.description}",
            label_names=list(spec.label_names) if spec.label_names else None,
            is_regression=spec.label_names is None,
            options=options,
        )
        self.spec = spec

    def use_saved_label_names(self, saved: list[str] | None) -> None:
        """Read labels as ``"0"``, ``"1"``, ... when a run saved them so (peftlab before GLUE's names).

        The ids are the same either way, so the run's head and scores are unaffected; only the strings
        the data carries change to match the run's saved mapping."""
        if self.label_names and saved and list(saved) == [str(i) for i in range(len(self.spec.label_names))]:
            self.label_names = list(saved)

    def _label_id(self, raw: str) -> int | None:
        """A raw label (a name, or the id GLUE's TSV files write for some tasks) -> its id; None if neither."""
        names = self.spec.label_names
        if raw in names:
            return names.index(raw)
        if raw.isdigit() and int(raw) < len(names):
            return int(raw)
        return None

    def _load_local(self, split: str, data_dir: Path | None):
        import datasets

        spec = self.spec
        folder = data_dir / "glue" / spec.directory
        path = folder / ("train.tsv" if split == "train" else spec.dev_file)
        if not is_file(path):
            raise PeftlabError(
                f"Task '{self.name}': expected the {split} file at '{path}' (GLUE's raw layout: "
                f"glue/{spec.directory}/train.tsv and {spec.dev_file}). Download GLUE there, or unset "
                "--data-dir/$PEFTLAB_DATA_DIR to load from the Hub."
            )
        columns = [spec.text, spec.label] + ([spec.text_pair] if spec.text_pair else [])
        rows = read_rows(path, delimiter="\t", header=list(spec.headerless) if spec.headerless else True,
                         quoting=csv.QUOTE_NONE, columns=columns, follow_sniffed=False,
                         expected_by="GLUE's raw layout")
        records = []
        for line_number, row in rows:
            require_columns(path, line_number, row, columns)
            label = row[spec.label].strip()
            if self.is_regression:
                try:
                    value: str | float = float(label)
                except ValueError:
                    value = math.nan
                if not math.isfinite(value):
                    raise PeftlabError(f"{path}, line {line_number}: field '{spec.label}' is '{label}', not a finite "
                                       "number; fix the score or drop the row.")
            else:
                index = self._label_id(label)
                if index is None:
                    known = ", ".join(f"{name} ({i})" for i, name in enumerate(spec.label_names))
                    raise PeftlabError(f"{path}, line {line_number}: unknown label '{label}' in field '{spec.label}' "
                                       f"(task '{self.name}' has labels {known}); fix the label or drop the row.")
                value = self.label_names[index]
            records.append({
                "text": row[spec.text],
                "text_pair": row[spec.text_pair] if spec.text_pair else None,
                "label": value,
            })
        return datasets.Dataset.from_list(records)

    def _load_hub(self, split: str):
        import datasets

        spec = self.spec
        hub_split = "train" if split == "train" else ("validation_matched" if self.name == "mnli" else "validation")
        raw = load_hub_dataset("nyu-mll/glue", self.name, hub_split, self.name)
        records = []
        for row in raw:
            label = float(row["label"]) if self.is_regression else self.label_names[int(row["label"])]
            records.append({
                "text": row[spec.hub_text],
                "text_pair": row[spec.hub_text_pair] if spec.hub_text_pair else None,
                "label": label,
            })
        return datasets.Dataset.from_list(records)

    def compute_metrics(self, predictions, references):
        if self.is_regression:
            return metrics.regression(predictions, references)
        return metrics.classification(
            predictions, references, f1=self.metric_name == "f1", mcc=self.metric_name == "mcc"
        )
