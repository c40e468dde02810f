"""CoNLL-2003 English named-entity recognition (token classification, entity-level F1).

Local layout: ``<data_dir>/conll2003/train.txt`` and ``valid.txt`` (dev = ``valid.txt``; the test file
is not used). One token per line as ``token POS chunk NER``, a blank line between sentences,
``-DOCSTART-`` document markers skipped. Tags are IOB2; files in the original release's IOB1 (an
entity may start with ``I-``) are converted to IOB2 on reading, which leaves IOB2 files unchanged.

Hub source: ``eriktks/conll2003`` (``train`` / ``validation``), whose integer ``ner_tags`` follow
the same order as :data:`LABELS`.
"""

from __future__ import annotations

from pathlib import Path

from peftlab import metrics
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.tasks.base import Task, load_hub_dataset
from peftlab.tasks.tabular import is_file, read_text

LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
FILES = {"train": "train.txt", "dev": "valid.txt"}
HUB_PATH = "eriktks/conll2003"
HUB_SPLITS = {"train": "train", "dev": "validation"}


def to_iob2(tags: list[str]) -> list[str]:
    """IOB1 -> IOB2: an ``I-X`` that does not continue an ``X`` entity starts one (``B-X``)."""
    result = []
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            tag = "B-" + tag[2:]
        result.append(tag)
        previous = tag
    return result


def read_conll(path: Path, label_names: list[str] = LABELS) -> list[dict]:
    """Sentences of a CoNLL-2003 file as ``{"tokens": [...], "tags": [...]}``."""
    text = read_text(path)
    known = set(label_names)
    sentences: list[dict] = []
    tokens: list[str] = []
    tags: list[str] = []

    def flush():
        if tokens:
            sentences.append({"tokens": list(tokens), "tags": to_iob2(tags)})
            tokens.clear()
            tags.clear()

    # split on \n only: tokens are never split, and str.splitlines would also break on \x85 & co.
    for line_number, line in enumerate(text.split("\n"), start=1):
        fields = line.split()
        if not fields:
            flush()
            continue
        if fields[0] == "-DOCSTART-":
            flush()
            continue
        if len(fields) != 4:
            raise PeftlabError(
                f"{path}, line {line_number}: expected 4 space-separated fields (token POS chunk NER) "
                f"but found {len(fields)}: {line.strip()[:80]!r}. Fix the line, or separate sentences "
                "with a completely blank line."
            )
        tag = fields[3]
        if tag not in known:
            raise PeftlabError(
                f"{path}, line {line_number}: unknown NER tag {tag!r} in field 'NER' (the 4th). "
                f"CoNLL-2003 tags are: {', '.join(label_names)}."
            )
        tokens.append(fields[0])
        tags.append(tag)
    flush()
    if not sentences:
        raise PeftlabError(f"{path}: no sentences found (only blank and -DOCSTART- lines).")
    return sentences


class Conll2003Task(Task):
    def __init__(self, name: str = "conll2003", **options):
        super().__init__(
            name=name,
            kind=TaskKind.TOKEN_CLS,
            metric_name="f1",
            description="CoNLL-2003 English NER: PER, ORG, LOC, MISC (seqeval entity F1)",
            label_names=list(LABELS),
            options=options,
        )

    def _load_local(self, split: str, data_dir: Path | None):
        import datasets

        path = data_dir / "conll2003" / FILES[split]
        if not is_file(path):
            raise PeftlabError(
                f"Task '{self.name}': expected the {split} file at '{path}' (raw layout: conll2003/train.txt "
                "and conll2003/valid.txt, 'token POS chunk NER' per line). Put the files there, or unset "
                "--data-dir/$PEFTLAB_DATA_DIR to load from the Hub."
            )
        return datasets.Dataset.from_list(read_conll(path, self.label_names))

    def _load_hub(self, split: str):
        import datasets

        raw = load_hub_dataset(HUB_PATH, None, HUB_SPLITS[split], self.name)
        records = [
            {"tokens": list(row["tokens"]), "tags": [LABELS[int(t)] for t in row["ner_tags"]]}
            for row in raw
        ]
        return datasets.Dataset.from_list(records)

    def compute_metrics(self, predictions, references):
        """Entity-level precision/recall/F1 (seqeval, CoNLL's definition) and token accuracy.

        ``predictions`` and ``references``: one list of tags per sentence, as tag strings or as
        ids into :attr:`label_names`.
        """
        return metrics.entities(self._as_tags(predictions), self._as_tags(references))

    def _as_tags(self, sequences) -> list[list[str]]:
        names = self.label_names
        return [[tag if isinstance(tag, str) else names[int(tag)] for tag in sentence] for sentence in sequences]
