"""Training throughput: peftlab's defaults against the usual Hugging Face recipe, on the same
model, data, method, number of examples and seed, in one run.

    # the main table (docs/performance.md): five methods on minilm + SST-2
    python benchmarks/train_throughput.py --methods lora,bitfit,ia3,prompt-tuning,full \\
        --max-train-samples 2000 --epochs 1 --json bench-minilm.json
    # LoRA on the decoder
    python benchmarks/train_throughput.py --model smollm2 --task alpaca --methods lora \\
        --max-train-samples 128 --max-eval-samples 64 --epochs 1 --json bench-smollm2.json
    # memory: fp32 / bf16 x gradient checkpointing off / on (peftlab path only)
    python benchmarks/train_throughput.py --model smollm2 --task alpaca --methods lora \\
        --max-train-samples 64 --max-eval-samples 32 --memory --no-baseline --json mem.json
    # one lever at a time, against the baseline measured in the same run
    python benchmarks/train_throughput.py --methods lora --variant fp32:precision=fp32 \\
        --variant fused:optim=adamw_torch_fused --variant 1thread:threads=1
    # CI smoke test (tests/test_benchmark_quick.py): 32 examples, LoRA, both paths
    python benchmarks/train_throughput.py --quick --json /tmp/quick.json

The data folder comes from ``--data-dir`` or ``$PEFTLAB_DATA_DIR``.

What is compared
----------------
* baseline: what the labs teach. ``transformers.Trainer`` on the model returned by the method's
  ``apply`` (``peft.get_peft_model`` for peft methods), every example padded to ``max_length=128``
  (``padding="max_length"``, ``default_data_collator``), fp32, batch 32, the Trainer's default AdamW,
  random sampling. Learning rate, linear schedule with the method's warm-up (6%; 10% for BitFit and
  P-Tuning), weight decay 0, epochs, examples and seed are peftlab's, so that only the speed levers differ.
* peftlab: ``peftlab.training.train`` with its defaults (``progress=False``, a temporary output).
  A variant's levers reach it as arguments, nothing in peftlab is patched: ``optim``, ``pad_multiple`` and
  ``compile`` as ``peftlab.training.TrainingParts`` (optimizer, collator, TrainingArguments), ``frozen_bf16``
  and ``dropout`` as changes to the prepared model that ``train`` is given (``TrainingParts.prepared``).

Both paths get identical examples: the same ``peftlab.training.prepare`` (task, seeded subset, model,
method), and each runs in its own subprocess so that its peak RSS is its own. Dev scores use the same
scorer (``peftlab.evaluation.evaluate_model``); evaluation time is not training time on either side.

FLOP accounting (also in docs/performance.md)
---------------------------------------------
Matmul FLOPs only (elementwise work, softmax and norms are not counted). For one sequence of ``s``
tokens (``s_eff = s + v`` positions where a prompt method adds ``v`` virtual tokens), a model with ``L``
layers and attention width ``d = heads * head_dim``:

* forward: ``sum over linear layers of 2 * in * out * rows`` (``rows`` = ``s_eff`` for per-token
  layers, 1 for the pooler / classifier) -- i.e. ``2 * N_matmul * s_eff`` -- plus attention
  ``2 * 2 * L * s_eff**2 * d`` (Q.K^T and P.V);
* backward to activations: the same as the forward for every linear layer at or above the lowest layer
  holding a trainable parameter (all layers when the embeddings side trains: BitFit's embedding
  LayerNorm bias, prompt tuning's virtual tokens), and twice the forward attention term there (both
  operands of Q.K^T and P.V are activations);
* weight gradients: ``2 * in * out * rows`` only for linear layers whose weight trains (LoRA A/B, the
  classifier, everything for full fine-tuning); bias / (IA)3-vector gradients are reductions, not matmuls.

``rows`` per linear layer is measured with forward hooks on two probe lengths (so LoRA's A/B, peft's
virtual tokens and the per-sequence pooler are all counted as they run). ``--check-flops`` compares the
formula with ``torch.utils.flop_counter`` on a real batch.

"Useful" FLOPs count real tokens only, for both paths; ``flop_utilization`` = useful FLOPs per second
over the matmul peak measured at the start of the run at the precision the path trains in (fp32 for the
baseline, peftlab's resolved precision). The baseline also reports ``padded_flop_utilization``, which
counts its padded positions as work done.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_MAX_LENGTH = 128
BASELINE_BATCH = 32

# --memory: the peftlab path at each precision, with and without gradient checkpointing
MEMORY_VARIANTS = {
    "fp32": {"precision": "fp32"},
    "fp32+gc": {"precision": "fp32", "gradient_checkpointing": True},
    "bf16": {"precision": "bf16"},
    "bf16+gc": {"precision": "bf16", "gradient_checkpointing": True},
}
# Keys a variant may set besides TrainConfig fields
LEVER_KEYS = {"optim", "threads", "compile", "interop_threads", "frozen_bf16", "dropout", "pad_multiple"}


# ---- small helpers ------------------------------------------------------------------------------

def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:key=value,key=value' -> (name, {key: value})."""
    name, _, body = text.partition(":")
    options = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: expected key=value, got {item!r}")
        options[key.strip().replace("-", "_")] = parse_value(value.strip())
    return name.strip(), options


