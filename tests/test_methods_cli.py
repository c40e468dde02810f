"""``peftlab methods``: the registry as a table, and trainable parameters counted on a real model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PEFTLAB = [sys.executable, "-m", "peftlab.cli"]
ALL_METHODS = ["lora", "qlora", "adapter", "prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2", "ia3",
               "bitfit", "full", "dora", "adalora", "vera", "loha", "lokr", "oft"]


def methods_json(*args) -> list[dict]:
    result = subprocess.run(PEFTLAB + ["methods", "--json", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_methods_without_a_model_lists_the_registry():
    rows = methods_json()
    assert [row["method"] for row in rows] == ALL_METHODS
    for row in rows:
        assert row["category"] in ("reparameterization", "additive", "selective", "full")
        assert isinstance(row["mergeable"], bool) and row["inference_cost"] and row["summary"]
        assert row["default_lr"] > 0
    by_name = {row["method"]: row for row in rows}
    assert by_name["lora"]["mergeable"] and not by_name["prompt-tuning"]["mergeable"]


@pytest.mark.real
def test_methods_on_minilm_sst2_counts_every_method():
    rows = methods_json("--model", "minilm", "--task", "sst2")
    assert [row["method"] for row in rows] == ALL_METHODS
    by_name = {row["method"]: row for row in rows}
    for name, row in by_name.items():
        assert row["status"] == "ok", (name, row["reason"])
        assert row["model"] == "minilm" and row["task"] == "sst2" and row["kind"] == "seq-cls"
        assert 0 < row["trainable_params"] <= row["total_params"], name
        assert 0 < row["trainable_fraction"] <= 1, name
        assert row["trainable_fraction"] == pytest.approx(row["trainable_params"] / row["total_params"])
    assert by_name["full"]["trainable_fraction"] == 1.0
    # LoRA r=8 on query/value of 6 layers (hidden 384): 6 x 2 x 8 x (384 + 384), plus the 2-class head
    assert by_name["lora"]["trainable_params"] == 6 * 2 * 8 * (384 + 384) + (384 * 2 + 2)
    # BitFit: the biases and the head, far fewer than LoRA; prompt tuning: 20 x 384 + the head, fewest
    assert by_name["prompt-tuning"]["trainable_params"] < by_name["bitfit"]["trainable_params"] \
        < by_name["lora"]["trainable_params"] < by_name["full"]["trainable_params"]


def test_methods_table_marks_unsupported_cells_with_the_reason():
    """Prompt tuning and P-Tuning prepend tokens, which breaks per-token labels (NER)."""
    rows = methods_json("--task", "conll2003")
    by_name = {row["method"]: row for row in rows}
    assert by_name["prompt-tuning"]["status"] == "unsupported" and "token-cls" in by_name["prompt-tuning"]["reason"]
    assert by_name["lora"]["status"] == "ok"
