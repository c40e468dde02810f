"""The user's own files, for every task kind: CSV, TSV, JSON Lines or a JSON list.

    peftlab train --method lora --task csv --train-file a.csv --dev-file b.csv \\
        --text-column review --label-column stars [--text-pair-column other] [--regression]
    peftlab train --task jsonl --train-file chats.jsonl --model smollm2          # a 'messages' column: chat
    peftlab train --task csv --train-file pairs.csv --prompt-column q --response-column a --model smollm2

What the columns mean, the forms they describe (classification, tagging, instruction, chat, plain text,
seq2seq) and how each is scored: :mod:`peftlab.tasks.own`. Options (keyword arguments of :class:`FileTask`):
``train_file`` (required), ``dev_file`` (default: a seeded ``dev_fraction`` of the training file),
``no_header``, the column options, ``label_names`` (a list, or a comma-separated string, fixing the label
set and its order; saved with a trained adapter), ``regression`` (labels are numbers; scored by Pearson).

Format: each file is read by its extension (``.csv`` comma-separated, ``.tsv`` tab-separated,
``.jsonl`` one JSON object per line, ``.json`` a JSON list of objects), whichever of ``csv``,
``tsv``, ``jsonl`` or ``json`` the task is called: ``--task csv`` with a ``.tsv`` file reads it as TSV. A
file with any other extension (``.txt``, none) is read in the task's own format. CSV/TSV files need a
header row naming the columns, unless ``no_header`` names them by position (``--text-column 0``); when the
header lacks the requested columns and the file uses another delimiter (a ``;``-separated ``.csv``), the
file is read with that delimiter if its header then has them (:func:`peftlab.tasks.tabular.read_rows`).

Labels: :mod:`peftlab.tasks.labels` (strings; empty labels and missing-value markers such as ``NaN`` are
refused with the file and line). The files are never looked up on the Hub.
"""

from __future__ import annotations

from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.tasks.labels import MISSING_LABELS  # noqa: F401 (part of this module's API)
from peftlab.tasks.own import OPTION_NAMES, OwnDataTask, Rows, join
from peftlab.tasks.tabular import check_file, read_rows, read_text

FORMATS = {"csv": ",", "tsv": "\t", "jsonl": None, "json": None}
EXTENSIONS = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".json": None}
# The options that name files (stored absolute with a run): the two splits', and a chat template's.
FILE_OPTIONS = {"train": ("train_file", "--train-file"), "dev": ("dev_file", "--dev-file"),
                "template": ("chat_template", "--chat-template")}
KNOWN_OPTIONS = OPTION_NAMES


def _header_line(path: Path) -> int:
    """The line a CSV/TSV header is on (1 unless the file starts with blank lines)."""
    text = read_text(path)
    line = 1
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if raw.strip():
            return line
        line += 1
    return 1


class FileTask(OwnDataTask):
    """Any task kind over the user's CSV/TSV/JSON Lines/JSON files."""

    def __init__(self, name: str = "csv", **options):
        if name not in FORMATS:
            raise PeftlabError(f"File task '{name}' is not one of: {', '.join(FORMATS)}.")
        self.example = (f"peftlab train --method lora --task {name} --train-file train.{name} --dev-file dev.{name} "
                        "--text-column text --label-column label")
        super().__init__(name, **options)
        self.description = self.description.replace("your own data", f"your own {name.upper()} files", 1)

    def has_dev_source(self) -> bool:
        return bool(self.options.get("dev_file"))

    def _delimiter(self, path: Path) -> str | None:
        return EXTENSIONS.get(path.suffix.lower(), FORMATS[self.name])

    def read_source(self, which: str) -> Rows:
        option, flag = FILE_OPTIONS[which]
        if not self.options.get(option):
            split = "dev" if which == "dev" else "train"
            raise PeftlabError(f"Task '{self.name}' (your own files) needs {join([flag])} to load the {split} split. "
                               f"Example: {self.example}.")
        path = Path(self.options[option]).expanduser()
        check_file(path, flag)
        delimiter = self._delimiter(path)
        headerless = bool(self.options.get("no_header")) and delimiter is not None
        form = self.form
        wanted = [self.options[o] for o in (*form.columns, *form.optional) if self.options.get(o)] if form else None
        rows = read_rows(path, delimiter=delimiter, columns=wanted, header=False if headerless else True)
        header = f"{path}, line {_header_line(path)} (the header)" if delimiter is not None and not headerless else None
        return Rows(source=str(path), items=[(f"{path}, line {line}", row) for line, row in rows],
                    columns=[str(column) for column in rows[0][1]], header=header)