# ---- the matmul peak ----------------------------------------------------------------------------

def matmul_peak_gflops(dtype_name: str, size: int = 2048, trials: int = 7, min_seconds: float = 0.2
                       ) -> tuple[float, float]:
    """Best-of-``trials`` dense ``size`` x ``size`` GEMM rate in this process's thread setting, GFLOP/s:
    (per wall-clock second, per CPU second of this process)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    flops = 2.0 * size ** 3
    torch.mm(a, b, out=out)
    torch.mm(a, b, out=out)
    # repeat count so that one trial takes at least min_seconds
    started = time.perf_counter()
    torch.mm(a, b, out=out)
    one = max(time.perf_counter() - started, 1e-6)
    repeats = max(1, math.ceil(min_seconds / one))
    best = best_cpu = float("inf")
    for _ in range(trials):
        started, started_cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - started) / repeats)
        best_cpu = min(best_cpu, max(time.process_time() - started_cpu, 1e-9) / repeats)
    return flops / best / 1e9, flops / best_cpu / 1e9


# ---- FLOP model ---------------------------------------------------------------------------------

_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")
_BELOW_LAYERS = ("embed", "prompt_encoder", "word_embeddings", "wte", "wpe", "shared")


def _position(name: str, n_layers: int) -> float:
    """Where a parameter/module sits: its layer index, -1 below the layers (embeddings), n_layers above (heads)."""
    match = _LAYER_INDEX.search(name)
    if match:
        return float(match.group(1))
    if any(part in name for part in _BELOW_LAYERS):
        return -1.0
    return float(n_layers)


class FlopModel:
    """Matmul FLOPs per training example as a function of its real length (see the module docstring)."""

    def __init__(self, linears, n_layers, attn_dim, virtual, lowest):
        # (name, in, out, a, b, position, weight_trains, input_gets_gradient): rows(s) = a*s + b
        self.linears = linears
        self.n_layers = n_layers
        self.attn_dim = attn_dim
        self.virtual = virtual
        self.lowest = lowest  # position of the lowest trainable parameter

    @classmethod
    def probe(cls, model, example: dict, kind: str) -> "FlopModel":
        import torch
        from torch import nn

        config = getattr(model, "config", None)
        n_layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 0)
        heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 0)
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
        head_dim = int(getattr(config, "head_dim", 0) or (hidden // heads if heads else 0))
        attn_dim = heads * head_dim

        lowest = float(n_layers)
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                lowest = min(lowest, _position(name, n_layers))

        records: dict[str, list] = {}

        def hook_for(name, module):
            def hook(_module, inputs, _output):
                x = inputs[0]
                rows = x.numel() // module.in_features
                # autograd computes this layer's input gradient only if its input carries one
                records.setdefault(name, []).append((rows, bool(x.requires_grad)))
            return hook

        handles = [module.register_forward_hook(hook_for(name, module))
                   for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        ids = list(example["input_ids"])
        lengths = (8, 16)
        was_training = model.training
        model.eval()
        try:
            low_precision = any(p.dtype == torch.bfloat16 for p in model.parameters())
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision)
            with torch.enable_grad(), autocast:  # input requires_grad shows where backward goes; none runs
                for s in lengths:
                    seq = (ids * (s // max(1, len(ids)) + 1))[:s]
                    batch = {"input_ids": torch.tensor([seq]), "attention_mask": torch.ones(1, s, dtype=torch.long)}
                    if "token_type_ids" in example:
                        batch["token_type_ids"] = torch.zeros(1, s, dtype=torch.long)
                    model(**batch)
        finally:
            for handle in handles:
                handle.remove()
            if was_training:
                model.train()
        modules = dict(model.named_modules())
        linears = []
        virtual = 0
        for name, rows in records.items():
            if len(rows) != 2:
                continue
            (rows_1, input_grad), (rows_2, _) = rows
            a = (rows_2 - rows_1) / (lengths[1] - lengths[0])
            b = rows_1 - a * lengths[0]
            module = modules[name]
            position = _position(name, n_layers)
            linears.append((name, module.in_features, module.out_features, a, b, position,
                            bool(module.weight.requires_grad), input_grad))
            if a == 1 and 0 <= position < n_layers:
                virtual = max(virtual, int(round(b)))
        return cls(linears, n_layers, attn_dim, virtual, lowest)

    def per_example(self, s):
        """(forward, backward to activations, weight gradients) FLOPs for length(s) ``s`` (scalar or numpy array)."""
        import numpy as np

        s = np.asarray(s, dtype=np.float64)
        fwd = np.zeros_like(s)
        act = np.zeros_like(s)
        wgt = np.zeros_like(s)
        for _name, fan_in, fan_out, a, b, _position, trains, input_grad in self.linears:
            flops = 2.0 * fan_in * fan_out * (a * s + b)
            fwd = fwd + flops
            if input_grad:  # every linear above the lowest trainable parameter
                act = act + flops
            if trains:
                wgt = wgt + flops
        s_eff = s + self.virtual
        attention_fwd = 2.0 * 2.0 * s_eff ** 2 * self.attn_dim  # per layer
        fwd = fwd + attention_fwd * self.n_layers
        layers_with_backward = max(0.0, self.n_layers - max(self.lowest, 0.0))
        act = act + 2.0 * attention_fwd * layers_with_backward
        return fwd, act, wgt

    def total(self, lengths) -> float:
        fwd, act, wgt = self.per_example(lengths)
        return float((fwd + act + wgt).sum())

    def describe(self) -> dict:
        import numpy as np

        matmul_params = sum(item[1] * item[2] for item in self.linears if item[3] > 0)
        per_sequence = sum(item[1] * item[2] for item in self.linears if item[3] == 0)
        trainable = sum(item[1] * item[2] for item in self.linears if item[6])
        fwd, act, wgt = self.per_example(np.asarray([16.0]))
        return {"per_token_matmul_params": int(matmul_params), "per_sequence_matmul_params": int(per_sequence),
                "trainable_matmul_params": int(trainable), "layers": self.n_layers, "attention_dim": self.attn_dim,
                "virtual_tokens": self.virtual, "lowest_trainable_position": self.lowest,
                "flops_at_16_tokens": {"forward": float(fwd[0]), "backward_activations": float(act[0]),
                                       "weight_gradients": float(wgt[0])}}


def check_flops(model, batch, flop_model: FlopModel, real_length: int) -> dict:
    """torch.utils.flop_counter on one forward+backward of ``batch`` against the formula at its padded length."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    counter = FlopCounterMode(display=False)
    low_precision = any(p.dtype == torch.bfloat16 for p in model.parameters())
    with counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision):
        out = model(**batch)
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    n, s = batch["input_ids"].shape
    formula = flop_model.total([float(s)] * n)
    counted = float(counter.get_total_flops())
    return {"batch": int(n), "length": int(s), "flop_counter": counted, "formula": formula,
            "formula_over_counter": formula / counted if counted else None}


