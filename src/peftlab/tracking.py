"""Experiment tracking: ``--report-to`` and ``--run-name`` on ``train`` and ``compare``.

The ``Trainer`` already speaks to TensorBoard, Trackio, MLflow and Weights & Biases through its
``report_to`` integrations (``transformers.integrations``); this module only decides what they are told:

* which backends (validated here, so that a typo lists the valid names and a missing package names the
  extra to install, before any model is loaded);
* the run's name (``--run-name``, else the run folder's name) and its experiment (``peftlab``, or the
  comparison's name: compare logs each method as one run of one experiment / group);
* where offline backends write, through the environment variables each integration reads, each set only
  when the user has not set it: TensorBoard event files in ``<run>/tensorboard``, an MLflow file store in
  ``<run>/mlruns`` (``<comparison>/mlruns`` for a comparison), W&B in offline mode under the run folder.
  Trackio keeps its own local store (``$TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``).

log.jsonl and loss.png are written whatever ``--report-to`` says.

Training uses :func:`trainer_settings` (``TrainingArguments`` keywords) inside :func:`tracked` (the
environment); compare wraps its runs in :func:`comparison` and logs its table with :func:`log_comparison`.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from peftlab.errors import PeftlabError

# backend -> the module that must be importable for the Trainer's integration
BACKENDS = {"tensorboard": "tensorboard", "trackio": "trackio", "mlflow": "mlflow", "wandb": "wandb"}
NONE = "none"
INSTALL = "pip install 'peftlab[tracking]'"
EXPERIMENT_ENV = "PEFTLAB_EXPERIMENT"  # set by compare for its runs (child processes inherit it)
DEFAULT_EXPERIMENT = "peftlab"
TENSORBOARD_DIR = "tensorboard"  # inside the run folder
MLFLOW_DIR = "mlruns"


def parse_report_to(value: str | list[str] | tuple[str, ...] | None, where: str = "--report-to") -> list[str]:
    """The backends named by ``value`` ("none", "tensorboard", "tensorboard,mlflow" or a list), checked:
    an unknown name lists the valid ones; a backend whose package is missing names the extra to install."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise PeftlabError(f"{where} takes backend names; got {item!r}. Choose {_choices()}.")
        name = item.strip().lower()
        if not name or name == NONE:
            continue
        if name not in BACKENDS:
            raise PeftlabError(f"{where}: unknown backend '{item.strip()}'; choose {_choices()} "
                               "(several: comma-separated, e.g. tensorboard,mlflow).")
        if name not in names:
            names.append(name)
    if NONE in [str(item).strip().lower() for item in items] and names:
        raise PeftlabError(f"{where} names 'none' together with {', '.join(names)}: give either none or backends.")
    missing = [name for name in names if importlib.util.find_spec(BACKENDS[name]) is None]
    if missing:
        raise PeftlabError(f"{where} {','.join(missing)}: the {' and '.join(missing)} package"
                           f"{'s are' if len(missing) > 1 else ' is'} not installed: {INSTALL}.")
    return names


def _choices() -> str:
    return ", ".join([NONE, *BACKENDS])


def experiment_name() -> str:
    """The experiment (MLflow), project (Trackio, W&B) a run belongs to: the comparison's name or ``peftlab``."""
    return os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


def trainer_settings(report_to: str | list[str] | None, run_name: str | None,
                     output_dir: str | os.PathLike) -> dict[str, Any]:
    """``TrainingArguments`` keyword arguments for ``--report-to`` / ``--run-name``; ``output_dir`` is the run
    folder (not its checkpoints). ``{"report_to": "none"}`` when nothing is tracked."""
    backends = parse_report_to(report_to)
    if not backends:
        return {"report_to": NONE}
    settings: dict[str, Any] = {"report_to": backends, "run_name": run_name or Path(output_dir).name}
    if "trackio" in backends:
        settings["project"] = experiment_name()
    return settings


