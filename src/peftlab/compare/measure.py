"""What compare measures on a trained run besides training itself: divergence, size on disk, inference latency
(unmerged and merged) and, for language models, sample generations.

Every model is reloaded from the run folder, as a user would deploy it. The timing itself is
:mod:`peftlab.latency`'s (median after warm-up, early stop on a time budget, CUDA synchronised, no gradients).
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path
from typing import Any

from peftlab.kinds import TaskKind

LATENCY_ROWS = 32  # dev inputs used for timing: one batch of 32, and single rows cycled for batch 1
SINGLE_ROWS = 16  # distinct single-row batches cycled for the batch-1 timing
# Timing: median of up to N runs after warm-up; a setting stops early (after 3 runs) once its budget
# is spent, so a slow model (a 4-bit base dequantised on the fly on a CPU) cannot stall a comparison.
LATENCY_SETTINGS: dict[str, Any] = {"bs1_warmup": 3, "bs1_runs": 20, "bs32_warmup": 1, "bs32_runs": 5,
                                    "budget_s": 5.0}
SAMPLE_PROMPTS = 3  # generations shown for language-model tasks
SAMPLE_NEW_TOKENS = 32
GENERATIONS_FILE = "generations.jsonl"  # --generate: every dev prompt's generation and reference, in the run folder


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf."""


def measure_inference(run_dir: Path, config, latency: dict[str, Any] | None = None,
                      generate: dict[str, int] | None = None) -> dict[str, Any]:
    """Latency at batch 1 and 32 (unmerged and merged), extra inference cost, sample generations and, with
    ``generate`` (``{"examples", "max_new_tokens"}``, compare ``--generate``), the scored generations.

    The merged timing uses a second fresh copy (``method.merge`` consumes the model it is given).
    """
    from peftlab.inference import load_trained

    loaded = load_trained(run_dir)
    bad = non_finite_parameters(loaded.model)
    if bad:
        raise TrainingDiverged(f"training diverged: {len(bad)} trained tensor(s) hold NaN/inf after training "
                               f"(for example {bad[0]}); try a lower --lr")
    inputs = latency_inputs(loaded, config)
    result: dict[str, Any] = {"inference_cost": loaded.method.inference_cost(), "latency_precision": "fp32"}
    settings = {**LATENCY_SETTINGS, **(latency or {})}
    bs1, bs32, runs = time_model(loaded.model, inputs, **settings)
    result.update(latency_ms_bs1=bs1, latency_ms_bs32=bs32, latency_runs=runs,
                  latency_ms_bs1_merged=None, latency_ms_bs32_merged=None, samples=None)
    if TaskKind(loaded.kind).is_generative:
        result["samples"] = sample_generations(loaded, inputs["raw"][:SAMPLE_PROMPTS])
        if generate:
            result["generation"] = generation_quality(loaded, run_dir, config, **generate)
    mergeable = bool(loaded.method.mergeable)
    del loaded
    gc.collect()
    if mergeable:
        fresh = load_trained(run_dir)
        model = fresh.model
        merged = fresh.method.merge(model)
        if merged is model and not is_peft_model(model):
            # BitFit, full fine-tuning: the trained model already is a plain model, merging changes nothing
            result.update(latency_ms_bs1_merged=result["latency_ms_bs1"],
                          latency_ms_bs32_merged=result["latency_ms_bs32"], latency_merged_note="same model")
        else:
            bs1, bs32, _ = time_model(merged, inputs, **settings)
            result.update(latency_ms_bs1_merged=bs1, latency_ms_bs32_merged=bs32)
        del fresh, model, merged
        gc.collect()
    return result


