"""``peftlab train --dry-run``: check a whole recipe in seconds, without weights or a GPU.

What a real run would find out only after downloading the weights and renting a GPU, found out here:

* the method applies to the model with the recipe's options: the model is built from its ``config.json``
  on PyTorch's ``meta`` device (shapes only, no memory; ``peftlab.memory.meta_model``) and the method is
  applied to it as ``Method.apply_for_estimate`` does for the memory estimate; trainable and total
  parameters are counted on the result;
* the training memory per device (``peftlab.memory.estimate``) at the recipe's batch size and length;
* the budget: examples after ``max_train_samples``, epochs, effective batch, optimizer steps (counted as
  ``peftlab.training.optimizer_steps`` counts them for the run), and tokens (from the real tokenizer when
  one is available locally; otherwise said so);
* the data, when it is local (``--data-dir`` or your own files): it loads, its labels are known, and the
  columns the options name exist (a missing column is one sentence naming those that do). Data on the
  Hugging Face Hub is not downloaded: the summary says what could not be checked.

``--model DIR`` may point at a folder that holds only a ``config.json`` (the Hub out of reach). The
outcome is a :class:`DryRun` whose ``render()`` is the printed summary; a recipe that cannot run raises
:class:`~peftlab.errors.PeftlabError` (one sentence; the CLI exits 2).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.training import TrainConfig, build_method, build_task, optimizer_steps

GiB = 2**30
# Files one of which a model folder holds when it carries its tokenizer (fast, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


@dataclass
class DataCheck:
    """What the dry run learnt about the data."""

    local: bool  # loaded here (False: on the Hub, not downloaded)
    where: str  # the data folder, your files, or the Hub
    train_examples: int | None = None  # after max_train_samples
    dev_examples: int | None = None
    label_names: list[str] | None = None
    columns: dict[str, list[str]] = field(default_factory=dict)  # a file (or split) -> its columns
    used_columns: dict[str, str] = field(default_factory=dict)  # column option -> the column it names
    train_features: int | None = None  # tokenized rows (QA: context windows); None without a tokenizer
    tokens_per_epoch: int | None = None  # real (unpadded) training tokens per epoch
    token_note: str = ""  # why tokens were not counted


@dataclass
class MemoryRow:
    device: str
    precision: str
    estimate: Any = None  # peftlab.memory.MemoryEstimate
    problem: str = ""


@dataclass
class DryRun:
    """The outcome of :func:`dry_run`; ``render()`` is what ``peftlab train --dry-run`` prints."""

    config: TrainConfig
    method: Any  # the configured peftlab.methods.base.Method
    task: Any  # peftlab.tasks.base.Task
    kind: TaskKind
    model_type: str
    model_source: str  # "built in", a folder, or the Hub id whose config was read
    num_labels: int
    trainable: int
    total: int
    base_total: int
    data: DataCheck
    world_size: int
    effective_batch: int
    steps: int | None  # optimizer steps of the run (an upper bound when ``steps_bound``)
    steps_bound: bool
    memory: list[MemoryRow]
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        config, method, task = self.config, self.method, self.task
        lines = [f"peftlab train --dry-run: {method.name} ({method.category}) on {task.name} ({self.kind}) "
                 f"with {config.model}",
                 f"  model   {self.model_type}, config from {self._config_source()}: built on the meta device (no weights), "
                 f"{self.base_total:,} parameters with the {self.kind} head"
                 + (f" ({self.num_labels} labels)" if self.kind.is_classification else "")]
        lines.append(f"  method  applies: trainable {self.trainable:,} of {self.total:,} parameters "
                     f"({100 * self.trainable / max(self.total, 1):.4f}%); lr {method.learning_rate:g}")
        lines += ["  data    " + line for line in self._data_lines()]
        lines += ["  budget  " + line for line in self._budget_lines()]
        lines += ["  memory  " + line for line in self._memory_lines()]
        lines += ["  note    " + note for note in self.notes]
        lines.append("OK: the recipe configures this model and method; nothing was downloaded or trained.")
        return "\n".join(lines)

    def _config_source(self) -> str:
        if self.model_source == "built in":
            return "peftlab's built-in copy of its config.json"
        return self.model_source if Path(self.model_source).exists() else f"the Hub ({self.model_source})"

    def _data_lines(self) -> list[str]:
        data = self.data
        if not data.local:
            return [f"{data.where}: not checked offline (the dry run downloads nothing): examples, labels, "
                    "columns and tokens unknown"]
        lines = [f"{data.where}: {data.train_examples:,} train / {data.dev_examples:,} dev examples"
                 + (f" (max_train_samples {self.config.max_train_samples:,})" if self.config.max_train_samples else "")]
        if data.label_names is not None:
            lines.append(f"labels ({len(data.label_names)}): {', '.join(map(str, data.label_names[:12]))}"
                         + (" ..." if len(data.label_names) > 12 else ""))
        for name, columns in data.columns.items():
            lines.append(f"{name}: columns {', '.join(columns)}")
        if data.used_columns:
            lines.append("uses " + ", ".join(f"{option} = {column!r}" for option, column in data.used_columns.items()))
        return lines

    def _budget_lines(self) -> list[str]:
        config, data = self.config, self.data
        batch = (f"effective batch {self.effective_batch} = {config.batch_size} x grad_accum {config.grad_accum} x "
                 f"{self.world_size} process{'es' if self.world_size > 1 else ''}")
        if self.steps is None:
            return [f"{_epochs(config.epochs)}, {batch}; steps unknown: the number of examples is unknown offline "
                    "(give max_train_samples, or local data, to count them)"]
        bound = "at most " if self.steps_bound else ""
        lines = [f"{_epochs(config.epochs)}, {batch}: {bound}{self.steps:,} optimizer steps"]
        if data.tokens_per_epoch is not None:
            per_step = data.tokens_per_epoch * config.epochs / self.steps
            lines.append(f"{data.tokens_per_epoch * config.epochs:,.0f} training tokens ({data.tokens_per_epoch:,} per "
                         f"epoch over {data.train_features:,} sequences, about {per_step:,.0f} per step; "
                         f"max_length {config.max_length})")
        else:
            examples = data.train_examples if data.train_examples is not None else config.max_train_samples
            lines.append(f"tokens not counted ({data.token_note}); at most {examples * config.max_length * config.epochs:,.0f} "
                         f"(every sequence cut at max_length {config.max_length})")
        return lines

    def _memory_lines(self) -> list[str]:
        lines = []
        for row in self.memory:
            if row.estimate is None:
                lines.append(f"{row.device} {row.precision}: not estimated ({row.problem})")
                continue
            estimate = row.estimate
            parts = ", ".join(f"{name.replace('_', ' ')} {value / GiB:.2f}" for name, value in estimate.components.items()
                              if value >= 0.005 * GiB)
            extra = " + CUDA runtime" if estimate.runtime_bytes else ""
            lines.append(f"{row.device} {row.precision}: about {estimate.required_bytes / GiB:.1f} GiB per device "
                         f"(batch {estimate.batch_size} x {estimate.seq_length} tokens, gradient checkpointing "
                         f"{'on' if estimate.gradient_checkpointing else 'off'}; GiB: {parts}{extra})")
        return lines


def _epochs(epochs: float) -> str:
    return f"{epochs:g} epoch{'' if epochs == 1 else 's'}"


def dry_run(config: TrainConfig, *, world_size: int = 1) -> DryRun:
    """Check ``config`` without weights or a GPU (see the module docstring). ``world_size``: ``--nproc``."""
    from peftlab import memory
    from peftlab.modelinfo import count_parameters

    if not isinstance(world_size, int) or world_size < 1:
        raise PeftlabError(f"--nproc must be a positive number of processes; got {world_size!r}.")
    method, task = build_method(config), build_task(config)
    kind = TaskKind.parse(task.kind)
    notes: list[str] = []
    data = check_data(config, task, kind)
    label_names = data.label_names if data.local else task.label_names
    num_labels = _num_labels(task, kind, label_names, notes)

    effective_batch = config.batch_size * config.grad_accum * world_size
    sequences = data.train_features if data.train_features is not None else data.train_examples
    steps_bound = sequences is None and config.max_train_samples is not None
    if sequences is None and config.max_train_samples is not None:
        sequences = config.max_train_samples
    steps = None if sequences is None else optimizer_steps(sequences, config.batch_size, config.grad_accum,
                                                           world_size, config.epochs)

    model_config, source = memory.load_config(config.model)
    base = memory.meta_model(model_config, kind, num_labels,
                             separate_output_embeddings=memory.declares_separate_output_embeddings(config.model))
    _, base_total = count_parameters(base)
    method.total_steps = steps  # what the trainer sets before apply (None: unknown offline)
    applied, _facts = method.apply_for_estimate(base, kind)
    trainable, total = count_parameters(applied)
    if trainable == 0:
        raise PeftlabError(f"Method '{method.name}' leaves no trainable parameters on '{config.model}': "
                           "check its target modules against the model's layer names.")

    rows = memory_rows(config, method, kind, num_labels, trainable, notes)
    notes += _distributed_notes(config, world_size)
    return DryRun(config=config, method=method, task=task, kind=kind,
                  model_type=str(getattr(model_config, "model_type", "?")), model_source=str(source),
                  num_labels=num_labels, trainable=trainable, total=total, base_total=base_total, data=data,
                  world_size=world_size, effective_batch=effective_batch, steps=steps, steps_bound=steps_bound,
                  memory=rows, notes=notes)


def check_data(config: TrainConfig, task, kind: TaskKind) -> DataCheck:
    """Load the data when it is local (your files, or ``--data-dir``); never download it."""
    from peftlab.tasks.base import resolve_data_dir, select

    directory = None if task.local_only else resolve_data_dir(config.data_dir)
    if directory is None and not task.local_only:
        return DataCheck(local=False, where=f"task '{task.name}' loads from the Hugging Face Hub",
                         token_note="the data is on the Hub")
    train_raw = select(task.load("train", config.data_dir), config.max_train_samples, config.seed)
    dev_raw = select(task.load("dev", config.data_dir), config.max_eval_samples, config.seed)
    label_names = task.labels_from(train_raw)
    files = {option: Path(value) for option, value in task.options.items()
             if option.endswith("_file") and isinstance(value, (str, Path)) and Path(value).is_file()}
    check = DataCheck(local=True, where=", ".join(str(p) for p in files.values()) or str(directory),
                      train_examples=len(train_raw), dev_examples=len(dev_raw), label_names=label_names)
    for path in files.values():
        check.columns[path.name] = file_columns(path)
    if not files:
        check.columns["normalized rows"] = list(train_raw.column_names)
    check.used_columns = {option: value for option, value in task.options.items()
                          if option.endswith("_column") and value}
    _count_tokens(config, task, kind, train_raw, label_names, check)
    return check


def file_columns(path: Path) -> list[str]:
    """The columns of a CSV/TSV header or of a JSON Lines file's first record (empty when unreadable)."""
    from peftlab.tasks.tabular import read_rows

    try:
        rows = read_rows(path)
    except PeftlabError:
        return []
    return [str(column) for column in rows[0][1]] if rows else []


