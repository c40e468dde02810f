"""Training: one method on one task and model, through the Hugging Face ``Trainer``.

The ``Trainer`` is the engine (it is what DDP, DeepSpeed and resumable checkpoints already work
through); peftlab decides what goes in: batches padded to their own length and grouped by length,
bf16 autocast where the hardware runs it, an optimizer over the trainable parameters only, a
progress bar with loss, learning rate, throughput and ETA, per-epoch dev evaluation, atomic
checkpoints, and the run folder described in ``peftlab.artifacts``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab import __version__
from peftlab.artifacts import RunManifest, atomic_write_text, write_json
from peftlab.errors import PeftlabError
from peftlab.tasks.base import select  # noqa: F401 (part of the training API)


@dataclass
class TrainConfig:
    """Everything a training run needs. CLI flags and recipe YAML keys use these names."""

    method: str = "lora"
    task: str = "sst2"
    model: str = "minilm"
    output: str | None = None  # default: runs/<method>-<task>
    epochs: float = 3.0
    lr: float | None = None  # None: the method's default
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    seed: int = 42
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    warmup_ratio: float | None = None  # None: the method's own (Method.warmup_ratio)
    weight_decay: float = 0.0
    logging_steps: int = 10
    save_steps: int = 200
    eval_each_epoch: bool = True
    resume: bool = False
    keep_checkpoints: bool = False
    data_dir: str | None = None
    deepspeed: str | None = None  # zero2 | zero3 | path/to/config.json (see peftlab.distributed)
    offload: str | None = None  # cpu
    progress: bool = True
    method_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)

    def output_dir(self) -> Path:
        return Path(self.output or f"runs/{self.method}-{self.task}")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare(config: TrainConfig):
    """Load task, data, tokenizer, base model and method: everything before the first step.

    Returns a namespace the trainer, compare and the benchmarks share, so that every caller
    measures the same thing.
    """
    import transformers

    from peftlab.methods import get_method
    from peftlab.models import load_model, load_tokenizer
    from peftlab.preprocess import tokenize
    from peftlab.tasks import get_task

    method_options = dict(config.method_options)
    if config.lr is not None:
        method_options["learning_rate"] = config.lr
    method = get_method(config.method, **method_options)
    task = get_task(config.task, **config.task_options)
    if config.max_length < 8:
        raise PeftlabError(f"--max-length must be at least 8; got {config.max_length}.")

    train_raw = select(task.load("train", config.data_dir), config.max_train_samples, config.seed)
    dev_raw = select(task.load("dev", config.data_dir), config.max_eval_samples, config.seed)
    label_names = task.labels_from(train_raw)

    transformers.set_seed(config.seed)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, task.kind, label_names=label_names, is_regression=task.is_regression,
                       **method.model_load_kwargs())
    method.check_supported(model, task.kind)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad input
    model = method.apply(model, task.kind)

    tokenize_options = dict(max_length=config.max_length, label_names=label_names, is_regression=task.is_regression)
    train_data = tokenize(train_raw, task.kind, tokenizer, **tokenize_options)
    dev_data = tokenize(dev_raw, task.kind, tokenizer, **tokenize_options)
    return dataclasses.make_dataclass("Prepared", [
        "config", "method", "task", "tokenizer", "model", "label_names", "train_raw", "dev_raw",
        "train_data", "dev_data",
    ])(config, method, task, tokenizer, model, label_names, train_raw, dev_raw, train_data, dev_data)


def train(config: TrainConfig | None = None, **overrides) -> dict[str, Any]:
    """Train, evaluate and save one run; returns the metrics also written to ``metrics.json``."""
    from transformers import TrainingArguments

    from peftlab import hardware
    from peftlab import distributed
    from peftlab.callbacks import JsonlLogger, ProgressBar
    from peftlab.evaluation import evaluate_model
    from peftlab.methods.base import count_parameters
    from peftlab.preprocess import collator

    distributed.init_worker()  # a rank started by torchrun/deepspeed dies with its launcher
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if config is None and any(key not in known for key in overrides):
        config = config_from_options(overrides)  # method/task options given flat, as on the CLI
    else:
        config = dataclasses.replace(config or TrainConfig(), **overrides)
    output = config.output_dir()
    checkpoints = output / "checkpoints"
    if output.exists() and (output / "metrics.json").exists() and not config.resume:
        raise PeftlabError(f"'{output}' already holds a finished run. Choose another --output or delete it.")
    if output.exists() and checkpoints.exists() and not config.resume and _is_main_process():
        raise PeftlabError(f"'{output}' holds an unfinished run. Continue it with --resume, or choose another --output.")
    if config.resume and (output / "metrics.json").exists():
        return json.loads((output / "metrics.json").read_text())  # already finished: nothing to redo

    precision = hardware.resolve_precision(config.precision)
    prepared = prepare(config)
    model, task, method = prepared.model, prepared.task, prepared.method
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise PeftlabError(f"Method '{method.name}' left no trainable parameters on '{config.model}'.")

    output.mkdir(parents=True, exist_ok=True)
    log_path = output / "log.jsonl"
    if not config.resume and _is_main_process():
        log_path.unlink(missing_ok=True)

    on_cpu = hardware.device_type() == "cpu"
    args_options: dict[str, Any] = dict(
        output_dir=str(checkpoints),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        learning_rate=method.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio if config.warmup_ratio is not None else method.warmup_ratio,
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
        report_to="none",
        disable_tqdm=True,  # replaced by ProgressBar
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        length_column_name="length",
        dataloader_num_workers=0,
        optim=getattr(method, "optimizer", "adamw_torch"),
    )
    if on_cpu and os.environ.get("WORLD_SIZE", "1") != "1":
        args_options["ddp_backend"] = "gloo"
    distributed.check_options(config.deepspeed, config.offload)
    zero_stage = 0
    if config.deepspeed:
        args_options["deepspeed"] = distributed.deepspeed_config(config.deepspeed, config.offload)
        zero_stage = distributed.zero_stage(args_options["deepspeed"])
        distributed.ensure_process_group_env()  # DeepSpeed without a launcher: a one-process group
    args = TrainingArguments(**args_options)

    world_size = max(1, args.world_size)
    effective_batch = config.batch_size * config.grad_accum * world_size
    steps_per_epoch = math.ceil(len(prepared.train_data) / effective_batch)
    total_steps = max(1, math.ceil(steps_per_epoch * config.epochs))

    evaluation = distributed.epoch_evaluation(
        zero_stage, task=task, tokenizer=prepared.tokenizer, dev_data=prepared.dev_data, dev_raw=prepared.dev_raw,
        label_names=prepared.label_names, batch_size=config.eval_batch_size, precision=precision,
        log_path=log_path, enabled=config.eval_each_epoch,
    )
    callbacks = [JsonlLogger(log_path, effective_batch=effective_batch), evaluation]
    if config.progress:
        callbacks.append(ProgressBar(total_steps, f"{method.name} · {task.name}"))

    trainer = AtomicCheckpointTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train_data,
        data_collator=collator(task.kind, prepared.tokenizer,
                               pad_to_multiple_of=8 if hardware.device_type() == "cuda" else None),
        processing_class=prepared.tokenizer,
        callbacks=callbacks,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # ProgressBar and JsonlLogger report instead
    if task.kind in ("seq-cls", "token-cls", "qa"):
        # Classification and QA span heads (BERT's among them) average their own loss and ignore the
        # num_items_in_batch the Trainer passes to any forward with **kwargs; the Trainer then takes
        # that mean for a sum: it multiplies it by world_size (DDP) and skips the division by
        # grad_accum, so losses and gradients come out N times too large. A mean per rank,
        # averaged over ranks by DDP, is the single-process loss exactly.
        trainer.model_accepts_loss_kwargs = False
    resume_from = _last_checkpoint(checkpoints) if config.resume else None
    if _is_main_process():
        print(_banner(config, method, task, trainable, total, len(prepared.train_data), len(prepared.dev_data),
                      precision, effective_batch, total_steps, resume_from), flush=True)

    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - started
    train_seconds = max(wall - evaluation.seconds, 1e-9)

    # Every rank takes part in saving (ZeRO keeps weights partitioned: they are gathered first) and,
    # under ZeRO-3, in the final evaluation (each forward gathers weights); rank 0 writes.
    adapter_dir = distributed.save_trained(trainer, method, output / "adapter")
    final = evaluation.last_metrics
    if final is None or evaluation.last_epoch_step != trainer.state.global_step:
        if _is_main_process() or evaluation.every_rank:
            started_eval = time.perf_counter()
            final = evaluate_model(model, task, prepared.tokenizer, prepared.dev_data, prepared.dev_raw,
                                   label_names=prepared.label_names, batch_size=config.eval_batch_size,
                                   precision=precision)
            evaluation.seconds += time.perf_counter() - started_eval
    if not _is_main_process():
        return {}

    manifest = RunManifest(
        method=method.name, model=config.model, kind=task.kind, task=task.name,
        method_options=method.options_dict(), task_options=_task_options_for_manifest(config, prepared),
        label_names=prepared.label_names, is_regression=task.is_regression, max_length=config.max_length,
        precision=precision, peftlab_version=__version__,
    )
    manifest.save(output)

    # Throughput counts the examples and real tokens this process trained on (resumed runs: only
    # the steps after the resume point are timed, so scale by the steps actually run here).
    steps_run = max(1, trainer.state.global_step - (evaluation.start_step or 0))
    fraction = min(1.0, steps_run / total_steps)
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
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "train_examples": len(prepared.train_data),
        "eval_examples": len(prepared.dev_raw),  # questions for qa (a long context gives several features)
        "epochs": config.epochs,
        "steps": trainer.state.global_step,
        "effective_batch_size": effective_batch,
        "learning_rate": method.learning_rate,
        "warmup_ratio": config.warmup_ratio if config.warmup_ratio is not None else method.warmup_ratio,
        "precision": precision,
        "device": hardware.device_type(),
        "train_seconds": train_seconds,
        "eval_seconds": evaluation.seconds,
        "train_samples_per_second": examples / train_seconds,
        "train_tokens_per_second": tokens / train_seconds,
        "peak_memory_mb": hardware.peak_memory_mb(),
        "final_train_loss": evaluation.last_train_loss,
        "history": evaluation.history,
        "method_options": method.options_dict(),
        "resumed": resume_from is not None,
        "seed": config.seed,
        "peftlab_version": __version__,
    }
    write_json(output / "metrics.json", metrics)
    from peftlab.plots import plot_training

    plot_training(log_path, output / "loss.png", title=f"{method.name} on {task.name} ({config.model})",
                  metric_name=task.metric_name)
    if not config.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    print(f"Done: dev {task.metric_name} = {metrics['metric']:.4f} · {train_seconds:.1f} s · "
          f"{metrics['train_samples_per_second']:.1f} examples/s · adapter in {adapter_dir}", flush=True)
    return metrics


def _task_options_for_manifest(config: TrainConfig, prepared) -> dict[str, Any]:
    options = dict(config.task_options)
    if prepared.label_names is not None:
        options["label_names"] = prepared.label_names if config.task in ("csv", "tsv", "jsonl") else options.get("label_names")
    return {k: v for k, v in options.items() if v is not None}


def _last_checkpoint(checkpoints: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not checkpoints.is_dir():
        return None
    return get_last_checkpoint(str(checkpoints))


def _banner(config, method, task, trainable, total, n_train, n_dev, precision, effective_batch, total_steps,
            resume_from) -> str:
    lines = [
        f"peftlab train: {method.name} ({method.category}) on {task.name} with {config.model}",
        f"  trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)",
        f"  {n_train:,} train / {n_dev:,} dev examples · {config.epochs:g} epochs · {total_steps} steps · "
        f"batch {effective_batch} · lr {method.learning_rate:g} · {precision}",
    ]
    if resume_from:
        lines.append(f"  resuming from {resume_from}")
    return "\n".join(lines)


def _make_trainer_class():
    from transformers import Trainer

    class _AtomicCheckpointTrainer(Trainer):
        """A Trainer whose checkpoints appear all at once.

        ``Trainer`` writes ``checkpoint-N/`` file by file, so a kill mid-save leaves a folder that
        looks complete but is not, and ``--resume`` would load it. Here each checkpoint is written
        into a staging folder and renamed into place only when complete (rename is atomic).
        """

        def _save_checkpoint(self, model, trial):
            import torch.distributed as dist

            run_dir = Path(self._get_output_dir(trial=trial))
            staging_root = run_dir / ".staging"
            name = f"checkpoint-{self.state.global_step}"
            original = self.args.output_dir
            if self.args.should_save:
                shutil.rmtree(staging_root / name, ignore_errors=True)
            self.args.output_dir = str(staging_root)
            limit, self.args.save_total_limit = self.args.save_total_limit, None
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = original
                self.args.save_total_limit = limit
            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has written its shard (DeepSpeed) before the rename
            if self.args.should_save:
                target = run_dir / name
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging_root / name, target)
                _fsync_dir(run_dir)
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(output_dir=str(run_dir), save_total_limit=limit, use_mtime=False)
            if dist.is_available() and dist.is_initialized():
                dist.barrier()

    return _AtomicCheckpointTrainer


def _fsync_dir(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class _LazyTrainer:
    def __call__(self, *args, **kwargs):
        return _make_trainer_class()(*args, **kwargs)


AtomicCheckpointTrainer = _LazyTrainer()


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe YAML: the same keys as the CLI flags (``lr``, ``epochs``, ``r``, ...)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"Recipe '{path}' does not exist.")
    try:
        payload = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise PeftlabError(f"Recipe '{path}'{where}: invalid YAML ({getattr(error, 'problem', error)}).") from None
    if not isinstance(payload, dict):
        raise PeftlabError(f"Recipe '{path}' must be a mapping of option names to values.")
    return {str(k).replace("-", "_"): v for k, v in payload.items()}


def config_from_options(options: dict[str, Any]) -> TrainConfig:
    """Route flat option names (CLI or recipe) into a TrainConfig: method and task options included."""
    from peftlab.methods import get_method_class

    options = {k.replace("-", "_"): v for k, v in options.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    method_name = options.get("method", TrainConfig.method)
    method_fields = {f.name for f in get_method_class(method_name).option_fields()}
    task_keys = {"train_file", "dev_file", "text_column", "text_pair_column", "label_column", "label_names",
                 "regression"}
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
    if unknown:
        raise PeftlabError(
            f"Unknown option{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in sorted(unknown))} "
            f"for method '{method_name}'. Method options: {', '.join(sorted(method_fields)) or '(none)'}; "
            "see `peftlab train --help`."
        )
    return TrainConfig(**values)