# ---- the two paths (each runs in its own subprocess) -----------------------------------------

def _train_config(spec: dict, **extra):
    from peftlab.training import TrainConfig

    fields = dict(method=spec["method"], task=spec["task"], model=spec["model"], epochs=spec["epochs"],
                  max_train_samples=spec["max_train_samples"], max_eval_samples=spec["max_eval_samples"],
                  seed=spec["seed"], data_dir=spec["data_dir"], progress=False, max_length=BASELINE_MAX_LENGTH)
    fields.update(extra)
    return TrainConfig(**fields)


def _apply_thread_levers(levers: dict) -> None:
    """Thread settings of this process (both paths take them)."""
    import torch

    if "threads" in levers:
        torch.set_num_threads(int(levers["threads"]))
    if "interop_threads" in levers:
        torch.set_num_interop_threads(int(levers["interop_threads"]))


def _lever_parts(levers: dict, prepared):
    """The peftlab path's levers as ``peftlab.training.TrainingParts`` (see docs/performance.md): the model
    changes are made on ``prepared`` before training, the rest replace one part of the run each."""
    from peftlab.preprocess import collator
    from peftlab.training import TrainingParts

    if levers.get("frozen_bf16"):
        cast_frozen_linears(prepared.model)
    if "dropout" in levers:
        set_dropout(prepared.model, float(levers["dropout"]))
    parts = TrainingParts(prepared=prepared)
    if "optim" in levers:
        parts.optimizer = str(levers["optim"])  # a TrainingArguments.optim name
    if levers.get("pad_multiple"):
        parts.collator = collator(prepared.task.kind, prepared.tokenizer, pad_to_multiple_of=int(levers["pad_multiple"]))
    if levers.get("compile"):
        parts.training_arguments["torch_compile"] = True
    return parts


