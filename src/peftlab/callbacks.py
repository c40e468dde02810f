"""Trainer callbacks: the progress bar, the JSON-lines log and per-epoch dev evaluation."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback


class ProgressBar(TrainerCallback):
    """One tqdm bar for the whole run: loss, learning rate, examples/s and the ETA tqdm computes."""

    def __init__(self, total_steps: int, description: str):
        self.total_steps = total_steps
        self.description = description
        self.bar = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps or self.total_steps, initial=state.global_step,
                        desc=self.description, unit="step", dynamic_ncols=True)
        self.started = time.perf_counter()
        self.start_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        elapsed = time.perf_counter() - self.started
        done = state.global_step - self.start_step
        if elapsed > 0 and done > 0:
            batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
            self.postfix["ex/s"] = f"{done * batch / elapsed:.1f}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.postfix["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            self.postfix["lr"] = f"{logs['learning_rate']:.2e}"
        self.bar.set_postfix(self.postfix)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class JsonlLogger(TrainerCallback):
    """Appends one JSON object per logging step to ``log.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path, effective_batch: int):
        self.path = Path(path)
        self.effective_batch = effective_batch
        self.started = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.start_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"type": "train" if "loss" in logs else "summary", "step": state.global_step,
                  "epoch": round(state.epoch or 0.0, 4), "time": time.time()}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        elapsed = time.perf_counter() - (self.started or time.perf_counter())
        if elapsed > 0 and state.global_step > self.start_step:
            record["samples_per_second"] = (state.global_step - self.start_step) * self.effective_batch / elapsed
        with self.path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")


class EpochEvaluation(TrainerCallback):
    """Scores the dev set at the end of every epoch with the task's own metric (rank 0 only)."""

    def __init__(self, *, task, tokenizer, dev_data, dev_raw, label_names, batch_size, precision, log_path,
                 enabled=True):
        self.task = task
        self.tokenizer = tokenizer
        self.dev_data = dev_data
        self.dev_raw = dev_raw
        self.label_names = label_names
        self.batch_size = batch_size
        self.precision = precision
        self.log_path = Path(log_path)
        self.enabled = enabled
        self.seconds = 0.0  # wall-clock seconds spent evaluating
        self.cpu_seconds = 0.0  # CPU seconds of this process spent evaluating
        self.history: list[dict] = []
        self.last_metrics = None
        self.last_epoch_step = None
        self.last_train_loss = None
        self.start_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_train_loss = float(logs["loss"])

    def score(self, model) -> dict:
        """The dev metrics of ``model`` now; the wall and CPU time it takes add to ``seconds`` / ``cpu_seconds``."""
        from peftlab.evaluation import evaluate_model

        started, started_cpu = time.perf_counter(), time.process_time()
        scores = evaluate_model(model, self.task, self.tokenizer, self.dev_data, self.dev_raw,
                                label_names=self.label_names, batch_size=self.batch_size, precision=self.precision)
        self.seconds += time.perf_counter() - started
        self.cpu_seconds += time.process_time() - started_cpu
        return scores

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if not self.enabled or not state.is_world_process_zero or model is None:
            return
        before = self.seconds
        scores = self.score(model)
        elapsed = self.seconds - before
        self.last_metrics = scores
        self.last_epoch_step = state.global_step
        record = {"type": "eval", "step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                  "eval_seconds": elapsed, "time": time.time(), **{f"eval_{k}": v for k, v in scores.items()}}
        self.history.append(record)
        with self.log_path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        main = scores.get(self.task.metric_name)
        if main is not None:
            from tqdm.auto import tqdm

            tqdm.write(f"  epoch {state.epoch:.2f}: dev {self.task.metric_name} = {main:.4f} ({elapsed:.1f} s)")