def sample_generations(loaded, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Greedy generations for dev ``rows``: the prompt as a user would give it, the output and the reference."""
    from peftlab.inference import predict

    kind = TaskKind(loaded.kind)
    records = [kind.record_from_example(row) for row in rows]
    generated = predict(loaded, records, max_new_tokens=SAMPLE_NEW_TOKENS, batch_size=SAMPLE_PROMPTS)
    return [{"prompt": prompt_text(record), "generated": output.get("generated"),
             "reference": reference_text(kind, row, record)}
            for row, record, output in zip(rows, records, generated)]


def prompt_text(record: dict[str, Any]) -> str:
    """What a person reads as the prompt of a generative input: a conversation as ``role: content`` lines, else
    the prompt (or source) text itself."""
    if isinstance(record.get("messages"), list):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in record["messages"] if isinstance(m, dict))
    return "\n".join(str(value) for value in record.values())


def generation_quality(loaded, run_dir: Path, config, *, examples: int, max_new_tokens: int) -> dict[str, Any]:
    """``compare --generate N``: the trained run (``loaded`` from ``run_dir``) generates greedily for the first
    ``examples`` dev rows (the evaluation subset's order); the task scores the texts (``task.generation_metrics``).
    Every generation goes to ``GENERATIONS_FILE`` in the run folder; the row keeps the scores."""
    from peftlab.inference import generation_scores, task_for_manifest
    from peftlab.report import write_text
    from peftlab.tasks.base import select

    task = task_for_manifest(loaded.manifest, None, None)
    dev = select(task.load("dev", config.data_dir), config.max_eval_samples, config.seed)
    rows = dev.select(range(min(examples, len(dev))))
    scored = generation_scores(loaded, task, rows, max_new_tokens=max_new_tokens)
    kind = TaskKind(loaded.kind)
    lines = [json.dumps({"prompt": prompt_text(kind.record_from_example(row)), **sample}, ensure_ascii=False)
             for row, sample in zip(rows, scored["samples"])]
    write_text(Path(run_dir) / GENERATIONS_FILE, "".join(line + "\n" for line in lines))
    return {"metrics": scored["metrics"], "examples": scored["examples"], "examples_asked": examples,
            "max_new_tokens": max_new_tokens, "seconds": scored["seconds"], "file": GENERATIONS_FILE}


def reference_text(kind: TaskKind, row: dict[str, Any], record: dict[str, Any]) -> Any:
    """The text a generative dev row expects (causal LM: ``response``; seq2seq: ``target``)."""
    return TaskKind(kind).reference_from_example(row)


def is_peft_model(model) -> bool:
    try:
        import peft

        return isinstance(model, peft.PeftModel)
    except ImportError:  # pragma: no cover
        return False


def latency_inputs(loaded, config) -> dict[str, Any]:
    """The first LATENCY_ROWS dev examples (the evaluation subset's order), tokenized without labels."""
    from peftlab.inference import task_for_manifest
    from peftlab.preprocess import collator, tokenize
    from peftlab.tasks.base import select

    task = task_for_manifest(loaded.manifest, None, None)
    dev = select(task.load("dev", config.data_dir), config.max_eval_samples, config.seed)
    raw = dev.select(range(min(LATENCY_ROWS, len(dev))))
    tokenized = tokenize(raw, loaded.kind, loaded.tokenizer, max_length=loaded.manifest.max_length,
                         label_names=loaded.label_names, is_regression=loaded.manifest.is_regression,
                         with_labels=False)
    collate = collator(loaded.kind, loaded.tokenizer)

    def batch(rows):  # model inputs only (the seq2seq collator adds labels=None)
        return {k: v for k, v in collate(rows).items() if k != "labels" and hasattr(v, "to")}

    rows = [tokenized[i] for i in range(len(tokenized))]
    return {"raw": [raw[i] for i in range(len(raw))], "batch": batch(rows),
            "singles": [batch([row]) for row in rows[:SINGLE_ROWS]]}


def time_model(model, inputs: dict[str, Any], *, bs1_warmup: int = 3, bs1_runs: int = 20, bs32_warmup: int = 1,
               bs32_runs: int = 5, budget_s: float = 5.0) -> tuple[float, float, dict[str, int]]:
    """Median milliseconds of a forward pass at batch 1 (single dev rows, cycled) and at batch 32.

    Each timing is the median of repeated runs after untimed warm-up runs, stopping early (after at
    least 3 runs) once ``budget_s`` is spent (:func:`peftlab.latency.forward_latency`). fp32, no
    autocast, no gradients; CUDA is synchronised around every run.
    """
    from peftlab.latency import forward_latency

    bs1 = forward_latency(model, inputs["singles"], warmup=bs1_warmup, runs=bs1_runs, budget_s=budget_s)
    bs32 = forward_latency(model, [inputs["batch"]], warmup=bs32_warmup, runs=bs32_runs, budget_s=budget_s)
    return bs1.median_ms, bs32.median_ms, {"bs1": bs1.runs, "bs32": bs32.runs,
                                           "bs32_rows": int(inputs["batch"]["input_ids"].shape[0])}


def divergence(metrics: dict[str, Any], log_path: Path) -> str | None:
    """Why the run diverged (NaN/inf in the loss, the gradient norm or the metric), or None.

    The loss alone is not enough: the Trainer's ``logging_nan_inf_filter`` (on by default) replaces a
    NaN/inf step loss by the running mean, so a run whose weights have become NaN can log a loss of
    0.0. Its gradient norm is logged unfiltered. Under fp16 loss scaling a step with an infinite
    gradient is skipped and is normal, so there only the last logged step counts.
    """
    for key in ("final_train_loss", "metric"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return f"training diverged: {key.replace('_', ' ')} is {value} (try a lower --lr)"
    for key, value in (metrics.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return f"training diverged: dev {key} is {value} (try a lower --lr)"
    records = []
    if Path(log_path).is_file():
        for line in Path(log_path).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    train_records = [r for r in records if r.get("type") in ("train", "summary")]
    for record in train_records:
        for key in ("loss", "train_loss"):
            value = record.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                return (f"training diverged: {key.replace('_', ' ')} became {value} at step {record.get('step')} "
                        "(try a lower --lr)")
    with_norm = [r for r in train_records if isinstance(r.get("grad_norm"), (int, float))]
    checked = with_norm[-1:] if metrics.get("precision") == "fp16" else with_norm
    for record in checked:
        if not math.isfinite(record["grad_norm"]):
            return (f"training diverged: the gradient norm became {record['grad_norm']} at step {record.get('step')} "
                    f"(learning rate {record.get('learning_rate', '?'):g}); try a lower --lr")
    return None


def non_finite_parameters(model) -> list[str]:
    import torch

    return [name for name, parameter in model.named_parameters()
            if parameter.is_floating_point() and not bool(torch.isfinite(parameter).all())]


def folder_bytes(path: Path) -> int | None:
    path = Path(path)
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


__all__ = ["LATENCY_ROWS", "LATENCY_SETTINGS", "SAMPLE_PROMPTS", "SAMPLE_NEW_TOKENS", "TrainingDiverged",
           "measure_inference", "sample_generations", "prompt_text", "generation_quality", "GENERATIONS_FILE", "reference_text", "is_peft_model", "latency_inputs",
           "time_model", "divergence", "non_finite_parameters", "folder_bytes"]
