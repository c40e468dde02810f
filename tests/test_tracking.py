"""--report-to: validation, the Trainer settings and environment, and what the offline backends leave behind
after a tiny Trainer run (TensorBoard event files read back with tensorboard's own reader, an MLflow file
store with params and metrics, Trackio's local store) and a comparison's grouping and summary."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from peftlab import tracking
from peftlab.errors import PeftlabError


# ---- validation -----------------------------------------------------------------------------------------

def test_none_and_lists():
    assert tracking.parse_report_to(None) == []
    assert tracking.parse_report_to("none") == []
    assert tracking.parse_report_to(" TensorBoard , mlflow,tensorboard") == ["tensorboard", "mlflow"]
    assert tracking.parse_report_to(["mlflow"]) == ["mlflow"]
    assert tracking.trainer_settings("none", "x", "runs/a") == {"report_to": "none"}


def test_an_unknown_backend_lists_the_valid_ones():
    with pytest.raises(PeftlabError) as error:
        tracking.parse_report_to("tensorbord")
    message = str(error.value)
    assert "tensorbord" in message
    for name in ("none", "tensorboard", "trackio", "mlflow", "wandb"):
        assert name in message
    with pytest.raises(PeftlabError, match="none"):
        tracking.parse_report_to("none,mlflow")


def test_a_missing_backend_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(PeftlabError) as error:
        tracking.parse_report_to("tensorboard,wandb")
    assert "wandb" in str(error.value) and "pip install 'peftlab[tracking]'" in str(error.value)
    assert "\n" not in str(error.value)


def test_settings_and_environment(tmp_path, monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "TENSORBOARD_LOGGING_DIR", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT",
                tracking.EXPERIMENT_ENV, "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    run = tmp_path / "lora-sst2"
    settings = tracking.trainer_settings("tensorboard,trackio", None, run)
    assert settings == {"report_to": ["tensorboard", "trackio"], "run_name": "lora-sst2", "project": "peftlab"}
    assert tracking.trainer_settings("mlflow", "mine", run)["run_name"] == "mine"
    env = tracking.environment("tensorboard,mlflow,wandb", run)
    assert env["TENSORBOARD_LOGGING_DIR"] == str(run.resolve() / "tensorboard")
    assert env["MLFLOW_TRACKING_URI"] == (run.resolve() / "mlruns").as_uri()
    assert env["MLFLOW_EXPERIMENT_NAME"] == "peftlab"
    assert env["WANDB_MODE"] == "offline" and env["WANDB_DIR"] == str(run.resolve())
    # the user's own settings win
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("WANDB_MODE", "online")
    env = tracking.environment("mlflow,wandb", run)
    assert "MLFLOW_TRACKING_URI" not in env and "WANDB_MODE" not in env
    # tracked() restores the environment
    with tracking.tracked("tensorboard", run) as changes:
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == changes["TENSORBOARD_LOGGING_DIR"]
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ


# ---- a tiny Trainer run with the settings ---------------------------------------------------------------

class Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int = 16, length: int = 8):
        generator = torch.Generator().manual_seed(0)
        self.rows = torch.randint(2, 100, (count, length), generator=generator)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


def tiny_training(run: Path, report_to, run_name=None, steps: int = 4) -> None:
    """What training.py does with the settings: a Trainer on a tiny GPT-2, inside tracked()."""
    import transformers

    from tiny import tiny_gpt2

    with tracking.tracked(report_to, run):
        args = transformers.TrainingArguments(
            output_dir=str(run / "checkpoints"), max_steps=steps, per_device_train_batch_size=4, logging_steps=1,
            learning_rate=1e-3, use_cpu=True, save_strategy="no", disable_tqdm=True,
            **tracking.trainer_settings(report_to, run_name, run))
        trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens())
        trainer.train()


def read_tensorboard(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = [p for p in folder.rglob("events.out.tfevents.*")]
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def mlflow_runs(store: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {store}"
    return client, client.search_runs([found.experiment_id])


@pytest.fixture
def clean_environment(monkeypatch, tmp_path):
    for key in ("MLFLOW_TRACKING_URI", "TENSORBOARD_LOGGING_DIR", "MLFLOW_EXPERIMENT_NAME", tracking.EXPERIMENT_ENV,
                "WANDB_RUN_GROUP", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for reading the store back in the test
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_tensorboard_and_mlflow_record_loss_and_learning_rate(tmp_path, clean_environment):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run = tmp_path / "lora-tiny"
    tiny_training(run, "tensorboard,mlflow")

    scalars = read_tensorboard(run / "tensorboard")
    assert len(scalars["train/loss"]) == 4 and all(value > 0 for value in scalars["train/loss"])
    assert len(scalars["train/learning_rate"]) == 4 and scalars["train/learning_rate"][0] > 0

    client, (found,) = mlflow_runs(run / "mlruns", "peftlab")
    assert found.info.run_name == "lora-tiny"
    assert float(found.data.params["learning_rate"]) == pytest.approx(1e-3)
    assert found.data.params["max_steps"] == "4"
    history = client.get_metric_history(found.info.run_id, "loss")
    assert len(history) == 4 and all(point.value > 0 for point in history)
    assert "learning_rate" in found.data.metrics


def test_trackio_records_locally(tmp_path, clean_environment):
    pytest.importorskip("trackio")
    run = tmp_path / "trackio-run"
    tiny_training(run, "trackio", run_name="tiny")
    stored = list((tmp_path / "trackio").rglob("*.db"))
    assert stored, "trackio wrote no local database"
    import sqlite3

    text = ""
    for database in stored:
        with sqlite3.connect(database) as connection:
            for (table,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'"):
                text += " ".join(str(row) for row in connection.execute(f"SELECT * FROM {table}"))
    assert "train/loss" in text and "tiny" in text


def test_a_comparison_is_one_experiment_with_a_summary(tmp_path, clean_environment):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    out = tmp_path / "compare-tiny"
    with tracking.comparison("mlflow,tensorboard", "compare-tiny", out):
        for method in ("lora", "ia3"):
            tiny_training(out / "runs" / method, "mlflow,tensorboard", run_name=method, steps=2)
        rows = [{"method": "lora", "status": "ok", "metric": 0.81, "trainable_params": 1000, "metrics": {"accuracy": 0.81}},
                {"method": "ia3", "status": "ok", "metric": 0.77, "trainable_params": 100, "metrics": {"accuracy": 0.77}}]
        assert tracking.log_comparison("mlflow,tensorboard", "compare-tiny", out, rows) == ["mlflow", "tensorboard"]
    assert tracking.EXPERIMENT_ENV not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ
    assert not (out / "runs" / "lora" / "mlruns").exists()  # one store for the whole comparison

    client, runs = mlflow_runs(out / "mlruns", "compare-tiny")
    by_name = {run.info.run_name: run for run in runs}
    assert set(by_name) == {"lora", "ia3", "summary"}
    assert len(client.get_metric_history(by_name["ia3"].info.run_id, "loss")) == 2
    summary = by_name["summary"].data.metrics
    assert summary["lora.metric"] == pytest.approx(0.81) and summary["ia3.trainable_params"] == 100
    artifacts = {item.path for item in client.list_artifacts(by_name["summary"].info.run_id)}
    assert {"comparison.md", "results.json"} <= artifacts

    scalars = read_tensorboard(out / "tensorboard" / "summary")
    assert scalars["summary/lora/metric"] == [pytest.approx(0.81)]
    assert read_tensorboard(out / "runs" / "lora" / "tensorboard")["train/loss"]


@pytest.mark.real
def test_peftlab_train_reports_to_tensorboard_and_mlflow_and_writes_a_card(tmp_path, clean_environment, data_dir):
    """The real thing: `peftlab train --report-to tensorboard,mlflow` on minilm + SST-2 leaves the loss and
    learning-rate curves (read back with tensorboard's own reader and MLflow's client) and a model card."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from huggingface_hub import ModelCard

    import peftlab

    run = tmp_path / "lora-sst2"
    peftlab.train(method="lora", task="sst2", model="minilm", output=str(run), epochs=1, max_train_samples=64,
                  max_eval_samples=32, batch_size=16, logging_steps=1, precision="fp32", progress=False,
                  data_dir=str(data_dir), report_to="tensorboard,mlflow", run_name="sst2-lora")
    scalars = read_tensorboard(run / "tensorboard")
    assert len(scalars["train/loss"]) >= 4 and all(value > 0 for value in scalars["train/loss"])
    assert len(scalars["train/learning_rate"]) >= 4
    client, (found,) = mlflow_runs(run / "mlruns", "peftlab")
    assert found.info.run_name == "sst2-lora" and client.get_metric_history(found.info.run_id, "loss")
    card = ModelCard.load(run / "adapter" / "README.md")
    assert card.data.base_model and "lora" in card.data.tags
