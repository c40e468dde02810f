"""Helpers for the tests that start several processes (DDP, ZeRO, FSDP, multi-node) on CPU with gloo.

The contract they check: with the same global batch, an N-process run is the 1-process run. Per-step
losses (DIR/log.jsonl, logging_steps=1) agree within 1e-5 and the saved adapters agree tensor for tensor.
Dropout is off (in the model configs and the methods') because each rank draws its own dropout masks.
Single-process references run in the test's own process (CPU forced); the multi-process runs are
``peftlab train`` subprocesses with CUDA hidden and one thread per rank.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

LOSS_TOLERANCE = 1e-5
RUN_TIMEOUT = 420

COMMON = ["--task", "sst2", "--method", "lora", "--dropout", "0", "--precision", "fp32", "--epochs", "1",
          "--logging-steps", "1", "--max-length", "32", "--eval-batch-size", "32", "--max-eval-samples", "32",
          "--no-progress"]


def training_calls(*names: str) -> bool:
    """Whether peftlab.training (and its TrainConfig) already use these names of peftlab.distributed / fields."""
    import peftlab.training

    source = inspect.getsource(peftlab.training)
    fields = {field.name for field in dataclasses.fields(peftlab.training.TrainConfig)}
    return all(name in source or name in fields for name in names)


def cli_has_launch_flags() -> bool:
    from peftlab.cli import build_parser

    parser, structural = build_parser()
    return "nnodes" in structural.get("train", set())


def common_for(method: str) -> list[str]:
    """COMMON with ``--method method`` (``--dropout 0`` only for the methods that have the option)."""
    from peftlab.methods import get_method_class

    args = [arg for arg in COMMON]
    args[args.index("--method") + 1] = method
    if not any(field.name == "dropout" for field in get_method_class(method).option_fields()):
        index = args.index("--dropout")
        del args[index:index + 2]
    return args


def make_models(root: Path) -> dict[str, str]:
    """Two model folders with dropout off: a tiny random BERT, and the real minilm (weights linked)."""
    import transformers

    import tiny
    from peftlab.models import resolve_model

    minilm_source = Path(resolve_model("minilm"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_source))
    tiny_dir = root / "tiny-bert"
    config = tiny.bert_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=128,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(str(tiny_dir))
    tokenizer.save_pretrained(str(tiny_dir))

    minilm_dir = root / "minilm-no-dropout"
    minilm_dir.mkdir()
    for item in minilm_source.iterdir():
        if item.name != "config.json":
            (minilm_dir / item.name).symlink_to(item)
    minilm_config = json.loads((minilm_source / "config.json").read_text())
    minilm_config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (minilm_dir / "config.json").write_text(json.dumps(minilm_config))
    return {"tiny": str(tiny_dir), "minilm": str(minilm_dir)}


def train_here(args: list[str], data_dir: Path) -> None:
    """One process, in this one, on CPU (the reference run)."""
    from peftlab.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
            patch.delenv(name, raising=False)
        assert main(["train", *args, "--data-dir", str(data_dir)]) == 0


def rank_env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", PEFTLAB_DATA_DIR=str(data_dir), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    return env


def peftlab_train(args: list[str], data_dir: Path, *, expect: int = 0, timeout: float = RUN_TIMEOUT) -> str:
    """``peftlab train ARGS`` in a subprocess; its output (stdout and stderr) for the assertions."""
    result = subprocess.run([sys.executable, "-m", "peftlab.cli", "train", *args], env=rank_env(data_dir),
                            capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == expect, output[-4000:]
    return output


def train_two_ranks(args: list[str], data_dir: Path) -> str:
    """``peftlab train ... --nproc 2``; its output (stdout and stderr) for the assertions."""
    return peftlab_train([*args, "--nproc", "2"], data_dir)


def losses(run: Path) -> dict[int, float]:
    """Training loss per step from log.jsonl (a resumed run logs some steps twice: the last wins)."""
    values = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "train" and "loss" in record:
            values[record["step"]] = record["loss"]
    return values


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    files = sorted((run / "adapter").glob("*.safetensors"))
    assert files, f"no weights in {run / 'adapter'}"
    tensors = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def assert_same_run(reference: Path, run: Path, min_steps: int = 8) -> None:
    expected, got = losses(reference), losses(run)
    assert sorted(got) == sorted(expected) and len(expected) >= min_steps
    worst = max(abs(expected[step] - got[step]) for step in expected)
    assert worst <= LOSS_TOLERANCE, f"per-step losses differ by up to {worst:.2e}"
    reference_tensors, tensors = adapter_tensors(reference), adapter_tensors(run)
    assert sorted(tensors) == sorted(reference_tensors)
    for name, value in reference_tensors.items():
        assert tensors[name].shape == value.shape and tensors[name].numel() > 0, name
        torch.testing.assert_close(tensors[name], value, rtol=0, atol=LOSS_TOLERANCE, msg=name)
