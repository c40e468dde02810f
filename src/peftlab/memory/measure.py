"""Measuring what training really takes on this machine, to check ``estimate`` against (CPU).

``measure`` trains in a fresh process and reports its peak memory above a baseline that holds everything
except the model (``warm_up``); ``saved_activation_bytes`` checks the activation terms alone against what
autograd saves; ``validate`` puts measurements and estimates side by side (docs/recommend.md's table).
``python -m peftlab.memory validate RUN...`` and ``... saved METHODS`` run them from the shell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from peftlab.kinds import TaskKind
from peftlab.memory.estimate import MiB, estimate


def measure(method: str, *, model: str = "minilm", task: str = "imdb", batch_size: int = 8, max_length: int = 128,
            max_train_samples: int = 64, precision: str = "fp32", data_dir: str | None = None,
            fixed_mmap_threshold: bool = False, timeout: float = 900) -> dict[str, Any]:
    """Train with ``peftlab.training.train`` in a fresh process and report its memory (CPU).

    The child first loads everything except the model (torch, transformers, peft, the Trainer, the
    tokenizer and the task data) and runs one training step of a tiny random model of the same
    architecture and method, so that the kernel code pages a step touches are resident too; its peak
    RSS then is the *baseline*. It then trains the real model; ``peak_memory_mb`` from ``metrics.json``
    minus the baseline is what the model, method, batch and sequence cost, the quantity ``estimate()``
    predicts. ``fixed_mmap_threshold`` sets glibc's ``MALLOC_MMAP_THRESHOLD_`` to 64 KiB so that freed
    tensors go back to the system at once (no heap fragmentation): the measured peak is then the peak of
    live tensors, as a GPU allocator reports it.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    request = dict(method=method, model=model, task=task, batch_size=batch_size, max_length=max_length,
                   max_train_samples=max_train_samples, precision=precision, data_dir=data_dir)
    completed = subprocess.run([sys.executable, "-m", "peftlab.memory", "_child", json.dumps(request)],
                               capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{\"measured\"")]
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"measuring {method} on {model} failed (exit {completed.returncode}): " + " | ".join(tail))
    result = json.loads(lines[-1])["measured"]
    result["fixed_mmap_threshold"] = fixed_mmap_threshold
    return result


def _tiny_config(config):
    """The same architecture at a negligible size (for paging in the kernels a training step uses)."""
    values = config.to_dict()
    for key in ("head_dim",):
        values.pop(key, None)
    sizes = dict(hidden_size=64, d_model=64, n_embd=64, intermediate_size=128, d_ff=128, n_inner=None,
                 num_hidden_layers=1, num_layers=1, n_layer=1, num_decoder_layers=1, d_kv=16,
                 num_attention_heads=4, num_heads=4, n_head=4)
    for key, value in sizes.items():
        if key in values:
            values[key] = value
    if "num_key_value_heads" in values:
        kv = values.get("num_key_value_heads") or 4
        values["num_key_value_heads"] = 2 if kv < (config.num_attention_heads or kv) else 4
    return type(config).from_dict(values)