def cast_frozen_linears(model) -> int:
    """Store frozen linear weights in bf16 (lever): bf16 autocast casts them on every forward anyway, so the
    matmuls see the same numbers, without a copy per layer per step. Returns how many weights were cast."""
    import torch
    from torch import nn

    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(torch.bfloat16)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(torch.bfloat16)
            count += 1
    return count


def set_dropout(model, p: float) -> None:
    """Diagnostic lever: every nn.Dropout (hidden, attention probabilities, LoRA's) to ``p``."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def _metric(scores: dict, metric_name: str):
    value = scores.get(metric_name)
    return None if value is None else float(value)


def _probe_and_count(prepared, kind: str, lengths, padded_length: int | None):
    import numpy as np

    flop_model = FlopModel.probe(prepared.model, prepared.train_data[0], kind)
    lengths = np.asarray(lengths, dtype=np.float64)
    useful = flop_model.total(lengths)
    hardware = flop_model.total(np.full_like(lengths, float(padded_length))) if padded_length else useful
    return flop_model, useful, hardware


def _cross_eval(prepared, precision: str) -> dict:
    """The trained model's dev metric when evaluated at the other precision (does bf16 evaluation move it?)."""
    from peftlab.evaluation import evaluate_model

    scores = evaluate_model(prepared.model, prepared.task, prepared.tokenizer, prepared.dev_data, prepared.dev_raw,
                            label_names=prepared.label_names, batch_size=64, precision=precision)
    return {precision: _metric(scores, prepared.task.metric_name)}


def _pad_to_max_length(dataset, tokenizer, max_length: int):
    """What ``tokenizer(..., padding="max_length", max_length=128)`` gives: every row padded to ``max_length``."""
    from peftlab.preprocess import IGNORE_INDEX

    pad_values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0,
                  "labels": IGNORE_INDEX}

    def pad(row):
        out = {}
        for key, value in row.items():
            if key == "length":
                continue
            if isinstance(value, list) and key in pad_values:
                out[key] = list(value) + [pad_values[key]] * (max_length - len(value))
            else:
                out[key] = value
        return out

    padded = dataset.map(pad, remove_columns=["length"], desc="Padding to max_length", load_from_cache_file=False)
    padded.set_format("torch")
    return padded


