"""IMDB movie-review sentiment (Maas et al. 2011), binary, accuracy.

Local layout: ``<data_dir>/imdb/imdb.csv`` with columns ``text,label`` (label 0 = negative,
1 = positive); a stray repeated header row is dropped. The file is one sample, so it is split here,
deterministically: the data rows (file order, header rows removed) go through a seed-42 shuffle
(:func:`peftlab.tasks.tabular.seeded_split`), the last 20% are dev and the first 80% train. On the
shared 2,000-review sample that is 1,600 train / 400 dev.

Hub source: ``stanfordnlp/imdb`` (``train`` = train, ``test`` = dev, 25,000 each).

Review text has its ``<br />`` HTML line breaks replaced by a single space on both paths.
"""

from __future__ import annotations

import re
from pathlib import Path

from peftlab import metrics
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.tasks.base import Task, load_hub_dataset
from peftlab.tasks.tabular import is_file, read_rows, require_columns, seeded_split

LABELS = ["0", "1"]
DEV_FRACTION = 0.2
HUB_PATH = "stanfordnlp/imdb"
HUB_SPLITS = {"train": "train", "dev": "test"}

_BREAKS = re.compile(r"(?:\s*<br\s*/?>\s*)+", re.IGNORECASE)


def clean_review(text: str) -> str:
    """Replace each run of ``<br />`` tags (and the spaces around them) with one space."""
    return _BREAKS.sub(" ", text).strip()


class ImdbTask(Task):
    def __init__(self, name: str = "imdb", **options):
        super().__init__(
            name=name,
            kind=TaskKind.SEQ_CLS,
            metric_name="accuracy",
            description="IMDB movie-review sentiment, binary (accuracy)",
            label_names=list(LABELS),
            options=options,
        )

    def _load_local(self, split: str, data_dir: Path | None):
        import datasets

        path = data_dir / "imdb" / "imdb.csv"
        if not is_file(path):
            raise PeftlabError(
                f"Task '{self.name}': expected '{path}' (raw layout: imdb/imdb.csv with columns text,label; "
                "it is split 80/20 into train/dev here). Put the file there, or unset "
                "--data-dir/$PEFTLAB_DATA_DIR to load from the Hub."
            )
        records = []
        for line_number, row in read_rows(path, delimiter=",", columns=["text", "label"]):
            require_columns(path, line_number, row, ["text", "label"])
            label = row["label"].strip()
            if label not in LABELS:
                raise PeftlabError(
                    f"{path}, line {line_number}: unknown label '{label}' in field 'label'. "
                    f"Task '{self.name}' has labels: {', '.join(LABELS)} (0 = negative, 1 = positive)."
                )
            records.append({"text": clean_review(row["text"]), "text_pair": None, "label": label})
        train_index, dev_index = seeded_split(len(records), DEV_FRACTION)
        chosen = train_index if split == "train" else dev_index
        return datasets.Dataset.from_list([records[i] for i in chosen])

    def _load_hub(self, split: str):
        import datasets

        raw = load_hub_dataset(HUB_PATH, None, HUB_SPLITS[split], self.name)
        records = [
            {"text": clean_review(row["text"]), "text_pair": None, "label": LABELS[int(row["label"])]}
            for row in raw
        ]
        return datasets.Dataset.from_list(records)

    def compute_metrics(self, predictions, references):
        """Accuracy over label ids (0 = negative, 1 = positive)."""
        return metrics.classification(predictions, references)