def warm_up(method: str, model: str, task: str, *, max_length: int, max_train_samples: int, precision: str,
            data_dir: str | None = None) -> list[int]:
    """Everything a training run loads except the model, so that what comes after is the model's cost.

    Imports what ``train()`` imports (transformers' Trainer, peft, datasets, matplotlib), loads the
    tokenizer and the task data, and trains one step of a tiny random model of the same architecture
    with the same method and precision (which pages in the kernels and allocates the libraries' lazy
    state). Returns the tokenized training lengths.
    """
    import torch
    import transformers
    from transformers import Trainer  # noqa: F401  (the runtime the baseline must include)

    from peftlab import hardware, training
    from peftlab.methods import get_method
    from peftlab.models import load_tokenizer, resolve_model
    from peftlab.plots import plot_training  # noqa: F401  (train() imports matplotlib at the end)
    from peftlab.preprocess import tokenize
    from peftlab.tasks import get_task
    from peftlab.tasks.base import select

    task_object = get_task(task)
    raw = select(task_object.load("train", data_dir), max_train_samples, 42)
    tokenizer = load_tokenizer(model)
    labels = task_object.labels_from(raw)
    data = tokenize(raw, task_object.kind, tokenizer, max_length=max_length, label_names=labels,
                    is_regression=task_object.is_regression)
    method_object = get_method(method)
    if not method_object.model_load_kwargs():  # a 4-bit base cannot be built from a config
        tiny = _tiny_config(transformers.AutoConfig.from_pretrained(resolve_model(model)))
        kind = TaskKind(task_object.kind)
        if kind.is_classification:
            tiny.num_labels = len(labels or [0, 1])
        tiny_model = method_object.apply(getattr(transformers, kind.auto_class).from_config(tiny), kind)
        tiny_model.train()
        ids = torch.tensor([data[0]["input_ids"][:16]] * 2)
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        batch["labels"] = torch.zeros(2, dtype=torch.long) if kind is TaskKind.SEQ_CLS else ids.clone()
        optimizer = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad])
        with hardware.autocast(hardware.resolve_precision(precision)):
            loss = tiny_model(**batch).loss
        loss.backward()
        optimizer.step()
        del tiny_model, optimizer, loss, batch
    return list(data["length"])


def _child(request: dict[str, Any]) -> None:
    import resource
    import tempfile

    import torch

    from peftlab import training
    from peftlab.tasks import get_task

    torch.set_num_threads(1)
    lengths = warm_up(request["method"], request["model"], request["task"], max_length=request["max_length"],
                      max_train_samples=request["max_train_samples"], precision=request["precision"],
                      data_dir=request["data_dir"])
    task = get_task(request["task"])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as folder:
        metrics = training.train(
            method=request["method"], model=request["model"], task=request["task"], output=f"{folder}/run",
            data_dir=request["data_dir"], max_train_samples=request["max_train_samples"], max_eval_samples=8,
            epochs=1, batch_size=request["batch_size"], eval_batch_size=request["batch_size"],
            max_length=request["max_length"], precision=request["precision"], progress=False,
            eval_each_epoch=False, seed=42)
    print(json.dumps({"measured": {
        "method": request["method"], "model": request["model"], "task": request["task"], "kind": task.kind,
        "precision": metrics["precision"], "batch_size": request["batch_size"], "max_length": request["max_length"],
        "max_tokens_in_batch": max(lengths), "baseline_mb": round(baseline, 1),
        "peak_memory_mb": round(metrics["peak_memory_mb"], 1),
        "model_mb": round(metrics["peak_memory_mb"] - baseline, 1),
        "trainable_params": metrics["trainable_params"], "train_seconds": round(metrics["train_seconds"], 1),
    }}), flush=True)


def saved_activation_bytes(model: str, method: str, kind: str, *, batch_size: int = 8, seq_length: int = 128,
                           precision: str = "fp32", num_labels: int = 2) -> dict[str, float]:
    """The activation terms alone, checked exactly: what autograd saves in one forward pass, on CPU.

    Loads the real model, applies ``method``, runs one forward pass in training mode on random tokens
    under ``torch.autograd.graph.saved_tensors_hooks`` and adds up the distinct storages saved for the
    backward pass that are not parameters. The estimate's counterpart is activations + autocast weight
    copies + the saved fp32 log-softmax (4 of the 12-14 bytes per logit).
    """
    import torch

    from peftlab import hardware
    from peftlab.methods import get_method
    from peftlab.models import load_model

    labels = [str(i) for i in range(num_labels)]
    trained = get_method(method).apply(load_model(model, kind, label_names=labels), kind)
    trained.train()
    vocab = trained.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab - 1, (batch_size, seq_length))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    kind = TaskKind.parse(kind)
    if kind is TaskKind.SEQ_CLS:
        batch["labels"] = torch.zeros(batch_size, dtype=torch.long)
    else:
        batch["labels"] = torch.zeros_like(ids) if kind is TaskKind.TOKEN_CLS else ids.clone()
    parameters = {p.untyped_storage().data_ptr() for p in trained.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), hardware.autocast(precision):
        trained(**batch)
    predicted = estimate(model, method, kind, batch_size=batch_size, seq_length=seq_length, device="cpu",
                         precision=precision, num_labels=num_labels).components
    per_logit = 12 + (2 if precision == "bf16" else 0)
    expected = (predicted["activations"] + predicted["autocast_weight_copies"]
                + predicted["logits_and_loss"] * 4 / per_logit)
    return {"saved_mb": sum(saved.values()) / MiB, "estimated_mb": expected / MiB}