def run_baseline(spec: dict) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    from peftlab.evaluation import evaluate_model
    from peftlab.methods.base import count_parameters
    from peftlab.training import prepare

    _apply_thread_levers(spec.get("levers", {}))
    config = _train_config(spec, precision="fp32")
    prepared = prepare(config)
    task, method = prepared.task, prepared.method
    train_data = _pad_to_max_length(prepared.train_data, prepared.tokenizer, BASELINE_MAX_LENGTH)
    lengths = list(prepared.train_data["length"])
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=BASELINE_BATCH,
            num_train_epochs=spec["epochs"],
            learning_rate=method.learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=method.warmup_ratio,  # the method's own, as peftlab's path uses
            weight_decay=0.0,
            seed=spec["seed"],
            data_seed=spec["seed"],
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(model=prepared.model, args=args, train_dataset=train_data,
                          data_collator=default_data_collator)
        started, started_cpu = time.perf_counter(), time.process_time()
        trainer.train()
        train_seconds = time.perf_counter() - started
        train_cpu_seconds = time.process_time() - started_cpu
        optimizer = args.optim.value if hasattr(args.optim, "value") else str(args.optim)
    started = time.perf_counter()
    scores = evaluate_model(prepared.model, task, prepared.tokenizer, prepared.dev_data, prepared.dev_raw,
                            label_names=prepared.label_names, batch_size=64, precision="fp32")
    eval_seconds = time.perf_counter() - started
    flop_model, useful, hardware = _probe_and_count(prepared, task.kind, lengths, BASELINE_MAX_LENGTH)
    from peftlab import hardware as _hardware

    cross = _cross_eval(prepared, "bf16") if _hardware.bf16_supported() and not spec.get("quick") else {}
    epochs = spec["epochs"]
    examples = len(lengths) * epochs
    trainable, total = count_parameters(prepared.model)
    result = {
        "path": "baseline",
        "precision": "fp32",
        "optimizer": optimizer,
        "padding": f"max_length={BASELINE_MAX_LENGTH}",
        "batch_size": BASELINE_BATCH,
        "threads": torch.get_num_threads(),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "eval_seconds": eval_seconds,
        "examples": examples,
        "real_tokens": sum(lengths) * epochs,
        "processed_tokens": len(lengths) * BASELINE_MAX_LENGTH * epochs,
        "useful_flops": useful * epochs,
        "hardware_flops": hardware * epochs,
        "metric_name": task.metric_name,
        "metric": _metric(scores, task.metric_name),
        "metrics": scores,
        "metric_if_evaluated_in": cross,
        "trainable_params": trainable,
        "total_params": total,
        "flop_model": flop_model.describe(),
    }
    if spec.get("check_flops"):
        from peftlab.preprocess import collator

        batch = collator(task.kind, prepared.tokenizer)([prepared.train_data[i] for i in range(min(8, len(lengths)))])
        result["flop_check"] = check_flops(prepared.model, dict(batch), flop_model, 0)
    return result


def run_peftlab(spec: dict) -> dict:
    import torch

    from peftlab import training

    levers = {k: v for k, v in spec.get("levers", {}).items() if k in LEVER_KEYS}
    config_overrides = {k: v for k, v in spec.get("levers", {}).items() if k not in LEVER_KEYS}
    _apply_thread_levers(levers)
    profiler = None
    with tempfile.TemporaryDirectory() as tmp:
        config = _train_config(spec, output=str(Path(tmp) / "run"), **config_overrides)
        if spec.get("profile"):
            from torch.profiler import ProfilerActivity, profile

            profiler = profile(activities=[ProfilerActivity.CPU])
        with profiler if profiler is not None else contextlib.nullcontext():
            import io
            from contextlib import redirect_stdout

            with redirect_stdout(io.StringIO()):  # train() prints a banner and a summary line
                prepared = training.prepare(config)  # kept: its trained model is probed for FLOPs below
                metrics = training.train(config, parts=_lever_parts(levers, prepared))
    lengths = list(prepared.train_data["length"])
    flop_model, useful, _ = _probe_and_count(prepared, prepared.task.kind, lengths, None)
    cross = ({} if spec.get("quick") or levers.get("frozen_bf16") or metrics["precision"] == "fp32"
             else _cross_eval(prepared, "fp32"))
    epochs = spec["epochs"]
    result = {
        "path": "peftlab",
        "precision": metrics["precision"],
        "optimizer": str(levers.get("optim", prepared.method.optimizer)),
        "padding": "per batch, grouped by length" if config.group_by_length else "per batch",
        "batch_size": config.batch_size,
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": config.gradient_checkpointing,
        "levers": spec.get("levers", {}),
        "train_seconds": metrics["train_seconds"],
        "train_cpu_seconds": metrics["train_cpu_seconds"],
        "eval_seconds": metrics["eval_seconds"],
        "examples": len(lengths) * epochs,
        "real_tokens": sum(lengths) * epochs,
        "processed_tokens": sum(lengths) * epochs,
        "useful_flops": useful * epochs,
        "hardware_flops": useful * epochs,
        "metric_name": metrics["metric_name"],
        "metric": float(metrics["metric"]),
        "metrics": metrics["metrics"],
        "metric_if_evaluated_in": cross,
        "trainable_params": metrics["trainable_params"],
        "total_params": metrics["total_params"],
        "flop_model": flop_model.describe(),
    }
    if profiler is not None:
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=int(spec["profile"]))
        result["profile"] = table
    if spec.get("check_flops"):
        from peftlab.preprocess import collator

        batch = collator(prepared.task.kind, prepared.tokenizer)(
            [prepared.train_data[i] for i in range(min(8, len(lengths)))])
        result["flop_check"] = check_flops(prepared.model, dict(batch), flop_model, 0)
    return result


