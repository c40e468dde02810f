"""OpenAssistant Guanaco: chat-format supervised fine-tuning (causal language modelling, dev perplexity).

The dataset of the QLoRA paper's Guanaco models (Dettmers et al. 2023): the highest-rated paths of
OpenAssistant Conversations (OASST1), one conversation per record as a single ``text`` field of turns
``### Human: ...### Assistant: ...`` (multi-turn conversations repeat the pair).

Hub source: ``timdettmers/openassistant-guanaco`` (``train`` 9,846, ``test`` 518); ``dev`` = test.
Local layout: ``<data_dir>/guanaco/train.jsonl`` and ``<data_dir>/guanaco/test.jsonl`` (JSON Lines
with a ``text`` field, the Hub's own format). Without a test file, a seeded 10% of train is dev
(:func:`peftlab.tasks.tabular.seeded_split`).

Each conversation is split at its **last** ``### Assistant:`` marker: ``prompt`` is everything up to
and including that marker (earlier turns are context), ``response`` is the rest, so that
``prompt + response`` is the original text and the loss is on the final answer only. Records with
no ``### Assistant:`` marker, or nothing after the last one, are refused with their line number.
"""

from __future__ import annotations

from pathlib import Path

from peftlab import metrics
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.tasks.base import Task, load_hub_dataset
from peftlab.tasks.tabular import is_file, read_rows, seeded_split

HUB_PATH = "timdettmers/openassistant-guanaco"
HUB_SPLITS = {"train": "train", "dev": "test"}
HUMAN = "### Human:"
ASSISTANT = "### Assistant:"
DEV_FRACTION = 0.1


def split_conversation(text: str) -> tuple[str, str] | None:
    """(prompt, response) split after the last ``### Assistant:``; None if there is no answer to learn."""
    index = text.rfind(ASSISTANT)
    if index < 0:
        return None
    cut = index + len(ASSISTANT)
    prompt, response = text[:cut], text[cut:]
    if not response.strip():
        return None
    return prompt, response


def format_prompt(instruction: str, input: str = "") -> str:
    """A one-turn Guanaco prompt for a new message (``input``, if given, is appended to it)."""
    message = instruction.strip()
    if input and input.strip():
        message = f"{message}\n\n{input.strip()}"
    return f"{HUMAN} {message}{ASSISTANT}"


class GuanacoTask(Task):
    def __init__(self, name: str = "guanaco", **options):
        super().__init__(
            name=name,
            kind=TaskKind.CAUSAL_LM,
            metric_name="perplexity",
            description="OpenAssistant Guanaco chat SFT, '### Human: ... ### Assistant: ...' (dev perplexity)",
            higher_is_better=False,
            options=options,
        )

    def format_prompt(self, instruction: str, input: str = "") -> str:
        """Used by ``peftlab predict``: a raw message becomes a Guanaco prompt (a full prompt is kept)."""
        if ASSISTANT in instruction:
            return instruction
        return format_prompt(instruction, input)

    def _records(self, rows, path) -> list[dict]:
        records = []
        for line_number, row in rows:
            text = row.get("text")
            if not isinstance(text, str):
                problem = "is missing" if "text" not in row else f"is a JSON {type(text).__name__}, not a string"
                raise PeftlabError(f"{path}, line {line_number}: field 'text' {problem}. Each Guanaco record needs "
                                   f"a 'text' string. Fields present: {', '.join(repr(k) for k in row)}.")
            parts = split_conversation(text)
            if parts is None:
                raise PeftlabError(
                    f"{path}, line {line_number}: the conversation has no answer to learn: it needs a "
                    f"'{ASSISTANT}' turn followed by text (format: '{HUMAN} question{ASSISTANT} answer')."
                )
            records.append({"prompt": parts[0], "response": parts[1]})
        return records

    def _load_local(self, split: str, data_dir: Path | None):
        import datasets

        folder = data_dir / "guanaco"
        train_path = folder / "train.jsonl"
        dev_path = next((p for p in (folder / "test.jsonl", folder / "dev.jsonl") if is_file(p)), None)
        if split == "dev" and dev_path is not None:
            return datasets.Dataset.from_list(self._records(read_rows(dev_path, delimiter=None), dev_path))
        if not is_file(train_path):
            raise PeftlabError(
                f"Task '{self.name}': expected '{train_path}' (raw layout: guanaco/train.jsonl and "
                "guanaco/test.jsonl, one {\"text\": \"### Human: ...### Assistant: ...\"} object per line). Put the "
                "files there, or unset --data-dir/$PEFTLAB_DATA_DIR to load timdettmers/openassistant-guanaco "
                "from the Hub."
            )
        records = self._records(read_rows(train_path, delimiter=None), train_path)
        if dev_path is None:  # no test file: a deterministic 90/10 split of train
            train_index, dev_index = seeded_split(len(records), DEV_FRACTION)
            records = [records[i] for i in (train_index if split == "train" else dev_index)]
        return datasets.Dataset.from_list(records)

    def _load_hub(self, split: str):
        import datasets

        raw = load_hub_dataset(HUB_PATH, None, HUB_SPLITS[split], self.name)
        records = []
        for row in raw:
            parts = split_conversation(row["text"])
            if parts is not None:  # the Hub copy is clean; skip rather than fail on a stray record
                records.append({"prompt": parts[0], "response": parts[1]})
        return datasets.Dataset.from_list(records)

    def compute_metrics(self, predictions, references=None):
        """``compute_metrics(mean_loss, None)``: loss and perplexity of the dev responses."""
        return metrics.language_modeling(float(predictions))

    def generation_metrics(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        """Generated responses against the dataset's (``eval``/``compare --generate``): ROUGE-L F1, exact match
        and chrF (``metrics.generation``)."""
        return metrics.generation(predictions, references)