def environment(report_to: str | list[str] | None, output_dir: str | os.PathLike,
                current: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables the chosen integrations read, for a run writing into ``output_dir``; only
    those not already set in ``current`` (default ``os.environ``): the user's own settings win."""
    backends = parse_report_to(report_to)
    current = os.environ if current is None else current
    folder = Path(output_dir).expanduser().resolve()
    wanted: dict[str, str] = {}
    if "tensorboard" in backends:
        wanted["TENSORBOARD_LOGGING_DIR"] = str(folder / TENSORBOARD_DIR)
    if "mlflow" in backends:
        wanted.update(mlflow_store_environment(folder, current))
        wanted["MLFLOW_EXPERIMENT_NAME"] = experiment_name()
    if "wandb" in backends:
        # Offline unless the user chose otherwise: `wandb sync <run>/wandb/offline-run-*` uploads later.
        wanted.update(WANDB_MODE="offline", WANDB_DIR=str(folder), WANDB_PROJECT=experiment_name())
    return {key: value for key, value in wanted.items() if not current.get(key)}


def mlflow_store_environment(folder: Path, current: dict[str, str]) -> dict[str, str]:
    """An MLflow file store in ``folder/mlruns`` (MLflow 3 asks for ``MLFLOW_ALLOW_FILE_STORE`` to use one)."""
    if current.get("MLFLOW_TRACKING_URI"):
        return {}
    return {"MLFLOW_TRACKING_URI": (folder / MLFLOW_DIR).as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}


@contextmanager
def tracked(report_to: str | list[str] | None, output_dir: str | os.PathLike) -> Iterator[dict[str, str]]:
    """Set :func:`environment` for the duration of a run (trainer construction to the end of training),
    then restore the environment as it was; yields the variables it set."""
    with _environment(environment(report_to, output_dir)) as changes:
        yield changes


@contextmanager
def comparison(report_to: str | list[str] | None, name: str, output_dir: str | os.PathLike) -> Iterator[str]:
    """Around a comparison's runs: each run becomes a run of the experiment (MLflow), project (Trackio, W&B)
    and group (W&B) ``name``, and MLflow's runs share one store in ``output_dir/mlruns``. Worker processes
    inherit the environment. Yields the experiment name."""
    backends = parse_report_to(report_to)
    folder = Path(output_dir).expanduser().resolve()
    wanted = {}
    if "mlflow" in backends:
        wanted.update(mlflow_store_environment(folder, os.environ))
    if "wandb" in backends and not os.environ.get("WANDB_RUN_GROUP"):
        wanted["WANDB_RUN_GROUP"] = name
    with _environment({EXPERIMENT_ENV: name, **wanted}):
        yield name


@contextmanager
def _environment(changes: dict[str, str]) -> Iterator[dict[str, str]]:
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield changes
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---- the comparison's table as a summary ----------------------------------------------------------------

def summary_values(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``{"<method>/<column>": number}`` for the numeric columns of compare's result rows."""
    values: dict[str, float] = {}
    for row in rows:
        label = str(row.get("method") or row.get("name") or "run")
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[f"{label}/{key}"] = float(value)
        for key, value in (row.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[f"{label}/dev_{key}"] = float(value)
    return values


def summary_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> tuple[list[str], list[list]]:
    """(columns, data) of the comparison table: one row per method, the given (default: common) columns."""
    columns = columns or [c for c in ("method", "status", "metric", "trainable_params", "trainable_fraction",
                                      "train_seconds", "peak_memory_mb", "metric_delta_vs_full")
                          if any(c in row for row in rows)]
    return columns, [[row.get(column) for column in columns] for row in rows]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns, data = summary_table(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for values in data:
        lines.append("| " + " | ".join(_cell(value) for value in values) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def log_comparison(report_to: str | list[str] | None, name: str, output_dir: str | os.PathLike,
                   rows: list[dict[str, Any]]) -> list[str]:
    """Log compare's final table to each backend as the comparison's summary (a run named ``summary`` in
    the experiment ``name``); call it inside :func:`comparison`. Returns the backends it logged to; a
    backend that fails is reported on stderr and skipped (the comparison's own files are already written)."""
    import sys

    logged = []
    folder = Path(output_dir).expanduser().resolve()
    writers = {"tensorboard": _summary_tensorboard, "mlflow": _summary_mlflow, "trackio": _summary_trackio,
               "wandb": _summary_wandb}
    for backend in parse_report_to(report_to):
        try:
            with _environment(environment([backend], folder)):
                writers[backend](name, folder, rows)
            logged.append(backend)
        except Exception as error:  # noqa: BLE001 - tracking is a side channel: never lose the results for it
            print(f"peftlab compare: warning: could not log the summary to {backend}: "
                  f"{str(error).splitlines()[0][:200] if str(error) else type(error).__name__}", file=sys.stderr)
    return logged


def _summary_tensorboard(name: str, folder: Path, rows: list[dict[str, Any]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder / TENSORBOARD_DIR / "summary"))
    try:
        writer.add_text("comparison", f"**{name}**\n\n" + markdown_table(rows))
        for key, value in summary_values(rows).items():
            writer.add_scalar(f"summary/{key}", value, 0)
    finally:
        writer.close()


def _summary_mlflow(name: str, folder: Path, rows: list[dict[str, Any]]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name="summary", tags={"peftlab.comparison": name})
    run_id = run.info.run_id
    try:
        for key, value in summary_values(rows).items():
            client.log_metric(run_id, key.replace("/", "."), value)
        client.log_text(run_id, markdown_table(rows), "comparison.md")
        client.log_dict(run_id, {"rows": rows}, "results.json")
    finally:
        client.set_terminated(run_id)


def _summary_trackio(name: str, folder: Path, rows: list[dict[str, Any]]) -> None:
    import trackio

    columns, data = summary_table(rows)
    trackio.init(project=name, name="summary")
    try:
        trackio.log({**summary_values(rows), "comparison": trackio.Table(columns=columns, data=data)})
    finally:
        trackio.finish()


def _summary_wandb(name: str, folder: Path, rows: list[dict[str, Any]]) -> None:
    import wandb

    columns, data = summary_table(rows)
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", name), group=name, name="summary", dir=str(folder))
    try:
        run.log({"comparison": wandb.Table(columns=columns, data=data)})
        run.summary.update(summary_values(rows))
    finally:
        run.finish()


__all__ = ["BACKENDS", "INSTALL", "EXPERIMENT_ENV", "parse_report_to", "experiment_name", "trainer_settings",
           "environment", "tracked", "comparison", "log_comparison", "summary_values", "summary_table",
           "markdown_table"]
