"""Alpaca-format instruction following (causal language modelling, dev perplexity).

Local layout: ``<data_dir>/alpaca/alpaca_en_demo.json``, a JSON list of
``{"instruction", "input", "output"}`` objects (``input`` may be empty or absent). Hub source:
``tatsu-lab/alpaca`` (train only).

Each record becomes ``prompt`` = the standard Alpaca prompt template (the variant with an
``### Input:`` section when ``input`` is non-empty), ending in ``"### Response:\\n"``, and
``response`` = ``output``. Neither source has a dev split, so one is made deterministically: a
seed-42 shuffle of the records in file order (:func:`peftlab.tasks.tabular.seeded_split`), the last
10% are dev and the rest train. On the shared 999-record sample that is 899 train / 100 dev.
"""

from __future__ import annotations

from pathlib import Path

from peftlab import metrics
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.tasks.base import Task, load_hub_dataset
from peftlab.tasks.tabular import is_file, read_rows, seeded_split

FILE = "alpaca_en_demo.json"
DEV_FRACTION = 0.1
HUB_PATH = "tatsu-lab/alpaca"

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one instruction (and optional input), ending in ``### Response:\\n``."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _split(records: list[dict], split: str) -> list[dict]:
    train_index, dev_index = seeded_split(len(records), DEV_FRACTION)
    return [records[i] for i in (train_index if split == "train" else dev_index)]


class AlpacaTask(Task):
    def __init__(self, name: str = "alpaca", **options):
        super().__init__(
            name=name,
            kind=TaskKind.CAUSAL_LM,
            metric_name="perplexity",
            description="Alpaca-format instruction following (dev perplexity, lower is better)",
            higher_is_better=False,
            options=options,
        )

    def format_prompt(self, instruction: str, input: str = "") -> str:
        """The prompt ``peftlab predict`` and the server build for one instruction (see :func:`format_prompt`)."""
        return format_prompt(instruction, input)

    def _load_local(self, split: str, data_dir: Path | None):
        import datasets

        path = data_dir / "alpaca" / FILE
        if not is_file(path):
            raise PeftlabError(
                f"Task '{self.name}': expected '{path}' (raw layout: alpaca/{FILE}, a JSON list of "
                "{instruction, input, output} records; split 90/10 into train/dev here). Put the file there, "
                "or unset --data-dir/$PEFTLAB_DATA_DIR to load from the Hub."
            )
        records = []
        for line_number, row in read_rows(path, delimiter=None):
            fields = {}
            for key, required in (("instruction", True), ("input", False), ("output", True)):
                value = row.get(key)
                if value is None and not required:
                    value = ""
                if not isinstance(value, str) or (required and not value.strip()):
                    problem = "is missing" if key not in row else (
                        "is empty" if isinstance(value, str) else f"is a JSON {type(value).__name__}, not a string")
                    raise PeftlabError(
                        f"{path}, line {line_number}: field '{key}' {problem}. Each Alpaca record needs a "
                        f"non-empty 'instruction' and 'output' string ('input' may be empty). "
                        f"Fields present: {', '.join(repr(k) for k in row)}."
                    )
                fields[key] = value
            records.append({"prompt": format_prompt(fields["instruction"], fields["input"]),
                            "response": fields["output"]})
        return datasets.Dataset.from_list(_split(records, split))

    def _load_hub(self, split: str):
        import datasets

        raw = load_hub_dataset(HUB_PATH, None, "train", self.name)
        records = [
            {"prompt": format_prompt(row["instruction"], row.get("input") or ""), "response": row["output"]}
            for row in raw
        ]
        return datasets.Dataset.from_list(_split(records, split))

    def compute_metrics(self, predictions, references=None):
        """Loss and perplexity from the dev set's mean token loss.

        Called as ``compute_metrics(mean_loss, None)``: ``predictions`` is the mean cross-entropy (in
        nats) over all response tokens of the dev set, ``references`` is unused. Returns
        ``metrics.language_modeling(mean_loss)``: ``{"loss": ..., "perplexity": exp(loss)}``.
        """
        return metrics.language_modeling(float(predictions))

    def generation_metrics(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        """Generated responses against the dataset's (``eval``/``compare --generate``): ROUGE-L F1, exact match
        and chrF (``metrics.generation``)."""
        return metrics.generation(predictions, references)
