"""Training: one method on one task and model, through the Hugging Face ``Trainer``.

The ``Trainer`` is the engine (it is what DDP, DeepSpeed and resumable checkpoints already work
through); peftlab decides what goes in: batches padded to their own length and grouped by length,
bf16 autocast where the hardware runs it, an optimizer over the trainable parameters only, a
progress bar with loss, learning rate, throughput and ETA, per-epoch dev evaluation, atomic
checkpoints, and the run folder described in ``peftlab.artifacts``.

``train()`` is a sequence of phases, each a public function a reader (or a caller) can take alone:

1. :func:`prepare` - data, tokenizer, base model, tokenized splits, the step count, then the method
   applied (so that a method whose schedule needs the step count, such as AdaLoRA, can read it);
2. :func:`build_trainer` - ``TrainingArguments``, callbacks, collator and optimizer around the model;
3. :func:`run` - ``Trainer.train``, timed without the per-epoch evaluations;
4. :func:`save` - the method's weights into ``<output>/adapter`` (every rank takes part under DeepSpeed);
5. :func:`evaluate_final` and :func:`report` - the final dev score, ``peftlab.json``, ``metrics.json``,
   ``loss.png``.

What a caller may replace (collator, optimizer, extra callbacks, an already prepared run) goes in a
:class:`TrainingParts`: ``train(config, parts=TrainingParts(optimizer="adamw_torch_fused"))``.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from peftlab import methods, modelcard, tracking, validation
from peftlab.artifacts import (ADAPTER_DIR, CHECKPOINTS, LOG, METRICS, PLOT, RunManifest,  # noqa: F401 (re-exported)
                               absolute_paths, remembered_data_dir, write_json)
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.tasks.base import select  # noqa: F401 (part of the training API)
from peftlab.validation import limits, load_recipe  # noqa: F401 (load_recipe: part of the training API)
from peftlab.version import __version__

# The method a run trains when none is named: the methods package says which (the registry's first, LoRA,
# until it declares DEFAULT_METHOD).
DEFAULT_METHOD: str = getattr(methods, "DEFAULT_METHOD", None) or methods.method_names()[0]


@dataclass
class TrainConfig:
    """Everything a training run needs. CLI flags and recipe YAML keys use these names.

    Each field declares the values it accepts (``peftlab.validation.limits``); ``train()`` checks them all
    before any work, and so do the CLI and recipes (with the flag, or the file and key, in the message)."""

    method: str = DEFAULT_METHOD
    task: str = "sst2"
    model: str = "minilm"
    output: str | None = None  # default: runs/<method>-<task>
    epochs: float = field(default=3.0, metadata=limits(above=0))
    lr: float | None = field(default=None, metadata=limits(above=0))  # None: the method's default
    batch_size: int = field(default=32, metadata=limits(min=1))
    eval_batch_size: int = field(default=64, metadata=limits(min=1))
    max_length: int = field(default=128, metadata=limits(min=8))  # and at most the model's positions
    max_train_samples: int | None = field(default=None, metadata=limits(min=1))
    max_eval_samples: int | None = field(default=None, metadata=limits(min=1))
    seed: int = field(default=42, metadata=limits(min=0, max=2**32 - 1))  # numpy's seed range
    precision: str = field(default="auto", metadata=limits(choices=("auto", "fp32", "bf16", "fp16")))
    grad_accum: int = field(default=1, metadata=limits(min=1))
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    packing: bool = False  # causal LM: several examples per row, no cross-example attention (preprocess.PackingCollator)
    # None: the method's own (Method.warmup_ratio). Below 1: the Trainer reads warmup_steps >= 1 as steps.
    warmup_ratio: float | None = field(default=None, metadata=limits(min=0, below=1))
    weight_decay: float = field(default=0.0, metadata=limits(min=0))
    logging_steps: int = field(default=10, metadata=limits(min=1))
    save_steps: int = field(default=200, metadata=limits(min=1))
    eval_each_epoch: bool = True
    resume: bool = False
    overwrite: bool = False  # train into a non-empty --output (never replacing files peftlab did not write)
    keep_checkpoints: bool = False
    data_dir: str | None = None
    deepspeed: str | None = None  # zero2 | zero3 | path/to/config.json (see peftlab.distributed)
    offload: str | None = None  # cpu
    fsdp: str | None = None  # full_shard | shard_grad_op | hybrid_shard (see peftlab.distributed.fsdp)
    fsdp_offload: bool = False
    progress: bool = True
    report_to: str = "none"  # none | tensorboard | trackio | mlflow | wandb; several comma-separated (tracking.py)
    run_name: str | None = None  # the run's name in the trackers (default: the run folder's name)
    method_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)

    def output_dir(self) -> Path:
        return Path(self.output or f"runs/{self.method}-{self.task}")


@dataclass
class Prepared:
    """Everything before the first step (:func:`prepare`); the trainer, compare and the benchmarks share it."""

    config: TrainConfig
    method: Any  # peftlab.methods.base.Method, already applied to ``model``
    task: Any  # peftlab.tasks.base.Task
    tokenizer: Any
    model: Any  # the base model with the method applied
    label_names: list[str] | None
    labels_from_data: bool  # the label set was read off the training data (your own files): saved with the run
    train_raw: Any  # datasets.Dataset of normalized rows (peftlab.tasks.base)
    dev_raw: Any
    train_data: Any  # tokenized (peftlab.preprocess.tokenize), with a ``length`` column
    dev_data: Any
    world_size: int  # processes sharing the batches
    effective_batch: int  # examples per optimizer step over all processes
    total_steps: int  # optimizer steps of the whole run (what ``method.total_steps`` was set to)


@dataclass
class TrainingParts:
    """Parts of a run that a caller may replace (experiments, benchmarks); None or empty: peftlab's own.

    ``prepared``: a :class:`Prepared` from ``prepare(config)`` (same config) to train instead of preparing
    one: the caller may change its model first and keeps a handle on the trained model.
    ``collator``: a function from a list of tokenized features to a batch (default
    ``peftlab.preprocess.collator``: each batch padded to its own longest example).
    ``optimizer``: a ``TrainingArguments.optim`` name ("adamw_torch_fused"), or a function
    ``model -> torch.optim.Optimizer`` (default: AdamW over the method's ``optimizer_parameter_groups``
    when it has them, else the method's ``optimizer`` name). The Trainer builds the schedule around it.
    ``callbacks``: extra ``transformers.TrainerCallback`` objects, after peftlab's and the method's own.
    ``training_arguments``: ``TrainingArguments`` fields that override peftlab's ({"torch_compile": True}).
    """

    prepared: Prepared | None = None
    collator: Callable | None = None
    optimizer: str | Callable | None = None
    callbacks: list = field(default_factory=list)
    training_arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuiltTrainer:
    """What :func:`build_trainer` returns: the Trainer and what the later phases read."""

    trainer: Any  # peftlab.trainer.PeftlabTrainer
    prepared: Prepared
    precision: str  # resolved: fp32, bf16 or fp16
    evaluation: Any  # peftlab.callbacks.EpochEvaluation (per-epoch dev scores and their time)
    output: Path
    resume_from: str | None  # the checkpoint a resumed run continues from
    trainable: int
    total: int


@dataclass
class RunTimes:
    """What :func:`run` measured (per-epoch evaluations excluded)."""

    train_seconds: float  # wall clock
    train_cpu_seconds: float  # CPU time of this process: the work done, whatever else the machine runs
    steps_run: int  # optimizer steps of this call (a resumed run: those after the resume point)


def build_method(config: TrainConfig):
    """The configured method (``--lr`` given: its learning rate)."""
    from peftlab.methods import get_method

    method_options = dict(config.method_options)
    if config.lr is not None:
        method_options["learning_rate"] = config.lr
    return get_method(config.method, **method_options)


def build_task(config: TrainConfig):
    from peftlab.tasks import get_task

    validation.check_train_values({"max_length": config.max_length})
    return get_task(config.task, **config.task_options)


def optimizer_steps(examples: int, batch_size: int, grad_accum: int, world_size: int, epochs: float) -> int:
    """Optimizer steps of a run, counted as the ``Trainer`` counts them.

    Each of ``world_size`` processes takes every ``world_size``-th batch of ``batch_size`` examples (the
    last process may get one batch fewer, padded up by accelerate), and steps once per ``grad_accum``
    batches; the last step of an epoch may accumulate fewer."""
    batches = math.ceil(math.ceil(examples / batch_size) / world_size)
    per_epoch = max(1, math.ceil(batches / grad_accum))
    return max(1, math.ceil(epochs * per_epoch))


def prepare(config: TrainConfig, *, world_size: int | None = None) -> Prepared:
    """Load task data, tokenizer and base model, tokenize, count the steps, then apply the method.

    ``world_size``: processes that will share the batches (default: the launcher's, else 1). The method is
    applied last, after ``method.total_steps`` is set, so that a method whose schedule depends on the
    number of steps (AdaLoRA's rank budget) can read it in ``apply``.
    """
    import transformers

    from peftlab import distributed
    from peftlab.models import load_model, load_tokenizer
    from peftlab.preprocess import check_packing, tokenize

    method, task = build_method(config), build_task(config)
    if config.packing and method.packing_refusal:
        raise PeftlabError(f"Method '{method.name}' cannot train with --packing: {method.packing_refusal}")
    train_raw = select(task.load("train", config.data_dir), config.max_train_samples, config.seed)
    dev_raw = select(task.load("dev", config.data_dir), config.max_eval_samples, config.seed)
    labels_from_data = task.label_names is None
    label_names = task.labels_from(train_raw)

    transformers.set_seed(config.seed)
    tokenizer = task.prepare_tokenizer(load_tokenizer(config.model))  # own chat data: --chat-template
    with distributed.model_init_context(config):  # ZeRO-3: each rank loads only its slice of the weights
        model = load_model(config.model, task.kind, label_names=label_names, is_regression=task.is_regression,
                           **method.model_load_kwargs())
    method.check_supported(model, task.kind)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad input

    tokenize_options = dict(max_length=config.max_length, label_names=label_names, is_regression=task.is_regression)
    train_data = tokenize(train_raw, task.kind, tokenizer, **tokenize_options)
    dev_data = tokenize(dev_raw, task.kind, tokenizer, **tokenize_options)

    world_size = max(1, world_size or distributed.world_size())
    total_steps = optimizer_steps(len(train_data), config.batch_size, config.grad_accum, world_size, config.epochs)
    method.total_steps = total_steps
    with distributed.model_init_context(config):  # methods that read the weights (PiSSA) see them gathered
        model = method.apply(model, task.kind)
    if config.packing:
        check_packing(model, task.kind)  # one sentence unless packed rows give exactly the unpacked logits
    return Prepared(config=config, method=method, task=task, tokenizer=tokenizer, model=model,
                    label_names=label_names, labels_from_data=labels_from_data, train_raw=train_raw,
                    dev_raw=dev_raw, train_data=train_data, dev_data=dev_data, world_size=world_size,
                    effective_batch=config.batch_size * config.grad_accum * world_size, total_steps=total_steps)


def train(config: TrainConfig | None = None, *, parts: TrainingParts | None = None, **overrides) -> dict[str, Any]:
    """Train, evaluate and save one run; returns the metrics also written to ``metrics.json``.

    ``overrides``: TrainConfig fields (or, without ``config``, flat options as on the command line,
    method and task options included). ``parts``: what to use instead of peftlab's own collator,
    optimizer, callbacks or preparation (see :class:`TrainingParts`).
    """
    from peftlab import distributed, hardware

    config = validation.check_config(resolve_config(config, overrides))  # before any work: one sentence
    parts = parts or TrainingParts()
    if parts.prepared is not None and parts.prepared.config != config:
        raise PeftlabError("TrainingParts.prepared was prepared from another configuration than the one given to "
                           "train(): prepare the same TrainConfig you train with.")
    if parts.prepared is None:
        validation.check_model_limits(config)  # --max-length against the model's config.json
    distributed.init_worker()  # a rank started by torchrun/deepspeed dies with its launcher
    start = start_output(config)
    if start.finished is not None:
        return start.finished  # --resume of a run that had finished: nothing to redo
    try:
        precision = hardware.resolve_precision(config.precision)
        prepared = parts.prepared or prepare(config)
        with tracking.tracked(config.report_to, config.output_dir()):  # the trackers read it from the env
            built = build_trainer(prepared, precision, parts, resume_from=start.resume_from)
            times = run(built)
    except BaseException:
        if distributed.is_main_process():
            start.abandon()  # failed before its first checkpoint: nothing left that blocks a retry
        raise
    adapter_dir = save(built)
    final = evaluate_final(built)
    if not distributed.is_main_process():
        return {}
    return report(built, times, final, adapter_dir)


def resolve_config(config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if config is None and any(key not in known for key in overrides):
        return config_from_options(overrides)  # method/task options given flat, as on the CLI
    return dataclasses.replace(config or TrainConfig(), **overrides)


def start_output(config: TrainConfig):
    """``--output`` checked and marked as this run's before any work (``peftlab.artifacts.start_run``); what
    ``--resume`` continues from, said out loud. Other ranks only read which checkpoint rank 0 resumes."""
    from peftlab import artifacts, distributed

    output = config.output_dir()
    if not distributed.is_main_process():
        resume_from = artifacts.intact_checkpoint(output)[0] if config.resume else None
        finished = artifacts.finished_metrics(output) if config.resume else None
        return artifacts.RunStart(output, finished=finished, resume_from=str(resume_from) if resume_from else None)
    start = artifacts.start_run(output, resume=config.resume, overwrite=config.overwrite,
                                identity=validation.training_identity(config),
                                describe_changes=validation.identity_changes)
    for note in start.notes:
        print(note, flush=True)
    return start


def build_trainer(prepared: Prepared, precision: str, parts: TrainingParts | None = None, *,
                  resume_from: str | None = None) -> BuiltTrainer:
    """The ``Trainer`` with peftlab's arguments, callbacks, collator and optimizer (``parts`` replace them).

    ``resume_from``: the checkpoint to continue from (default with ``--resume``: the newest intact one)."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from peftlab import distributed, hardware
    from peftlab.callbacks import JsonlLogger, ProgressBar
    from peftlab.modelinfo import count_parameters
    from peftlab.preprocess import collator
    from peftlab.artifacts import intact_checkpoint
    from peftlab.trainer import PeftlabTrainer

    parts = parts or TrainingParts()
    config, method, task, model = prepared.config, prepared.method, prepared.task, prepared.model
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise PeftlabError(f"Method '{method.name}' left no trainable parameters on '{config.model}'.")

    output = config.output_dir()
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / LOG
    if not config.resume and distributed.is_main_process():
        log_path.unlink(missing_ok=True)

    optim, optimizer_factory = _optimizer(prepared, parts.optimizer, config.weight_decay)
    on_cpu = hardware.device_type() == "cpu"
    args_options: dict[str, Any] = dict(
        output_dir=str(output / CHECKPOINTS),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        learning_rate=method.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=resolved_warmup_ratio(config, method),  # a float below 1 is a ratio of the steps
        lr_scheduler_type="linear",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        eval_strategy="no",  # evaluated by EpochEvaluation with the task's own scorer
        seed=config.seed,
        data_seed=config.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=on_cpu,
        **tracking.trainer_settings(config.report_to, config.run_name, config.output_dir()),
        disable_tqdm=True,  # replaced by ProgressBar
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if config.group_by_length and not config.packing else "random",
        length_column_name="length",
        dataloader_num_workers=0,
        optim=optim,
    )
    if on_cpu and distributed.world_size() != 1:
        args_options["ddp_backend"] = "gloo"
    args_options.update(distributed.training_arguments(config, precision, model=model))  # DeepSpeed / FSDP
    args_options.update(parts.training_arguments)
    args = TrainingArguments(**args_options)

    evaluation = distributed.epoch_evaluation(
        every_rank=distributed.forward_is_collective(config), task=task, tokenizer=prepared.tokenizer, dev_data=prepared.dev_data, dev_raw=prepared.dev_raw,
        label_names=prepared.label_names, batch_size=config.eval_batch_size, precision=precision,
        log_path=log_path, enabled=config.eval_each_epoch,
    )
    callbacks = [JsonlLogger(log_path, effective_batch=prepared.effective_batch), evaluation]
    if config.progress:
        callbacks.append(ProgressBar(prepared.total_steps, f"{method.name} · {task.name}"))
    callbacks += [*method.training_callbacks(model), *parts.callbacks]

    data_collator = parts.collator or collator(
        task.kind, prepared.tokenizer, pad_to_multiple_of=8 if hardware.device_type() == "cuda" else None,
        pack_to=config.max_length if config.packing else None)
    trainer = PeftlabTrainer(model=model, args=args, train_dataset=prepared.train_data, data_collator=data_collator,
                             processing_class=prepared.tokenizer, callbacks=callbacks,
                             optimizer_factory=optimizer_factory)
    trainer.remove_callback(PrinterCallback)  # ProgressBar and JsonlLogger report instead
    if TaskKind.parse(task.kind).has_new_head:
        # Classification and QA span heads (BERT's among them) average their own loss and ignore the
        # num_items_in_batch the Trainer passes to any forward with **kwargs; the Trainer then takes
        # that mean for a sum: it multiplies it by world_size (DDP) and skips the division by
        # grad_accum, so losses and gradients come out N times too large. A mean per rank,
        # averaged over ranks by DDP, is the single-process loss exactly.
        trainer.model_accepts_loss_kwargs = False
    if resume_from is None and config.resume:
        resume_from = str(intact_checkpoint(output)[0] or "") or None
    if distributed.is_main_process():
        print(_banner(prepared, trainable, total, precision, resume_from), flush=True)
    return BuiltTrainer(trainer=trainer, prepared=prepared, precision=precision, evaluation=evaluation,
                        output=output, resume_from=resume_from, trainable=trainable, total=total)


def _optimizer(prepared: Prepared, given, weight_decay: float) -> tuple[str, Callable | None]:
    """(``TrainingArguments.optim`` name, optimizer factory or None) for the run."""
    method = prepared.method
    if isinstance(given, str):
        return given, None
    if given is not None:
        return method.optimizer, given
    learning_rate = method.learning_rate
    if method.optimizer_parameter_groups(prepared.model, learning_rate, weight_decay) is None:
        return method.optimizer, None

    def grouped_adamw(model):
        import torch

        groups = method.optimizer_parameter_groups(model, learning_rate, weight_decay)
        return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay)

    return method.optimizer, grouped_adamw


def resolved_warmup_ratio(config: TrainConfig, method) -> float:
    return config.warmup_ratio if config.warmup_ratio is not None else method.warmup_ratio


def run(built: BuiltTrainer) -> RunTimes:
    """``Trainer.train`` (from the checkpoint a resumed run continues); its time without the evaluations."""
    trainer, evaluation = built.trainer, built.evaluation
    started, started_cpu = time.perf_counter(), time.process_time()
    trainer.train(resume_from_checkpoint=built.resume_from)
    wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    return RunTimes(train_seconds=max(wall - evaluation.seconds, 1e-9),
                    train_cpu_seconds=max(cpu - evaluation.cpu_seconds, 0.0),
                    steps_run=max(1, trainer.state.global_step - (evaluation.start_step or 0)))


def save(built: BuiltTrainer) -> Path:
    """The method's trained weights into ``<output>/adapter``.

    Every rank takes part (ZeRO keeps weights partitioned: they are gathered first); rank 0 writes."""
    from peftlab import distributed

    return distributed.save_trained(built.trainer, built.prepared.method, built.output / ADAPTER_DIR)


def evaluate_final(built: BuiltTrainer) -> dict[str, Any] | None:
    """The dev metrics of the trained model: the last epoch's when it ended the run, else scored now.

    Under ZeRO-3 every rank scores (each forward gathers weights); elsewhere only rank 0 (None elsewhere)."""
    from peftlab import distributed

    evaluation = built.evaluation
    if evaluation.last_metrics is not None and evaluation.last_epoch_step == built.trainer.state.global_step:
        return evaluation.last_metrics
    if distributed.is_main_process() or evaluation.every_rank:
        return evaluation.score(built.prepared.model)
    return None


def report(built: BuiltTrainer, times: RunTimes, final: dict[str, Any], adapter_dir: Path) -> dict[str, Any]:
    """Write ``peftlab.json``, ``metrics.json`` and ``loss.png`` (rank 0); the metrics."""
    from peftlab import hardware
    from peftlab.plots import plot_training

    prepared, output = built.prepared, built.output
    config, method, task, trainer = prepared.config, prepared.method, prepared.task, built.trainer
    manifest = RunManifest(
        method=method.name, model=config.model, kind=task.kind, task=task.name,
        method_options=method.options_dict(), task_options=_task_options_for_manifest(prepared),
        label_names=prepared.label_names, is_regression=task.is_regression, max_length=config.max_length,
        precision=built.precision, peftlab_version=__version__, data_dir=remembered_data_dir(task, config.data_dir),
    )
    manifest.save(output)
    task.save_with_adapter(adapter_dir, prepared.tokenizer)  # own chat data: the chat template it rendered with

    # Throughput counts the examples and real tokens this process trained on (resumed runs: only
    # the steps after the resume point are timed, so scale by the steps actually run here).
    fraction = min(1.0, max(0.0, times.steps_run / prepared.total_steps))
    examples = len(prepared.train_data) * config.epochs * fraction
    tokens = sum(prepared.train_data["length"]) * config.epochs * fraction
    metrics = {
        "method": method.name,
        "task": task.name,
        "model": config.model,
        "kind": task.kind,
        "category": method.category,
        "metric_name": task.metric_name,
        "metric": final[task.metric_name],
        "higher_is_better": task.higher_is_better,
        "metrics": final,
        "trainable_params": built.trainable,
        "total_params": built.total,
        "trainable_fraction": built.trainable / built.total,
        "train_examples": len(prepared.train_data),
        "eval_examples": len(prepared.dev_raw),  # questions for qa (a long context gives several features)
        "epochs": config.epochs,
        "steps": trainer.state.global_step,
        "effective_batch_size": prepared.effective_batch,
        "learning_rate": method.learning_rate,
        "warmup_ratio": resolved_warmup_ratio(config, method),
        "precision": built.precision,
        "device": hardware.device_type(),
        "train_seconds": times.train_seconds,
        "train_cpu_seconds": times.train_cpu_seconds,
        "eval_seconds": built.evaluation.seconds,
        "train_samples_per_second": examples / times.train_seconds,
        "train_tokens_per_second": tokens / times.train_seconds,
        "peak_memory_mb": hardware.peak_memory_mb(),
        "final_train_loss": built.evaluation.last_train_loss,
        "history": built.evaluation.history,
        "method_options": method.options_dict(),
        "resumed": built.resume_from is not None,
        "seed": config.seed,
        "peftlab_version": __version__,
    }
    write_json(output / METRICS, metrics)
    modelcard.write_card(output)  # adapter/README.md: Hub metadata, dev metrics, how to load it
    plot_training(output / LOG, output / PLOT, title=f"{method.name} on {task.name} ({config.model})",
                  metric_name=task.metric_name)
    if not config.keep_checkpoints:
        shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
    print(f"Done: dev {task.metric_name} = {metrics['metric']:.4f} · {times.train_seconds:.1f} s · "
          f"{metrics['train_samples_per_second']:.1f} examples/s · adapter in {adapter_dir}", flush=True)
    from peftlab.compare.stats import baseline_warning

    warning = baseline_warning(task, prepared.train_raw, prepared.dev_raw, prepared.label_names, final)
    if warning:  # a score no better than the majority class (or a constant) is said, not left to be noticed
        print(warning, flush=True)
    return metrics


def _task_options_for_manifest(prepared: Prepared) -> dict[str, Any]:
    """The task options to reload the run with: a label set read off the data (or given) is saved with it."""
    options = absolute_paths({**prepared.config.task_options, **prepared.task.recorded_options()},
                             validation.path_options())  # eval from anywhere; a dev split made here
    if prepared.label_names is not None and (prepared.labels_from_data or "label_names" in options):
        options["label_names"] = prepared.label_names
    return {k: v for k, v in options.items() if v is not None}


def _banner(prepared: Prepared, trainable: int, total: int, precision: str, resume_from: str | None) -> str:
    config, method, task = prepared.config, prepared.method, prepared.task
    lines = [
        f"peftlab train: {method.name} ({method.category}) on {task.name} with {config.model}",
        f"  task: {task.description}{' · packed rows' if config.packing else ''}",
        f"  trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)",
        f"  {len(prepared.train_data):,} train / {len(prepared.dev_data):,} dev examples · {config.epochs:g} epochs · "
        f"{prepared.total_steps} steps · batch {prepared.effective_batch} · lr {method.learning_rate:g} · {precision}",
    ]
    if resume_from:
        lines.append(f"  resuming from {resume_from}")
    return "\n".join(lines)


def __getattr__(name):  # the Trainer subclass, without importing transformers with this module
    if name == "AtomicCheckpointTrainer":
        from peftlab.trainer import PeftlabTrainer

        return PeftlabTrainer
    raise AttributeError(name)


def config_from_options(options: dict[str, Any], *, sources: dict[str, str] | None = None) -> TrainConfig:
    """Route flat option names (CLI or recipe) into a TrainConfig: method and task options included.

    Every value is typed and checked against its declared limits first (``peftlab.validation``);
    ``sources``: option name -> the recipe file it came from, named in the error."""
    from peftlab.methods import get_method_class

    options = {k.replace("-", "_"): v for k, v in options.items() if v is not None}
    sources = {k.replace("-", "_"): v for k, v in (sources or {}).items()}
    options = validation.check_train_values(options, sources)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    method_name = options.get("method", TrainConfig.method)
    method_class = get_method_class(method_name)
    # the method's options among the rest (a TrainConfig name, such as gradient_checkpointing, stays TrainConfig's)
    options.update(validation.check_method_values(
        method_class, {k: v for k, v in options.items() if k not in fields}, sources))
    method_fields = {f.name for f in method_class.option_fields()}
    from peftlab.tasks.own import OPTION_NAMES as task_keys
    values: dict[str, Any] = {"method_options": dict(options.pop("method_options", {}) or {}),
                              "task_options": dict(options.pop("task_options", {}) or {})}
    unknown = []
    for key, value in options.items():
        if key in fields:
            values[key] = value
        elif key in method_fields:
            values["method_options"][key] = value
        elif key in task_keys:
            values["task_options"][key] = value
        else:
            unknown.append(key)
    if values["task_options"].get("dataset") and "task" not in values:
        values["task"] = "hub"  # --dataset ORG/NAME alone names the task
    if unknown:
        raise PeftlabError(
            f"Unknown option{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in sorted(unknown))} "
            f"for method '{method_name}'. Method options: {', '.join(sorted(method_fields)) or '(none)'}; "
            "see `peftlab train --help`."
        )
    return TrainConfig(**values)