def worker(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    load_before = load_average()
    result = (run_baseline if spec["path"] == "baseline" else run_peftlab)(spec)
    result["peak_memory_mb"] = peak_rss_mb()  # this subprocess only: model, data, training and evaluation
    result["load_average"] = {"before": load_before, "after": load_average()}
    Path(result_path).write_text(json.dumps(result, indent=2))


# ---- the parent: runs the workers and reports -----------------------------------------------------

def launch(spec: dict, workdir: Path, label: str, verbose: bool, in_process: bool = False) -> dict:
    """Run one path in its own subprocess (so that its peak RSS is its own), or, for --quick, in this process:
    the smoke test then skips two interpreter start-ups, and its peak memory is the whole run's, not the path's."""
    if in_process:
        started = time.perf_counter()
        load_before = load_average()
        result = (run_baseline if spec["path"] == "baseline" else run_peftlab)(spec)
        result["peak_memory_mb"] = peak_rss_mb()  # this process so far (both paths, for --quick)
        result["load_average"] = {"before": load_before, "after": load_average()}
        result = json.loads(json.dumps(result))  # what a worker's result file would hold
        result["process_seconds"] = time.perf_counter() - started
        return result
    spec_path = workdir / f"{label}.spec.json"
    result_path = workdir / f"{label}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), "--result", str(result_path)]
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=not verbose, text=True, env=env, cwd=str(ROOT))
    if process.returncode != 0 or not result_path.is_file():
        tail = (process.stderr or "")[-4000:] if not verbose else ""
        raise SystemExit(f"{label} failed (exit {process.returncode}):\n{tail}")
    result = json.loads(result_path.read_text())
    result["process_seconds"] = time.perf_counter() - started
    return result


def finish(result: dict, peaks: dict) -> dict:
    """Rates and utilization from the raw counts."""
    seconds = max(result["train_seconds"], 1e-9)
    peak = peaks.get(result["precision"]) or peaks["fp32"]
    if result.get("train_cpu_seconds"):
        cpu_seconds = max(result["train_cpu_seconds"], 1e-9)
        result["tokens_per_cpu_second"] = result["real_tokens"] / cpu_seconds
        cpu_peak = peaks.get("cpu-second", {}).get(result["precision"])
        if cpu_peak:  # useful FLOPs per CPU second over one core's GEMM rate per CPU second
            result["cpu_flop_utilization"] = result["useful_flops"] / cpu_seconds / (cpu_peak * 1e9)
    result["examples_per_second"] = result["examples"] / seconds
    result["tokens_per_second"] = result["real_tokens"] / seconds
    result["processed_tokens_per_second"] = result["processed_tokens"] / seconds
    result["useful_gflops_per_second"] = result["useful_flops"] / seconds / 1e9
    result["peak_gflops"] = peak
    result["flop_utilization"] = result["useful_flops"] / seconds / (peak * 1e9)
    result["padded_flop_utilization"] = result["hardware_flops"] / seconds / (peak * 1e9)
    result["accuracy"] = result["metric"] if result["metric_name"] == "accuracy" else None
    return result