def _count_tokens(config: TrainConfig, task, kind: TaskKind, train_raw, label_names, check: DataCheck) -> None:
    """Tokenize the training split as training would (real lengths after truncation), when a tokenizer is here."""
    from peftlab.models import load_tokenizer
    from peftlab.preprocess import tokenize

    missing = (f"no tokenizer for '{config.model}' here: give --model a folder with its tokenizer files to "
               "count them")
    folder = Path(config.model).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        check.token_note = missing  # transformers would build an empty tokenizer from the config alone
        return
    try:
        tokenizer = load_tokenizer(config.model)
    except Exception:  # no tokenizer files and no Hub: many exception types
        check.token_note = missing
        return
    if len(tokenizer) < 2:
        check.token_note = missing
        return
    tokenizer = task.prepare_tokenizer(tokenizer)  # own chat data: --chat-template, as training does
    data = tokenize(train_raw, kind, tokenizer, max_length=config.max_length, label_names=label_names,
                    is_regression=task.is_regression)
    check.train_features = len(data)
    check.tokens_per_epoch = int(sum(data["length"]))


def _num_labels(task, kind: TaskKind, label_names, notes: list[str]) -> int:
    if not kind.is_classification:
        return 2  # no classification head: the number plays no part
    if task.is_regression:
        return 1
    if label_names:
        return len(label_names)
    notes.append("the label set comes from the training data, which is not here: the head is sized for 2 labels")
    return 2


