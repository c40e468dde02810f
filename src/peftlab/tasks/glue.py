"""The GLUE benchmark: every task from its column spec alone.

Local layout is what GLUE's own download script produces: ``<data_dir>/glue/<DIR>/{train,dev}.tsv``
(MNLI's dev is ``dev_matched.tsv``; CoLA's files have no header). The Hub source is
``nyu-mll/glue``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from peftlab import metrics
from peftlab.errors import PeftlabError
from peftlab.tasks.base import Task, load_hub_dataset
from peftlab.tasks.tabular import read_rows, require_columns


@dataclass(frozen=True)
class GlueSpec:
    directory: str  # folder under glue/
    text: str  # column of the first text (local TSV)
    text_pair: str | None  # column of the second text, if any
    label: str  # label column (local TSV)
    hub_text: str
    hub_text_pair: str | None
    label_names: tuple[str, ...] | None  # None = regression
    metric_name: str
    dev_file: str = "dev.tsv"
    headerless: tuple[str, ...] | None = None  # column names for headerless files
    description: str = ""


GLUE = {
    "cola": GlueSpec("CoLA", "sentence", None, "label", "sentence", None, ("0", "1"), "mcc",
                     headerless=("source", "label", "original_label", "sentence"),
                     description="grammatical acceptability (Matthews correlation)"),
    "sst2": GlueSpec("SST-2", "sentence", None, "label", "sentence", None, ("0", "1"), "accuracy",
                     description="movie-review sentiment, binary (accuracy)"),
    "mrpc": GlueSpec("MRPC", "#1 String", "#2 String", "Quality", "sentence1", "sentence2", ("0", "1"), "f1",
                     description="paraphrase detection (F1 and accuracy)"),
    "qqp": GlueSpec("QQP", "question1", "question2", "is_duplicate", "question1", "question2", ("0", "1"), "f1",
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
    "wnli": GlueSpec("WNLI", "sentence1", "sentence2", "label", "sentence1", "sentence2", ("0", "1"), "accuracy",
                     description="Winograd NLI (accuracy)"),
}


class GlueTask(Task):
    def __init__(self, name: str, **options):
        spec = GLUE[name]
        super().__init__(
            name=name,
            kind="seq-cls",
            metric_name=spec.metric_name,
            description=f"GLUE {spec.directory}: {spec.description}",
            label_names=list(spec.label_names) if spec.label_names else None,
            is_regression=spec.label_names is None,
            options=options,
        )
        self.spec = spec

    def _load_local(self, split: str, data_dir: Path | None):
        import datasets

        spec = self.spec
        folder = data_dir / "glue" / spec.directory
        path = folder / ("train.tsv" if split == "train" else spec.dev_file)
        if not path.is_file():
            raise PeftlabError(
                f"Task '{self.name}': expected the {split} file at '{path}' (GLUE's raw layout: "
                f"glue/{spec.directory}/train.tsv and {spec.dev_file}). Download GLUE there, or unset "
                "--data-dir/$PEFTLAB_DATA_DIR to load from the Hub."
            )
        rows = read_rows(path, delimiter="\t", header=list(spec.headerless) if spec.headerless else True,
                         quoting=csv.QUOTE_NONE)
        columns = [spec.text, spec.label] + ([spec.text_pair] if spec.text_pair else [])
        records = []
        for line_number, row in rows:
            require_columns(path, line_number, row, columns)
            label = row[spec.label].strip()
            if self.is_regression:
                try:
                    value: str | float = float(label)
                except ValueError:
                    raise PeftlabError(f"{path}, line {line_number}: field '{spec.label}' is '{label}', not a number.") from None
            else:
                if label not in spec.label_names:
                    raise PeftlabError(
                        f"{path}, line {line_number}: unknown label '{label}' in field '{spec.label}'. "
                        f"Task '{self.name}' has labels: {', '.join(spec.label_names)}."
                    )
                value = label
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
            label = float(row["label"]) if self.is_regression else spec.label_names[int(row["label"])]
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
