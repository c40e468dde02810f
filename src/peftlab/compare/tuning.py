"""``--tune lr``: each method's learning rate searched per task, fairly, before the runs that are reported.

For one (method, task) cell, in one worker process (the trials of a cell run one after another, because
TPE chooses each rate from the scores of the earlier ones; different cells tune at the same time with
``--workers``/``--ray``):

* a **validation split carved from the training examples** (:data:`VALIDATION_FRACTION` of them, at most
  :data:`VALIDATION_MAX`) scores every trial; the trials train on the rest. The dev set the report
  scores is never seen while tuning;
* Optuna's TPE sampler (seeded) draws the rate **log-uniformly within a factor of** :data:`SEARCH_FACTOR`
  **of the method's default** (or the rate a recipe gives it); the first trial is the default itself, so
  the chosen rate scores at least the default's on the validation split;
* each trial reports its validation score after every epoch, and Optuna's median pruner stops a trial
  whose score is below the median of the earlier trials at the same epoch, from the second epoch on and once
  two trials have finished (the first epoch of a small budget says little: measured on P-Tuning, trials
  pruned after epoch 1 had higher epoch-1 scores than the default's final one);
* the best trial's rate is chosen and recorded (``tune.json`` in the cell's folder, ``results.json``'s
  ``tuning``); the reported runs then train on the whole training budget with it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError

SEARCH_FACTOR = 10.0  # the search spans [default / 10, default * 10], log-uniform
VALIDATION_FRACTION = 0.2
VALIDATION_MAX = 1000
TUNE_FILE = "tune.json"
TUNABLE = ("lr",)


def check_tune(parameter: str | None, trials: int | None) -> tuple[str | None, int]:
    """``--tune``/``--trials`` checked: (the parameter or None, the number of trials)."""
    if parameter is None:
        if trials is not None:
            raise PeftlabError("--trials sets the number of trials of --tune: add --tune lr, or drop --trials.")
        return None, 0
    if parameter not in TUNABLE:
        raise PeftlabError(f"--tune {parameter!r} is not tunable; tunable: {', '.join(TUNABLE)}.")
    trials = 8 if trials is None else trials
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise PeftlabError(f"--trials must be a positive whole number; got {trials!r}.")
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise PeftlabError("--tune needs Optuna: pip install 'peftlab[tune]' (or pip install optuna).") from None
    return parameter, trials


def validation_size(train_examples: int) -> int:
    """How many training examples are held out to score the trials."""
    size = min(VALIDATION_MAX, int(round(train_examples * VALIDATION_FRACTION)))
    if size < 4 or train_examples - size < 4:
        raise PeftlabError(f"--tune needs at least 20 training examples to carve a validation split from (it has "
                           f"{train_examples}); raise --max-train-samples.")
    return size


def carved_prepare(config, seed: int):
    """``training.prepare(config)`` with its dev split replaced by a validation split carved from the training
    examples (a seeded random :func:`validation_size`), which the trial then trains without."""
    import numpy as np

    from peftlab.preprocess import tokenize
    from peftlab.training import optimizer_steps, prepare

    prepared = prepare(config)
    rows = prepared.train_raw
    held_out = validation_size(len(rows))
    order = np.random.default_rng(seed).permutation(len(rows)).tolist()
    train_raw, validation_raw = rows.select(sorted(order[held_out:])), rows.select(sorted(order[:held_out]))
    options = dict(max_length=config.max_length, label_names=prepared.label_names,
                   is_regression=prepared.task.is_regression)
    train_data = tokenize(train_raw, prepared.task.kind, prepared.tokenizer, **options)
    validation_data = tokenize(validation_raw, prepared.task.kind, prepared.tokenizer, **options)
    total_steps = optimizer_steps(len(train_data), config.batch_size, config.grad_accum, prepared.world_size,
                                  config.epochs)
    # the method was applied with the step count of the whole training subset; callbacks read it from here
    prepared.method.total_steps = total_steps
    return dataclasses.replace(prepared, train_raw=train_raw, dev_raw=validation_raw, train_data=train_data,
                               dev_data=validation_data, total_steps=total_steps)


def epoch_scores(log_path: Path, metric_name: str) -> list[float]:
    """The per-epoch validation scores a trial has logged so far (``log.jsonl``'s eval records)."""
    scores = []
    if Path(log_path).is_file():
        for line in Path(log_path).read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("type") == "eval" and isinstance(record.get(f"eval_{metric_name}"), (int, float)):
                scores.append(float(record[f"eval_{metric_name}"]))
    return scores


def pruning_callback(trial, log_path: Path, metric_name: str):
    """A Trainer callback: report each epoch's validation score to ``trial``; stop the run if Optuna prunes it."""
    from transformers import TrainerCallback

    class ReportAndPrune(TrainerCallback):
        def __init__(self):
            self.pruned = False

        def on_epoch_end(self, args, state, control, **kwargs):  # after peftlab's EpochEvaluation scored
            scores = epoch_scores(log_path, metric_name)
            if scores:
                trial.report(scores[-1], step=len(scores))
                if trial.should_prune():
                    self.pruned = True
                    control.should_training_stop = True
            return control

    return ReportAndPrune()


def tune_method(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the trials of one cell (in its worker); returns what ``tune.json`` records."""
    import optuna

    from peftlab.training import TrainingParts, build_method, build_task, config_from_options, train

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = config_from_options(spec["options"])
    trials = int(spec["tune"]["trials"])
    folder = Path(config.output_dir())
    default_lr = build_method(config).learning_rate
    task = build_task(config)
    low, high = default_lr / SEARCH_FACTOR, default_lr * SEARCH_FACTOR
    direction = "maximize" if task.higher_is_better else "minimize"
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=config.seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    study.enqueue_trial({"lr": default_lr})
    records: list[dict[str, Any]] = []
    validation = {}

    def objective(trial):
        lr = trial.suggest_float("lr", low, high, log=True)
        trial_dir = folder / f"trial-{trial.number}"
        shutil.rmtree(trial_dir, ignore_errors=True)
        trial_config = dataclasses.replace(config, lr=lr, output=str(trial_dir), eval_each_epoch=True,
                                           progress=False, resume=False)
        callback = pruning_callback(trial, trial_dir / "log.jsonl", task.metric_name)
        record = {"trial": trial.number, "lr": lr, "state": "failed", "score": None, "epoch_scores": []}
        records.append(record)
        try:
            prepared = carved_prepare(trial_config, config.seed)
            validation["examples"] = len(prepared.dev_raw)
            metrics = train(trial_config, parts=TrainingParts(prepared=prepared, callbacks=[callback]))
        except PeftlabError as error:
            record["error"] = str(error)
            raise
        finally:
            record["epoch_scores"] = epoch_scores(trial_dir / "log.jsonl", task.metric_name)
            shutil.rmtree(trial_dir, ignore_errors=True)  # a trial's weights are not kept
        score = metrics.get("metric")
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            record["error"] = f"validation {task.metric_name} is {score}: diverged"
            raise ValueError(record["error"])
        record["score"] = float(score)
        if callback.pruned:
            record["state"] = "pruned"
            raise optuna.TrialPruned()
        record["state"] = "complete"
        return float(score)

    study.optimize(objective, n_trials=trials, catch=(Exception,))
    complete = [r for r in records if r["state"] == "complete"]
    default_record = next((r for r in records if r["trial"] == 0), None)
    if complete:
        best = (max if task.higher_is_better else min)(complete, key=lambda r: r["score"])
        chosen, note = best["lr"], None
    else:
        best, chosen, note = None, default_lr, "no trial finished: the default learning rate is kept"
    return {
        "method": config.method, "task": config.task, "parameter": "lr", "trials": trials,
        "default_lr": default_lr, "search": [low, high], "chosen_lr": chosen, "note": note,
        "metric_name": task.metric_name, "best_score": best["score"] if best else None,
        "default_score": default_record["score"] if default_record else None,
        "validation_examples": validation.get("examples"),
        "seed": config.seed, "sampler": "TPE", "pruner": "median (per epoch)", "trial_records": records,
    }


__all__ = ["SEARCH_FACTOR", "VALIDATION_FRACTION", "VALIDATION_MAX", "TUNE_FILE", "TUNABLE", "check_tune",
           "validation_size", "carved_prepare", "epoch_scores", "pruning_callback", "tune_method"]