def validate(runs: list[dict[str, Any]], *, fixed_mmap_threshold: bool = False) -> list[dict[str, Any]]:
    """Measure each run and put the estimate beside it: the rows of docs/recommend.md's validation table."""
    from peftlab.tasks import get_task

    rows = []
    for run in runs:
        measured = measure(**run, fixed_mmap_threshold=fixed_mmap_threshold)
        kind = get_task(run.get("task", "imdb")).kind
        predicted = estimate(run.get("model", "minilm"), run["method"], kind, batch_size=run.get("batch_size", 8),
                             seq_length=measured["max_tokens_in_batch"], device="cpu",
                             precision=measured["precision"])
        error = (predicted.peak_mb - measured["model_mb"]) / measured["model_mb"]
        total = predicted.peak_mb + measured["baseline_mb"]
        rows.append({**measured, "estimated_mb": round(predicted.peak_mb, 1),
                     "error": round(error, 3), "estimated_total_mb": round(total, 1),
                     "total_error": round((total - measured["peak_memory_mb"]) / measured["peak_memory_mb"], 3),
                     "components_mb": predicted.to_dict()["components_mb"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m peftlab.memory validate RUN... [options]``: measure runs and print them beside the estimate."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        _child(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m peftlab.memory")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("validate", help="train each run in a fresh process; print measured and estimated MB")
    sub.add_argument("runs", nargs="+", metavar="METHOD[:MODEL[:TASK]]", help="e.g. lora, full:smollm2:alpaca "
                     "(model defaults to minilm, task to imdb)")
    sub.add_argument("--precision", default="fp32", help="fp32 or bf16 (auto: what peftlab picks here)")
    sub.add_argument("--batch-size", type=int, default=8)
    sub.add_argument("--max-length", type=int, default=128)
    sub.add_argument("--max-train-samples", type=int, default=64)
    sub.add_argument("--data-dir", default=None)
    sub.add_argument("--fixed-mmap-threshold", action="store_true",
                     help="MALLOC_MMAP_THRESHOLD_=65536: freed memory leaves the resident set at once")
    sub = commands.add_parser("saved", help="autograd's saved tensors in one forward pass vs the activation terms")
    sub.add_argument("methods", help="comma-separated methods")
    sub.add_argument("--model", default="minilm")
    sub.add_argument("--kind", default=TaskKind.SEQ_CLS.value)
    sub.add_argument("--precision", default="fp32")
    sub.add_argument("--batch-size", type=int, default=8)
    sub.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args(argv)
    if args.command == "saved":
        import torch

        torch.set_num_threads(1)
        for method in args.methods.split(","):
            result = saved_activation_bytes(args.model, method, args.kind, batch_size=args.batch_size,
                                            seq_length=args.max_length, precision=args.precision)
            error = (result["estimated_mb"] - result["saved_mb"]) / result["saved_mb"]
            print(json.dumps({"method": method, **{k: round(v, 1) for k, v in result.items()},
                              "error": round(error, 3)}), flush=True)
        return 0
    runs = []
    for item in args.runs:
        method, model, task = (item.split(":") + ["minilm", "imdb"][len(item.split(":")) - 1:])[:3]
        runs.append(dict(method=method, model=model, task=task, precision=args.precision, batch_size=args.batch_size,
                         max_length=args.max_length, max_train_samples=args.max_train_samples,
                         data_dir=args.data_dir))
    validate(runs, fixed_mmap_threshold=args.fixed_mmap_threshold)
    return 0

