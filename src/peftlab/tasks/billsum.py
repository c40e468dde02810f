"""BillSum: summarisation of US Congressional bills (Kornilova & Eidelman 2019), sequence to sequence.

Hub source: ``FiscalNote/billsum`` (columns ``text``, ``summary``, ``title``; splits ``train`` 18,949,
``test`` 3,269 and ``ca_test``). Here ``train`` = train and ``dev`` = test.

Local layout: ``<data_dir>/billsum/train.jsonl`` and ``<data_dir>/billsum/test.jsonl`` (JSON Lines with
``text`` and ``summary`` fields, other fields ignored), or the same as ``.csv`` files with ``text`` and
``summary`` columns. A ``dev.jsonl``/``dev.csv`` is accepted in place of the test file.

Each record becomes ``source`` = the bill text (whitespace runs collapsed: the raw bills are full of
indentation) and ``target`` = the summary.

Scoring. ``metric_name`` is ``perplexity``: the training loop and ``peftlab evaluate`` score seq2seq
models by teacher-forced dev loss (``peftlab.evaluation`` has no generation step). The task's own
summarisation metric is ROUGE-L F1 over *generated* summaries: :meth:`BillsumTask.generation_metrics`
(and :func:`rouge_l`), used by ``peftlab.labs.generation_scores`` and ``peftlab eval --generate``:
Google's ``rouge_score`` package (the scorer behind ``evaluate``'s "rouge"), ``rougeL`` with the Porter
stemmer, as in Hugging Face's summarisation examples.
"""

from __future__ import annotations

import re
from pathlib import Path

from peftlab import metrics
from peftlab.metrics import rouge_l
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.tasks.base import Task, load_hub_dataset
from peftlab.tasks.tabular import is_file, read_rows

HUB_PATH = "FiscalNote/billsum"
HUB_SPLITS = {"train": "train", "dev": "test"}
LOCAL_FILES = {"train": ("train",), "dev": ("test", "dev")}
_SPACES = re.compile(r"\s+")


def clean(text: str) -> str:
    """Collapse every whitespace run (the bills' indentation and line breaks) into one space."""
    return _SPACES.sub(" ", text).strip()


class BillsumTask(Task):
    def __init__(self, name: str = "billsum", **options):
        super().__init__(
            name=name,
            kind=TaskKind.SEQ2SEQ,
            metric_name="perplexity",
            description="BillSum bill summarisation (dev perplexity in training; ROUGE-L F1 of generated "
                        "summaries via generation_metrics)",
            higher_is_better=False,
            options=options,
        )

    generation_metric_name = "rougeL"

    def _load_local(self, split: str, data_dir: Path | None):
        import datasets

        folder = data_dir / "billsum"
        candidates = [folder / f"{stem}.{ext}" for stem in LOCAL_FILES[split] for ext in ("jsonl", "csv")]
        path = next((p for p in candidates if is_file(p)), None)
        if path is None:
            raise PeftlabError(
                f"Task '{self.name}': expected the {split} file at '{candidates[0]}' (raw layout: "
                "billsum/train.jsonl and billsum/test.jsonl with 'text' and 'summary' fields, or the same as "
                ".csv). Put the files there, or unset --data-dir/$PEFTLAB_DATA_DIR to load FiscalNote/billsum "
                "from the Hub."
            )
        records = []
        for line_number, row in read_rows(path, delimiter=None if path.suffix == ".jsonl" else ","):
            values = {}
            for key in ("text", "summary"):
                value = row.get(key)
                if not isinstance(value, str) or not value.strip():
                    problem = "is missing" if key not in row else (
                        "is empty" if isinstance(value, str) else f"is a JSON {type(value).__name__}, not a string")
                    raise PeftlabError(
                        f"{path}, line {line_number}: field '{key}' {problem}. Each BillSum record needs a "
                        f"non-empty 'text' and 'summary'. Fields present: {', '.join(repr(k) for k in row)}."
                    )
                values[key] = value
            records.append({"source": clean(values["text"]), "target": clean(values["summary"])})
        return datasets.Dataset.from_list(records)

    def _load_hub(self, split: str):
        import datasets

        raw = load_hub_dataset(HUB_PATH, None, HUB_SPLITS[split], self.name)
        return datasets.Dataset.from_list(
            [{"source": clean(row["text"]), "target": clean(row["summary"])} for row in raw])

    def compute_metrics(self, predictions, references=None):
        """``compute_metrics(mean_loss, None)`` -> loss and perplexity (what training reports), or, given
        lists of generated and reference strings, the ROUGE-L scores of :meth:`generation_metrics`."""
        if isinstance(predictions, (list, tuple)):
            return self.generation_metrics(predictions, references)
        return metrics.language_modeling(float(predictions))

    def generation_metrics(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        """Mean ROUGE-L F1 (``rougeL``), precision and recall of generated summaries."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        if not predictions:
            return {"rougeL": 0.0, "rougeL_precision": 0.0, "rougeL_recall": 0.0}
        scores = [rouge_l(p, r) for p, r in zip(predictions, references)]
        n = len(scores)
        return {"rougeL": sum(s["f1"] for s in scores) / n,
                "rougeL_precision": sum(s["precision"] for s in scores) / n,
                "rougeL_recall": sum(s["recall"] for s in scores) / n}
