"""Your own data, for every task kind: the forms a row can take, chosen from the columns you name.

=================  ==========================================  =================================================
form               columns (CLI flags)                         kind, loss and score
=================  ==========================================  =================================================
classification     ``--text-column`` ``--label-column``        seq-cls: accuracy (macro F1 above two labels);
                   (``--text-pair-column``)                    ``regression: true``: Pearson
tagging            ``--tokens-column`` ``--tags-column``       token-cls: seqeval entity F1
instruction        ``--prompt-column`` ``--response-column``   causal-lm: loss on the response only; perplexity
chat               a ``messages`` (or ShareGPT                 causal-lm through the tokenizer's chat template
                   ``conversations``) column, or               (``--chat-template FILE`` for models without one):
                   ``--messages-column``                       loss on assistant turns only; perplexity
text               ``--text-column`` alone                     causal-lm: loss on every token; perplexity
source-target      ``--source-column`` ``--target-column``     seq2seq: perplexity
=================  ==========================================  =================================================

The form follows from the columns given (``--kind`` may state it; a kind that does not fit the columns is
refused). With no column named, a ``messages`` or ``conversations`` column in the data means chat.
Generative forms are also scored on generated text (``peftlab eval --generate N``): ROUGE-L, exact match
and chrF against the reference answers (:func:`peftlab.metrics.generation`).

Without a dev source, a seeded share of the training data (``--dev-fraction``, default 0.1;
:func:`peftlab.tasks.tabular.seeded_split`) is dev; the fraction is recorded with the run. Where the rows
come from is the subclass's business: files (:mod:`peftlab.tasks.files`) or a Hub dataset
(:mod:`peftlab.tasks.hub_dataset`); each row carries the place it came from ("chats.jsonl, line 7"), which
every error names.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from peftlab import metrics
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.tasks import chat
from peftlab.tasks.base import SPLITS, Task
from peftlab.tasks.labels import as_label_names, read_label, sort_labels, sort_tags
from peftlab.tasks.tabular import SPLIT_SEED, check_file, read_text, seeded_split

DEV_FRACTION = 0.1  # as the alpaca and guanaco tasks split theirs
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # beside the adapter weights: what predict and serve render with

# Every option of your own data -> its help text. The CLI's flags (train, compare, eval) and the recipe keys
# that TrainConfig routes to the task come from here.
OPTIONS: dict[str, str] = {
    "train_file": "your training file (.csv, .tsv, .jsonl or .json) for --task csv/tsv/jsonl/json",
    "dev_file": "your dev file, same format (default: a seeded --dev-fraction of the training data)",
    "dev_fraction": f"without a dev file or split: the share of the training data held out as dev, seeded "
                    f"(default {DEV_FRACTION})",
    "no_header": "CSV/TSV files without a header row: columns are named by position (--text-column 0)",
    "kind": "the task kind, when the columns leave it open: seq-cls, token-cls, causal-lm or seq2seq "
            "(default: inferred from the columns given)",
    "text_column": "column holding the text (with --label-column: classification; alone: plain text for a "
                   "causal LM, loss on every token)",
    "text_pair_column": "column holding the second text of a pair (optional)",
    "label_column": "column holding the label (read as a string)",
    "prompt_column": "column holding the prompt of an instruction pair (causal LM; no loss on it)",
    "response_column": "column holding the response to learn (causal LM; the loss is on it)",
    "messages_column": "column holding conversations: [{role, content}, ...] or ShareGPT [{from, value}, ...] "
                       "(default: 'messages' or 'conversations' when present)",
    "chat_template": "a Jinja chat template file, for models whose tokenizer has none (saved with the adapter)",
    "source_column": "column holding the source text (seq2seq)",
    "target_column": "column holding the target text (seq2seq)",
    "tokens_column": "column holding the words (token classification: a JSON list, or space-separated text)",
    "tags_column": "column holding one tag per word (IOB2: O, B-PER, I-PER, ...)",
    "dataset": "a Hugging Face Hub dataset ORG/NAME (or a local dataset folder), read with the column options",
    "dataset_config": "the --dataset's configuration (subset) name",
    "train_split": "the --dataset split to train on (default: train)",
    "dev_split": "the --dataset split to score on (default: validation, else test, else --dev-fraction)",
}
FLAG_OPTIONS = ("no_header",)  # on/off flags on the command line
# Options without a flag (recipes and the Python API): a fixed label list, regression.
OPTION_NAMES = (*OPTIONS, "label_names", "regression")
COLUMN_OPTIONS = tuple(name for name in OPTIONS if name.endswith("_column"))


@dataclass(frozen=True)
class Form:
    """One shape of rows: the kind it trains, the column options it needs, what it learns."""

    name: str
    kind: TaskKind
    columns: tuple[str, ...]
    summary: str
    optional: tuple[str, ...] = ()


FORMS: dict[str, Form] = {form.name: form for form in (
    Form("classification", TaskKind.SEQ_CLS, ("text_column", "label_column"),
         "classification (accuracy, macro F1 above 2 labels)", ("text_pair_column",)),
    Form("tagging", TaskKind.TOKEN_CLS, ("tokens_column", "tags_column"), "token classification (seqeval entity F1)"),
    Form("instruction", TaskKind.CAUSAL_LM, ("prompt_column", "response_column"),
         "prompt/response pairs, loss on the response only (dev perplexity)"),
    Form("chat", TaskKind.CAUSAL_LM, ("messages_column",),
         "conversations through the chat template, loss on assistant turns only (dev perplexity)"),
    Form("text", TaskKind.CAUSAL_LM, ("text_column",), "plain text, loss on every token (dev perplexity)"),
    Form("source-target", TaskKind.SEQ2SEQ, ("source_column", "target_column"), "source -> target text (dev perplexity)"),
)}
# a column option that only one form uses -> that form
_SIGNALS = {option: form.name for form in FORMS.values() for option in (*form.columns, *form.optional)
            if option != "text_column"}


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def as_bool(value: Any, option: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0", ""):
        return value.strip().lower() in ("true", "yes", "1")
    raise PeftlabError(f"Option {flag(option)} must be true or false, not {value!r}.")


def as_fraction(value: Any) -> float:
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = -1.0
    if not 0.0 < fraction < 1.0:
        raise PeftlabError(f"--dev-fraction must be a number between 0 and 1 (the share held out as dev); got {value!r}.")
    return fraction


def needs_columns_error(name: str, example: str) -> PeftlabError:
    return PeftlabError(
        f"Task '{name}' (your own data) needs the columns to read: --text-column and --label-column "
        "(classification), --tokens-column and --tags-column (token classification), --prompt-column and "
        "--response-column (instructions), a 'messages' column or --messages-column (chat), --text-column "
        f"alone (plain text) or --source-column and --target-column (seq2seq). Example: {example}.")


def choose_form(name: str, options: dict[str, Any], columns: Callable[[], list[str] | None],
                example: str) -> Form | None:
    """The form the options (and, with no column named, the data's own columns) describe; None while the
    data cannot be read yet (loading then says why). Sets ``options["messages_column"]`` when it found one."""
    kind = TaskKind.parse(options["kind"], "--kind") if options.get("kind") else None
    given = [option for option in COLUMN_OPTIONS if options.get(option)]
    named = sorted({_SIGNALS[option] for option in given if option in _SIGNALS})
    if len(named) > 1:
        raise PeftlabError(f"The column options given describe different forms ({' and '.join(named)}): "
                           f"{', '.join(flag(o) for o in given)}; give the columns of one form.")
    if named:
        form = FORMS[named[0]]
    elif "text_column" in given:
        form = FORMS["classification" if kind is TaskKind.SEQ_CLS else "text"]
    else:
        found = columns()
        if found is None:
            return None
        conversation = chat.find_conversation_column(found)
        if conversation is None or kind not in (None, TaskKind.CAUSAL_LM):
            raise needs_columns_error(name, example)
        options["messages_column"] = conversation
        form = FORMS["chat"]
    if kind is not None and form.kind is not kind:
        raise PeftlabError(f"--kind {kind} does not fit the columns given ({', '.join(flag(o) for o in given)} "
                           f"describe {form.name}, a {form.kind} task); drop --kind or name that kind's columns.")
    missing = [flag(option) for option in form.columns if not options.get(option)]
    if missing:
        raise PeftlabError(f"Task '{name}' (your own data): {form.name} needs {join(missing)} as well. "
                           f"Example: {example}.")
    return form


@dataclass
class Rows:
    """Raw rows of one source (a file, a dataset split): each with the place it came from."""

    source: str  # the file or "org/name (train split)", named in errors
    items: list[tuple[str, dict]]  # (where: "a.csv, line 3", row)
    columns: list[str]
    header: str | None = None  # where a missing column is reported (a CSV header line), else the first row's place
    skipped: list[str] = field(default_factory=list)  # conversations without an assistant turn


class OwnDataTask(Task):
    """Any task kind over the user's own rows. Subclasses provide :meth:`read_source` (and ``example``)."""

    example = "peftlab train --task jsonl --train-file chats.jsonl --model smollm2"
    source_flags = {"train": "--train-file", "dev": "--dev-file"}

    def __init__(self, name: str, **options):
        options = dict(options)
        for option in (*COLUMN_OPTIONS, "kind", "dataset", "dataset_config", "train_split", "dev_split"):
            value = options.get(option)
            if isinstance(value, int) and not isinstance(value, bool) and option.endswith("_column"):
                options[option] = str(value)  # a recipe's `text_column: 0` for a headerless file
            elif value is not None and not isinstance(value, str):
                raise PeftlabError(f"Option {flag(option)} must be a column name, not {value!r}."
                                   if option.endswith("_column") else f"Option {flag(option)} must be text, not {value!r}.")
        for option in ("train_file", "dev_file", "chat_template"):
            value = options.get(option)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise PeftlabError(f"Option {flag(option)} must be a path, not {value!r}.")
        regression = as_bool(options.get("regression", False), "regression")
        for option in FLAG_OPTIONS:
            if option in options:
                options[option] = as_bool(options[option], option)
        if options.get("dev_fraction") is not None:
            options["dev_fraction"] = as_fraction(options["dev_fraction"])
        label_names = options.get("label_names")
        if label_names is not None:
            if regression:
                raise PeftlabError("--label-names and --regression exclude each other: regression labels are numbers.")
            label_names = as_label_names(label_names)
            options["label_names"] = label_names
        self.name, self.options = name, options  # read_source may run before the dataclass fields are set
        self._cache: dict[str, Rows] = {}
        self._records: dict[str, list[tuple[str, dict]]] = {}
        self._split_from_train = False
        self.form: Form | None = None
        self.form = choose_form(name, options, self._peek_columns, self.example)
        self._cache.clear()  # a peek read the rows without knowing the columns it needs
        kind = self.form.kind if self.form else (TaskKind.parse(options["kind"]) if options.get("kind") else TaskKind.SEQ_CLS)
        generative = kind.is_generative
        if regression and kind is not TaskKind.SEQ_CLS:
            raise PeftlabError("--regression is for classification columns (--text-column with --label-column).")
        super().__init__(
            name=name, kind=kind,
            metric_name="pearson" if regression else ("perplexity" if generative else
                                                       "f1" if kind is TaskKind.TOKEN_CLS else "accuracy"),
            description=self._describe(regression),
            label_names=label_names, is_regression=regression, higher_is_better=not generative, options=options,
        )
        self._fixed_labels = label_names is not None
        self._train_labels: list[str] | None = None

    generation_metric_name = "rougeL"

    def _describe(self, regression: bool) -> str:
        what = "regression (Pearson)" if regression else (self.form.summary if self.form else "columns not named yet")
        kind = self.form.kind if self.form else "?"
        return f"your own data, {self.form.name if self.form else 'form unknown'} ({kind}): {what}"

    @property
    def local_only(self) -> bool:
        return True

    # ---- where the rows come from (subclasses) ------------------------------------------------------------
    def read_source(self, which: str) -> Rows:  # pragma: no cover - abstract
        """The raw rows of ``which``: "train" or "dev" (None-free; one sentence when they cannot be read)."""
        raise NotImplementedError

    def has_dev_source(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _peek_columns(self) -> list[str] | None:
        """The training data's columns, for choosing a form when no column is named; None if unreadable now."""
        try:
            return self._rows("train").columns
        except PeftlabError:
            return None

    def _rows(self, which: str) -> Rows:
        if which not in self._cache:
            self._cache[which] = self.read_source(which)
        return self._cache[which]

    # ---- loading -------------------------------------------------------------------------------------------
    def load(self, split: str, data_dir=None):
        """The split from the user's data. ``data_dir`` (and $PEFTLAB_DATA_DIR) play no part here."""
        import datasets

        if split not in SPLITS:
            raise PeftlabError(f"Unknown split '{split}' for task '{self.name}'. Use one of: {', '.join(SPLITS)}.")
        if self.form is None:  # undecided at construction (the data could not be read): say why now
            self._cache.clear()
            self._rows("train")
            self.form = choose_form(self.name, self.options, lambda: self._rows("train").columns, self.example)
        pairs = self._split(split)
        if not self.is_regression and self.kind.is_classification:
            self._check_labels(split, pairs)
        records = [record for _, record in pairs]
        if not records:
            raise PeftlabError(f"The {split} split of task '{self.name}' is empty. Check the data.")
        return datasets.Dataset.from_list(records, features=self._features())

    def _split(self, split: str) -> list[tuple[str, dict]]:
        """(where, record) pairs of a split: its own source, or the seeded share of the training data."""
        if split == "dev" and self.has_dev_source():
            return self._converted("dev")
        train = self._converted("train")
        if self.has_dev_source():
            return train
        self._split_from_train = True
        fraction = self.options.get("dev_fraction") or DEV_FRACTION
        if len(train) < 2:
            raise PeftlabError(f"{self._rows('train').source}: one example cannot be split into train and dev; add "
                               f"examples or give a dev file ({self.source_flags['dev']}).")
        train_index, dev_index = seeded_split(len(train), fraction)
        return [train[i] for i in (train_index if split == "train" else dev_index)]

    def _converted(self, which: str) -> list[tuple[str, dict]]:
        if which not in self._records:
            rows = self._rows(which)
            pairs = []
            for index, (where, row) in enumerate(rows.items):
                self._require_columns(rows, index, where, row)
                record = self.record(where, row)
                if record is None:
                    rows.skipped.append(where)
                else:
                    pairs.append((where, record))
            if rows.skipped:
                if not pairs:
                    raise PeftlabError(f"{rows.source}: none of the {len(rows.skipped)} conversations has an assistant "
                                       f"turn (first: {rows.skipped[0]}); the loss is on assistant turns, so there is "
                                       "nothing to learn.")
                print(f"peftlab: skipped {len(rows.skipped)} of {len(rows.items)} conversations in {rows.source} with "
                      f"no assistant turn (first: {rows.skipped[0]}).", file=sys.stderr, flush=True)
            self._records[which] = pairs
        return self._records[which]

    def _require_columns(self, rows: Rows, index: int, where: str, row: dict) -> None:
        wanted = [self.options[o] for o in (*self.form.columns, *self.form.optional) if self.options.get(o)]
        missing = [column for column in wanted if column not in row]
        if not missing:
            return
        by_column = {self.options[o]: flag(o) for o in (*self.form.columns, *self.form.optional) if self.options.get(o)}
        place = rows.header or (f"{where} (first record)" if index == 0 else where)
        raise PeftlabError(f"{place}: no column {', '.join(repr(c) for c in missing)} "
                           f"(from {', '.join(by_column[c] for c in missing)}). "
                           f"Columns present: {', '.join(repr(str(c)) for c in row)}.")

    # ---- one row -> one normalized record ------------------------------------------------------------------
    def record(self, where: str, row: dict) -> dict | None:
        """The normalized record of a row (see ``peftlab.tasks.base``); None for a conversation to skip."""
        column = self.options.get
        form = self.form.name
        if form == "classification":
            pair = column("text_pair_column")
            return {"text": _text(row, column("text_column"), where),
                    "text_pair": _text(row, pair, where) if pair else None,
                    "label": read_label(row[column("label_column")], f"{where}: field '{column('label_column')}' "
                                        "(the label)", regression=self.is_regression, fixed=self.label_names)}
        if form == "tagging":
            tokens = _words(row, column("tokens_column"), where)
            tags = _words(row, column("tags_column"), where)
            if len(tokens) != len(tags):
                raise PeftlabError(f"{where}: fields '{column('tokens_column')}' and '{column('tags_column')}' have "
                                   f"different lengths ({len(tokens)} tokens, {len(tags)} tags); give one tag per token.")
            if not tokens:
                raise PeftlabError(f"{where}: field '{column('tokens_column')}' is empty; a sentence needs words.")
            return {"tokens": tokens, "tags": tags}
        if form == "instruction":
            return {"prompt": _text(row, column("prompt_column"), where),
                    "response": _text(row, column("response_column"), where, required=True), "where": where}
        if form == "text":
            return {"prompt": "", "response": _text(row, column("text_column"), where, required=True), "where": where}
        if form == "source-target":
            return {"source": _text(row, column("source_column"), where, required=True),
                    "target": _text(row, column("target_column"), where, required=True)}
        messages = chat.normalize_messages(row[column("messages_column")], where, field=column("messages_column"))
        messages = chat.learnable(messages)
        return None if messages is None else {"messages": messages, "where": where}

    def _features(self):
        import datasets

        text = datasets.Value("string")
        form = self.form.name
        if form == "classification":
            return datasets.Features({"text": text, "text_pair": text,
                                      "label": datasets.Value("float64" if self.is_regression else "string")})
        if form == "tagging":
            return datasets.Features({"tokens": datasets.List(text), "tags": datasets.List(text)})
        if form == "source-target":
            return datasets.Features({"source": text, "target": text})
        if form == "chat":
            return datasets.Features({"messages": datasets.List({"role": text, "content": text}), "where": text})
        return datasets.Features({"prompt": text, "response": text, "where": text})

    # ---- labels ----------------------------------------------------------------------------------------------
    def _label_values(self, record: dict) -> list[str]:
        return record["tags"] if self.kind is TaskKind.TOKEN_CLS else [record["label"]]

    def _derive_train_labels(self) -> list[str]:
        if self._train_labels is None:
            values = [v for _, record in self._split("train") for v in self._label_values(record)]
            self._train_labels = sort_tags(values) if self.kind is TaskKind.TOKEN_CLS else sort_labels(values)
        return self._train_labels

    def _check_labels(self, split: str, pairs) -> None:
        known = self.label_names if self._fixed_labels else self._derive_train_labels()
        allowed = set(known)
        field_option = "tags_column" if self.kind is TaskKind.TOKEN_CLS else "label_column"
        for where, record in pairs:
            unknown = next((v for v in self._label_values(record) if v not in allowed), None)
            if unknown is None:
                continue
            if self._fixed_labels:
                source, fix = "--label-names", "Fix the label, or add it to --label-names."
            else:
                source = f"the training {'part of ' if self._split_from_train else 'file '}{self.options.get('train_file') or self._rows('train').source}"
                fix = ("Fix the label, or add examples of it to the training data" +
                       (f"; this row was held out as dev by --dev-fraction, so a label seen once cannot be learned: "
                        f"add examples or give {self.source_flags['dev']}." if self._split_from_train and split == "dev"
                        else "."))
            raise PeftlabError(f"{where}: unknown label '{unknown}' in field '{self.options[field_option]}'. Known "
                               f"labels (from {source}): {', '.join(known)}. {fix}")

    def labels_from(self, train_dataset) -> list[str] | None:
        """The label (or tag) set: ``label_names`` if given, else the sorted distinct values of the training
        data; saved with the run. None for regression and generative forms."""
        if self.is_regression or not self.kind.is_classification:
            return None
        if not self._fixed_labels:
            if self.kind is TaskKind.TOKEN_CLS:
                labels = sort_tags(tag for tags in train_dataset["tags"] for tag in tags)
            else:
                labels = sort_labels(train_dataset["label"])
            if not labels:
                raise PeftlabError(f"Task '{self.name}': the training data has no labels.")
            self.label_names = labels
            self.options["label_names"] = list(labels)
        return self.label_names

    def recorded_options(self) -> dict[str, Any]:
        """What the run must remember beyond the options given: the dev split made here, a found column."""
        recorded = {}
        if self._split_from_train:
            recorded.update(dev_fraction=self.options.get("dev_fraction") or DEV_FRACTION, split_seed=SPLIT_SEED)
        if self.form is FORMS["chat"]:
            recorded["messages_column"] = self.options["messages_column"]
        return recorded

    # ---- scores ----------------------------------------------------------------------------------------------
    def compute_metrics(self, predictions, references=None):
        """Classification: accuracy (+ macro F1 above two labels) or Pearson; tagging: seqeval; generative forms:
        ``compute_metrics(mean_loss, None)`` -> loss and perplexity, or generated texts -> :meth:`generation_metrics`."""
        if self.kind.is_generative:
            if isinstance(predictions, (list, tuple)):
                return self.generation_metrics(predictions, references)
            return metrics.language_modeling(float(predictions))
        if self.kind is TaskKind.TOKEN_CLS:
            return metrics.entities(predictions, references)
        if self.is_regression:
            return metrics.regression(predictions, references)
        n_labels = len(self.label_names) if self.label_names else len(set(list(references)))
        if n_labels > 2:
            return metrics.classification(predictions, references, f1=True, average="macro")
        return metrics.classification(predictions, references)

    def generation_metrics(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        """ROUGE-L F1, exact match and chrF of generated answers against the references."""
        if not self.kind.is_generative or (self.form is not None and self.form.name == "text"):
            raise PeftlabError(f"Task '{self.name}' ({self.form.name if self.form else self.kind}) has no reference "
                               "answers to score generated text against; --generate scores prompt/response, chat and "
                               "seq2seq data.")
        return metrics.generation(predictions, references)

    # ---- the chat template ---------------------------------------------------------------------------------
    def prepare_tokenizer(self, tokenizer):
        """Chat data: the tokenizer renders with ``--chat-template`` (or its own template, which must exist)."""
        if self.form is not FORMS["chat"]:
            return tokenizer
        given = self.options.get("chat_template")
        if given:
            path = Path(given).expanduser()
            check_file(path, "--chat-template")
            tokenizer.chat_template = read_text(path, "--chat-template")
        elif not getattr(tokenizer, "chat_template", None):
            raise PeftlabError("The model's tokenizer has no chat template to render the conversations with; pass "
                               "--chat-template FILE (a Jinja template, as in a tokenizer's chat_template.jinja).")
        probe = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
        try:
            tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception as error:  # noqa: BLE001 - jinja raises many types
            where = f"--chat-template '{given}'" if given else "the tokenizer's chat template"
            raise PeftlabError(f"{where} fails to render a two-message conversation "
                               f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); fix the template.") from None
        return tokenizer

    def save_with_adapter(self, adapter_dir: Path, tokenizer) -> None:
        """Chat data: the template the run rendered with, beside the weights (predict and serve use it)."""
        if self.form is FORMS["chat"] and getattr(tokenizer, "chat_template", None):
            from peftlab.artifacts import atomic_write_text

            atomic_write_text(Path(adapter_dir) / CHAT_TEMPLATE_FILE, tokenizer.chat_template)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "form": self.form.name if self.form else None}


def _text(row: dict, column: str, where: str, *, required: bool = False) -> str:
    value = row[column]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise PeftlabError(f"{where}: field '{column}' is "
                           f"{'null' if value is None else 'a JSON ' + type(value).__name__}, not text.")
    if required and not value.strip():
        raise PeftlabError(f"{where}: field '{column}' is empty; fill it in or drop the row.")
    return value


def _words(row: dict, column: str, where: str) -> list[str]:
    """A list of words: a JSON list of strings, or text split on whitespace (CSV)."""
    value = row[column]
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(word, str) for word in value):
        return list(value)
    what = "null" if value is None else ("a list with non-text items" if isinstance(value, list)
                                         else f"a JSON {type(value).__name__}")
    raise PeftlabError(f"{where}: field '{column}' is {what}; give a list of words (or space-separated text).")
