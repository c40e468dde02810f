"""IMDB sentiment-conditioned review generation (causal language modelling, dev perplexity).

The generation task of the prefix-tuning / (IA)3 labs: from the IMDB reviews of
:mod:`peftlab.tasks.imdb` (same sources, same deterministic train/dev split), each review becomes

* ``prompt`` = ``"Write a positive movie review:\\n"`` or ``"Write a negative movie review:\\n"`` (from
  its label), and
* ``response`` = the review, cut to its first ``max_words`` words (default 64) and, when a sentence
  ends in the second half of that window, back to the end of that sentence,

so the model learns to write a review of the requested sentiment. The score in training is dev
perplexity of the responses; whether generated reviews actually carry the requested sentiment is
measured by a classifier trained with peftlab itself (``peftlab.labs.sentiment_agreement``).

Local layout and Hub source: as the ``imdb`` task (``<data_dir>/imdb/imdb.csv``; ``stanfordnlp/imdb``).
"""

from __future__ import annotations

import re
from pathlib import Path

from peftlab import metrics
from peftlab.kinds import TaskKind
from peftlab.tasks.base import Task
from peftlab.tasks.imdb import ImdbTask

SENTIMENTS = {"0": "negative", "1": "positive"}
PROMPT = "Write a {sentiment} movie review:\n"
MAX_WORDS = 64
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
_ALIASES = {"positive": "positive", "pos": "positive", "1": "positive", "+": "positive",
            "negative": "negative", "neg": "negative", "0": "negative", "-": "negative"}


def prompt_for(sentiment: str) -> str:
    """The prompt asking for a review of ``sentiment`` ('positive'/'negative', or the label '1'/'0')."""
    value = _ALIASES.get(str(sentiment).strip().lower())
    if value is None:
        raise ValueError(f"sentiment must be 'positive' or 'negative' (or 1/0); got {sentiment!r}")
    return PROMPT.format(sentiment=value)


def sentiment_of_prompt(prompt: str) -> str | None:
    """'positive'/'negative' for a prompt made by :func:`prompt_for`; None for any other text."""
    for value in ("positive", "negative"):
        if prompt.startswith(PROMPT.format(sentiment=value).rstrip("\n")):
            return value
    return None


def truncate_review(text: str, max_words: int = MAX_WORDS) -> str:
    """The first ``max_words`` words; cut back to a sentence end if one lies in the second half."""
    words = text.split()
    if len(words) <= max_words:
        return " ".join(words)
    kept = words[:max_words]
    for end in range(len(kept), max_words // 2, -1):
        if _SENTENCE_END.search(kept[end - 1]):
            return " ".join(kept[:end])
    return " ".join(kept)


class ImdbGenTask(Task):
    def __init__(self, name: str = "imdb-gen", max_words: int = MAX_WORDS, **options):
        super().__init__(
            name=name,
            kind=TaskKind.CAUSAL_LM,
            metric_name="perplexity",
            description="IMDB sentiment-conditioned review generation (dev perplexity; sentiment agreement "
                        "of generated reviews via peftlab.labs)",
            higher_is_better=False,
            options=options,
        )
        self.max_words = int(max_words)
        self._reviews = ImdbTask("imdb")

    def format_prompt(self, instruction: str, input: str = "") -> str:
        """Used by ``peftlab predict``: 'positive'/'negative' (or 1/0) become the task's prompt."""
        try:
            return prompt_for(instruction)
        except ValueError:
            return instruction

    def _convert(self, reviews):
        import datasets

        return datasets.Dataset.from_list([
            {"prompt": PROMPT.format(sentiment=SENTIMENTS[row["label"]]),
             "response": truncate_review(row["text"], self.max_words)}
            for row in reviews
        ])

    def _load_local(self, split: str, data_dir: Path | None):
        return self._convert(self._reviews._load_local(split, data_dir))

    def _load_hub(self, split: str):
        return self._convert(self._reviews._load_hub(split))

    def compute_metrics(self, predictions, references=None):
        """``compute_metrics(mean_loss, None)``: loss and perplexity of the dev reviews."""
        return metrics.language_modeling(float(predictions))
