"""Plots a person would rather look at than read (matplotlib, headless), and the two ways peftlab makes a figure:
:func:`pyplot` for files written by the commands (training curves, compare's report), :func:`figure` for
figures a notebook displays (no global pyplot state, so nothing leaks between cells)."""

from __future__ import annotations

import json
from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (peftlab writes PNG files; no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(width: float = 7, height: float = 3.6):
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches, laid out by constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def read_log(log_path: Path) -> list[dict]:
    """The records of a run's ``log.jsonl`` (one per logging step and per evaluation); [] if there is none."""
    path = Path(log_path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(log_path: Path, output: Path, *, title: str, metric_name: str) -> Path:
    """Training loss per step, and the dev metric per epoch on a second axis."""
    plt = pyplot()
    records = read_log(log_path)
    train = [r for r in records if r.get("type") == "train" and "loss" in r]
    evals = [r for r in records if r.get("type") == "eval" and f"eval_{metric_name}" in r]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        axis.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss", color="tab:blue")
    axis.grid(alpha=0.3)
    if evals:
        other = axis.twinx()
        other.plot([r["step"] for r in evals], [r[f"eval_{metric_name}"] for r in evals], "o-", color="tab:orange",
                   label=f"dev {metric_name}")
        other.set_ylabel(f"dev {metric_name}", color="tab:orange")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(output)
    plt.close(figure)
    return Path(output)
