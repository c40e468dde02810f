"""Plots a person would rather look at than read (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(log_path: Path) -> list[dict]:
    path = Path(log_path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(log_path: Path, output: Path, *, title: str, metric_name: str) -> Path:
    """Training loss per step, and the dev metric per epoch on a second axis."""
    plt = _pyplot()
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