def memory_rows(config: TrainConfig, method, kind: TaskKind, num_labels: int, trainable: int,
                notes: list[str]) -> list[MemoryRow]:
    """``peftlab.memory.estimate`` on a GPU and on a CPU at the recipe's batch size and length."""
    from peftlab import hardware, memory

    wanted = {"cuda": "fp32" if config.precision == "fp32" else "bf16",
              "cpu": "fp32" if config.precision == "fp32" or (config.precision == "auto" and hardware.device_type() == "cpu"
                                                             and not hardware.bf16_supported()) else "bf16"}
    rows = []
    for device in memory.DEVICES:
        row = MemoryRow(device=device, precision=wanted[device])
        try:
            row.estimate = memory.estimate(config.model, method.name, kind, batch_size=config.batch_size,
                                           seq_length=config.max_length, device=device, precision=row.precision,
                                           gradient_checkpointing=config.gradient_checkpointing or None,
                                           num_labels=num_labels)
        except PeftlabError as error:
            row.problem = str(error)
        rows.append(row)
    estimated = next((row.estimate for row in rows if row.estimate is not None), None)
    if estimated is not None and estimated.trainable_params != trainable:
        notes.append(f"the memory estimate applies {method.name} with its default options ({estimated.trainable_params:,} "
                     f"trainable), not this recipe's ({trainable:,}): gradients and optimizer states differ by about "
                     f"{abs(trainable - estimated.trainable_params) * 16 / GiB:.2f} GiB")
    if config.precision == "fp16":
        notes.append("fp16 is estimated as bf16 (the same two bytes per value)")
    return rows


def _distributed_notes(config: TrainConfig, world_size: int) -> list[str]:
    from peftlab import distributed

    distributed.check_options(config.deepspeed, config.offload)
    if not config.deepspeed:
        return [f"{world_size} data-parallel processes: each holds a whole replica (the memory above is per device)"] \
            if world_size > 1 else []
    if importlib.util.find_spec("deepspeed") is None:
        return [f"--deepspeed {config.deepspeed}: DeepSpeed is not installed here; the run needs it "
                f"(`{distributed.INSTALL_HINT}`)"]
    stage = distributed.zero_stage(distributed.deepspeed_config(config.deepspeed, config.offload))
    offload = f", offload to {config.offload}" if config.offload and config.offload != "none" else ""
    return [f"DeepSpeed ZeRO-{stage}{offload} over {world_size} process{'es' if world_size > 1 else ''}: the "
            "estimate above is one unpartitioned replica, an upper bound per device"]