def summary_line(name: str, result: dict) -> str:
    metric = result["metric"]
    return (f"  {name:<16} {result['examples_per_second']:8.1f} ex/s {result['tokens_per_second']:9.0f} tok/s "
            f"{result['train_seconds']:7.1f} s ({result.get('train_cpu_seconds', 0):6.1f} cpu-s) "
            f"{result['peak_memory_mb']:7.0f} MB  "
            f"{result['metric_name']} {metric:.4f}  {result['precision']}  "
            f"util {100 * result['flop_utilization']:5.1f}% of {result['peak_gflops']:.0f} GFLOP/s"
            + (f" (per cpu-s {100 * result['cpu_flop_utilization']:.0f}%)" if "cpu_flop_utilization" in result else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=None, help="comma-separated peftlab methods (default lora)")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--max-train-samples", type=int, default=None, help="default 2000 (--quick: 32)")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="default: the whole dev set (--quick: 32)")
    parser.add_argument("--epochs", type=float, default=None, help="default 1")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-dir", default=None, help="default $PEFTLAB_DATA_DIR")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="smoke test: 32 examples, LoRA, 1 epoch, small GEMM")
    parser.add_argument("--no-baseline", action="store_true", help="peftlab path (and variants) only")
    parser.add_argument("--no-peftlab", action="store_true", help="baseline only")
    parser.add_argument("--variant", action="append", default=[],
                        help="extra peftlab run NAME:key=value,...; keys: TrainConfig fields (precision, "
                             "group_by_length, eval_each_epoch, batch_size, gradient_checkpointing) or "
                             "optim, threads, interop_threads, compile")
    parser.add_argument("--baseline-variant", action="append", default=[],
                        help="extra baseline run NAME:threads=N (the baseline takes only thread settings)")
    parser.add_argument("--repeats", type=int, default=1, help="run every peftlab job N times (round-robin); "
                        "report the median run")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="how many of the repeats include the baseline")
    parser.add_argument("--memory", action="store_true", help="peftlab at fp32/bf16 x gradient checkpointing off/on")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in both paths (default: torch's)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="torch.profiler over the peftlab run; print the top ROWS ops")
    parser.add_argument("--check-flops", action="store_true", help="compare the FLOP formula with torch's counter")
    parser.add_argument("--verbose", action="store_true", help="show the workers' output")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.result)
        return 0

    quick = args.quick
    methods = [m.strip() for m in (args.methods or "lora").split(",") if m.strip()]
    data_dir = args.data_dir or os.environ.get("PEFTLAB_DATA_DIR")
    if not data_dir:
        default = ROOT.parent / "shared" / "data"
        data_dir = str(default) if default.is_dir() else None
    base_spec = {
        "model": args.model, "task": args.task, "seed": args.seed, "data_dir": data_dir,
        "epochs": args.epochs if args.epochs is not None else 1.0,
        "max_train_samples": args.max_train_samples or (32 if quick else 2000),
        "max_eval_samples": args.max_eval_samples or (32 if quick else None),
        "check_flops": args.check_flops,
    }
    variants = dict(parse_variant(v) for v in args.variant)
    baseline_variants = dict(parse_variant(v) for v in args.baseline_variant)
    if args.memory:
        variants = {**MEMORY_VARIANTS, **variants}
    common_levers = {"threads": args.threads} if args.threads else {}

    import torch

    from peftlab import hardware

    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": hardware.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "bf16_native": hardware.bf16_supported(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: v for k, v in base_spec.items() if k != "data_dir"},
        "load_average_start": load_average(),
    }
    import transformers

    meta["machine"]["transformers"] = transformers.__version__
    size = 512 if quick else 2048
    trials = 3 if quick else 7
    dtypes = ["fp32", "bf16"] if hardware.bf16_supported() else ["fp32"]
    default_threads = torch.get_num_threads()
    thread_settings = sorted({1, default_threads})

    def measure_peaks() -> dict:
        measured = {}
        for threads in thread_settings:
            torch.set_num_threads(threads)
            for dtype in dtypes:
                wall, cpu = matmul_peak_gflops(dtype, size=size, trials=trials)
                measured.setdefault(str(threads), {})[dtype] = wall
                measured.setdefault(f"{threads}/cpu-second", {})[dtype] = cpu
        torch.set_num_threads(default_threads)
        return measured

    def best(runs: list[dict], cpu: bool) -> dict:
        return {dtype: max(run[t][dtype] for run in runs for t in run if t.endswith("/cpu-second") == cpu)
                for dtype in dtypes}

    # The peak is the best GEMM rate this machine gives during the run: over 1 thread and torch's default
    # (on a loaded machine one thread can beat two) and over a measurement at the start and at the end.
    # Per CPU second (one thread): what one core does when it runs, whatever else the machine runs.
    peak_runs = [measure_peaks()]
    peaks = best(peak_runs, cpu=False)
    peaks["cpu-second"] = best(peak_runs, cpu=True)
    meta["peak_gemm_size"] = size
    print(f"matmul peak ({size}x{size} GEMM, best of {trials}, threads {thread_settings}): "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items() if k != "cpu-second")
          + f" · load average {meta['load_average_start']}", flush=True)

    output: dict = {"benchmark": meta}
    # --quick (the CI smoke test) runs both paths in this process; anything with levers keeps one process each
    in_process = quick and not variants and not baseline_variants and not common_levers and not args.profile
    meta["paths_in_own_process"] = not in_process
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-") as tmp:
        workdir = Path(tmp)
        for method in methods:
            spec = {**base_spec, "method": method, "levers": dict(common_levers)}
            print(f"{method} on {args.model} + {args.task}: {spec['max_train_samples']} examples x "
                  f"{spec['epochs']:g} epochs", flush=True)
            # (name, path, levers): the baseline and peftlab's defaults, then the variants
            jobs = []
            if not args.no_baseline:
                jobs.append(("baseline", "baseline", dict(common_levers)))
                jobs += [(f"baseline:{name}", "baseline", {**common_levers, **levers})
                         for name, levers in baseline_variants.items()]
            if not args.no_peftlab:
                jobs.append(("peftlab", "peftlab", dict(common_levers)))
            jobs += [(name, "peftlab", {**common_levers, **levers}) for name, levers in variants.items()]
            runs: dict[str, list] = {name: [] for name, _path, _levers in jobs}
            for repeat in range(args.repeats):  # round-robin, so that load changes hit every job alike
                for name, path, levers in jobs:
                    if path == "baseline" and repeat >= args.baseline_repeats:
                        continue
                    label = f"{method}-{re.sub(r'[^A-Za-z0-9_.+-]', '_', name)}-{repeat}"
                    result = finish(launch({**spec, "path": path, "levers": levers, "quick": quick,
                                            "profile": args.profile if path == "peftlab" else 0},
                                           workdir, label, args.verbose, in_process=in_process), peaks)
                    runs[name].append(result)
                    print(summary_line(name, result) + (f"  (repeat {repeat + 1})" if args.repeats > 1 else ""),
                          flush=True)
                    if args.profile and result.get("profile"):
                        print(result["profile"], flush=True)
            entry: dict = {}
            for name, results in runs.items():
                ordered = sorted(results, key=lambda r: r["train_seconds"])
                chosen = dict(ordered[len(ordered) // 2])  # the median run (the upper one of two)
                chosen["repeats_train_seconds"] = [r["train_seconds"] for r in results]
                if name in ("baseline", "peftlab"):
                    entry[name] = chosen
                elif name.startswith("baseline:"):
                    entry.setdefault("baseline_variants", {})[name.split(":", 1)[1]] = chosen
                else:
                    entry.setdefault("variants", {})[name] = chosen
            if "baseline" in entry:
                reference = entry["baseline"]["tokens_per_second"]
                for result in [entry.get("peftlab"), *entry.get("variants", {}).values()]:
                    if result is not None:
                        result["speedup"] = result["tokens_per_second"] / reference
                        result["metric_delta"] = result["metric"] - entry["baseline"]["metric"]
                for result in entry.get("baseline_variants", {}).values():
                    result["speedup"] = result["tokens_per_second"] / reference
            if "baseline" in entry and "peftlab" in entry:
                entry["speedup"] = entry["peftlab"]["speedup"]
                entry["metric_delta"] = entry["peftlab"]["metric_delta"]
            output[method] = entry
    meta["load_average_end"] = load_average()
    if not quick:
        peak_runs.append(measure_peaks())
    peaks = best(peak_runs, cpu=False)
    meta["peak_gflops"] = dict(peaks)
    peaks["cpu-second"] = best(peak_runs, cpu=True)
    meta["peak_gflops_per_cpu_second"] = peaks["cpu-second"]
    meta["peak_gflops_measurements"] = {"start": peak_runs[0], **({"end": peak_runs[1]} if len(peak_runs) > 1 else {})}
    for method in methods:  # utilization against the final peak
        entry = output[method]
        for result in [entry.get("baseline"), entry.get("peftlab"), *entry.get("variants", {}).values(),
                       *entry.get("baseline_variants", {}).values()]:
            if result is not None:
                finish(result, peaks)
    print("matmul peak over the run: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in meta["peak_gflops"].items())
          + " · per CPU second (1 thread): "
          + ", ".join(f"{k} {v:.0f}" for k, v in peaks["cpu-second"].items()), flush=True)
    print(f"summary (median of {args.repeats} runs where repeated; utilization against the peak over the run):")
    for method in methods:
        entry = output[method]
        print(f"{method}:")
        for name, result in [("baseline", entry.get("baseline")),
                             *[(f"baseline:{k}", v) for k, v in entry.get("baseline_variants", {}).items()],
                             ("peftlab", entry.get("peftlab")), *entry.get("variants", {}).items()]:
            if result is not None:
                extra = f"  speedup {result['speedup']:.2f}x" if "speedup" in result else ""
                print(summary_line(name, result) + extra, flush=True)
    print(f"load average at the end {meta['load_average_end']}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(output, indent=2, default=str))
        print(f"wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
