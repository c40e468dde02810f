"""``peftlab recommend``: rank the registered methods for a model, a task and a memory budget.

Each method gets the points of its own row of the selection guide (``Method.guide_row``; the rows and their
sources are in docs/recommend.md), then the situation moves them:

* **task type**: classification favours bottleneck adapters, sequence labelling and extractive QA
  adapters and P-Tuning v2, generation and seq2seq LoRA/QLoRA (and prefix tuning, made for generation);
* **few-shot**: the prompt and prefix methods (few trainable values, hard to overfit) and (IA)3 (T-Few);
* **model size**: very large models (≥ 3B parameters) favour (IA)3, and prompt tuning catches up with
  fine-tuning from ~10B; on models under 1B prompt tuning lags and a 4-bit base buys little;
* **domain-specific** data favours BitFit;
* **latency-critical** serving puts the mergeable methods first (LoRA, QLoRA, (IA)3, BitFit, full:
  merged, they add nothing at inference);
* **several tasks on one base** (``tasks > 1``) favours small per-task adapters served over one shared
  base; full fine-tuning stores and serves one full copy per task;
* **memory**: every method's training memory is estimated (``peftlab.memory``) for the model, batch and
  sequence length; a method that does not fit the budget goes to the bottom, flagged, unless gradient
  checkpointing would make it fit (then it is kept, with that advice).

Methods the model or task cannot run (BitFit on Llama, prompt tuning on token classification) are
listed last with the reason. The task is a task type (``--task-type``) or a registered task (``--task
sst2``: its kind decides the type). Unless ``--device``/``--memory`` say otherwise, the plan is for this
machine: its device and that device's memory (a GPU's memory, or the RAM on a CPU-only machine); the
output says which it assumed.
"""

from __future__ import annotations

import math
import re
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.memory.estimate import DEVICES
from peftlab.methods.base import GUIDE_TASK_TYPES, GuideSituation

# The selection guide's rows live with each method (``Method.guide_row``, ``few_shot_guide``, ``guide_adjustments``).
TASK_TYPES = GUIDE_TASK_TYPES
TIGHT = 0.85  # above this share of the budget, allocator fragmentation may still push it over
# Assumed when the plan is for a CUDA GPU that this machine does not have and no --memory is given.
ASSUMED_GPU_MEMORY = "16GB"

# A registered task's kind -> the selection guide's task type (``peftlab recommend --task NAME``).
TASK_TYPE_OF_KIND = {
    TaskKind.SEQ_CLS: "classification",
    TaskKind.TOKEN_CLS: "ner",
    TaskKind.QA: "qa",
    TaskKind.CAUSAL_LM: "generation",
    TaskKind.SEQ2SEQ: "seq2seq",
}


# ---- inputs -----------------------------------------------------------------------------------------

_UNITS = {"": 2**30, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory(text: str | int | float) -> int:
    """'16GB' -> bytes. GB and GiB both mean 2**30 (a "16 GB" GPU holds 16 GiB); a bare number is GB."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise PeftlabError(
                f"--memory must be a size such as 16GB, 24GiB, 80G or 512MB; got '{text}'.")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise PeftlabError(f"--memory must be more than zero; got '{text}'.")
    return size


def task_kind(task_type: str, architecture: str, model: str) -> tuple[TaskKind, str | None]:
    """The peftlab task kind a task type runs as on this architecture, and a note when it is not obvious."""
    if task_type not in TASK_TYPES:
        raise PeftlabError(f"Unknown task type '{task_type}'. Use one of: {', '.join(TASK_TYPES)}.")
    if task_type == "classification":
        return TaskKind.SEQ_CLS, None
    if task_type == "ner":
        if architecture == "encoder-decoder":
            return TaskKind.SEQ2SEQ, "NER on an encoder-decoder runs as text-to-text (tags generated as text)."
        return TaskKind.TOKEN_CLS, None
    if task_type == "qa":
        if architecture == "encoder":
            return TaskKind.TOKEN_CLS, ("Extractive QA: a start/end span head on every token, estimated as token "
                                        "classification (the methods that prepend tokens cannot run it).")
        kind = TaskKind.SEQ2SEQ if architecture == "encoder-decoder" else TaskKind.CAUSAL_LM
        return kind, "QA on a generative model runs as generative QA (the answer is generated)."
    if architecture == "encoder":
        raise PeftlabError(
            f"'{model}' is an encoder-only model: it cannot generate text, so it cannot do --task-type {task_type}. "
            "Use a decoder (smollm2, gpt2, meta-llama/Llama-2-7b-hf) or an encoder-decoder (t5-small), or "
            "--task-type classification / ner / qa.")
    if task_type == "seq2seq" and architecture == "decoder":
        return TaskKind.CAUSAL_LM, "seq2seq on a decoder-only model: input and output in one sequence (causal LM)."
    if task_type == "generation" and architecture == "encoder-decoder":
        return TaskKind.SEQ2SEQ, None
    return (TaskKind.SEQ2SEQ if task_type == "seq2seq" else TaskKind.CAUSAL_LM), None


def guide_task_type(task_type: str, kind: TaskKind) -> str:
    """The guide rows that apply: QA or NER run generatively (decoders, encoder-decoders) follow the generative ones."""
    if kind.is_generative and task_type in ("qa", "ner"):
        return "seq2seq" if kind is TaskKind.SEQ2SEQ else "generation"
    return task_type


def resolve_task(task: str | None, task_type: str | None) -> tuple[str, Any]:
    """(task type, the registered task or None) from ``--task NAME`` and/or ``--task-type``."""
    if task is None:
        if task_type is None:
            raise PeftlabError("Say what the task is: --task NAME (a registered task such as sst2, conll2003, "
                               f"alpaca) or --task-type ({', '.join(TASK_TYPES)}).")
        return task_type, None
    from peftlab.tasks import get_task

    task_object = get_task(task)
    implied = TASK_TYPE_OF_KIND[TaskKind(task_object.kind)]
    if task_type is not None and task_type != implied:
        raise PeftlabError(f"--task {task} is a {task_object.kind} task (task type {implied}), but --task-type says "
                           f"{task_type}: give one of the two.")
    return implied, task_object


def hardware_plan(device: str | None, memory: str | int | float | None) -> dict[str, Any]:
    """The device and memory budget to plan for: what was given, else what this machine has (``peftlab.hardware``).

    Returns device, budget (bytes) and one sentence saying where each came from."""
    from peftlab import hardware

    here = hardware.device_type()
    device_given = device is not None
    device = device or here
    if device not in DEVICES:
        raise PeftlabError(f"Unknown device '{device}'. Use one of: {', '.join(DEVICES)}.")
    where = "given" if device_given else ("detected: a CUDA GPU" if here == "cuda" else "detected: no CUDA GPU here")
    if memory is not None:
        budget, source = parse_memory(memory), "given"
    elif device == here:
        budget = device_memory_bytes(device)
        source = "detected: this machine's " + ("GPU memory" if device == "cuda" else "RAM")
    else:  # planning for a GPU this machine does not have
        budget, source = parse_memory(ASSUMED_GPU_MEMORY), "assumed (no CUDA GPU here to measure): pass --memory"
    what = "GPU memory" if device == "cuda" else "CPU RAM"
    sentence = (f"planned for {device} ({where}) with {_gb(budget)} of {what} ({source}); "
                "--device and --memory plan for another machine")
    return {"device": device, "budget": budget, "device_source": "given" if device_given else "detected",
            "memory_source": source.split(":")[0].split(" (")[0], "sentence": sentence}


def device_memory_bytes(device: str) -> int:
    """Total memory of this machine's ``device``: the first GPU's memory, or the RAM."""
    from peftlab import hardware

    # proposed for peftlab.hardware (its owner): hardware.device_memory_bytes(device)
    reported = getattr(hardware, "device_memory_bytes", None)
    if reported is not None:
        return int(reported(device))
    if device == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


# ---- the ranking ---------------------------------------------------------------------------------------

def recommend(model: str, task_type: str | None = None, memory: str | int | float | None = None, tasks: int = 1,
              latency_critical: bool = False, few_shot: bool = False, batch_size: int = 8,
              max_length: int = 512, domain_specific: bool = False, device: str | None = None,
              task: str | None = None, nproc: int = 1, deepspeed: str | None = None, fsdp: str | None = None,
              offload: bool = False) -> dict[str, Any]:
    """The registered methods ranked for this situation, best first, each with a one-line reason (JSON-able).

    ``task`` (a registered task name) decides the task type from its kind; ``memory`` and ``device`` default
    to this machine's device and its memory (:func:`hardware_plan`). ``nproc``, ``deepspeed`` (zero2|zero3),
    ``fsdp`` (full_shard|shard_grad_op|hybrid_shard) and ``offload``: plan per rank (``memory`` is one device's,
    ``batch_size`` per device)."""
    from peftlab import memory as memory_model
    from peftlab.memory.estimate import process_runtime_bytes
    from peftlab.memory.sharding import Sharding
    from peftlab.methods import get_method, method_names

    if memory is not None:
        parse_memory(memory)  # a bad size is the first thing to report
    if int(tasks) < 1:
        raise PeftlabError(f"--tasks must be at least 1; got {tasks}.")
    if int(batch_size) < 1:
        raise PeftlabError(f"--batch-size must be at least 1; got {batch_size}.")
    if int(max_length) < 8:
        raise PeftlabError(f"--max-length must be at least 8; got {max_length}.")
    sharding = Sharding.from_options(int(nproc), deepspeed, fsdp, offload)  # a bad combination: one sentence first
    task_type, task_object = resolve_task(task, task_type)
    plan = hardware_plan(device, memory)
    device, budget = plan["device"], plan["budget"]
    spec = memory_model.model_spec(model)
    kind, kind_note = task_kind(task_type, spec.architecture, model)
    num_labels = 9 if task_type == "ner" and kind is TaskKind.TOKEN_CLS else 2  # CoNLL-2003's 9 tags; span start/end
    if task_object is not None and kind.is_classification and task_object.is_regression:
        num_labels = 1
    elif task_object is not None and kind.is_classification and task_object.label_names:
        num_labels = len(task_object.label_names)
    guide_type = guide_task_type(task_type, kind)
    footprints = memory_model.footprints(model, kind, num_labels)
    base_params = next(iter(footprints.values())).base_total
    situation = GuideSituation(base_params=base_params, domain_specific=bool(domain_specific))
    runtime = process_runtime_bytes(device, sharding.engine if sharding.engine.startswith("zero") else None)
    scale = dict(nproc=sharding.nproc, deepspeed=sharding.engine if sharding.engine.startswith("zero") else None,
                 fsdp=sharding.fsdp_mode, offload=sharding.offload)

    rows = []
    for order, name in enumerate(method_names()):
        method = get_method(name)
        footprint = footprints[name]
        row: dict[str, Any] = {
            "method": name, "category": method.category, "mergeable": bool(method.mergeable),
            "inference_cost": method.inference_cost(), "summary": method.summary,
            "status": "ok", "fits": None, "trainable_params": None, "trainable_percent": None,
            "training_memory_gb": None, "memory_needed_gb": None, "gradient_checkpointing": None,
            "memory_breakdown_mb": None, "host_offload_gb": None, "per_task_mb": None, "storage_for_tasks_mb": None,
        }
        points, guide_reason = method.guide_row(guide_type)
        reasons = [guide_reason]
        if not footprint.supported or (footprint.quantized and sharding.engine == "zero3"):
            reason = footprint.reason if not footprint.supported else "its 4-bit base cannot be partitioned by ZeRO-3"
            row.update(status="unsupported", score=None, reason=_one_line(reason), _key=(2, 0, 0, order))
            rows.append(row)
            continue
        row["trainable_params"] = footprint.trainable
        row["trainable_percent"] = round(100 * footprint.trainable / max(base_params, 1), 4)

        # memory: as configured, and with gradient checkpointing if that is what makes it fit
        estimate = memory_model.estimate(model, name, kind, batch_size=batch_size, seq_length=max_length,
                                         device=device, num_labels=num_labels, **scale)
        needed = estimate.peak_bytes + runtime
        fits = needed <= budget
        if not fits and not estimate.gradient_checkpointing:
            checkpointed = memory_model.estimate(model, name, kind, batch_size=batch_size, seq_length=max_length,
                                                 device=device, num_labels=num_labels, gradient_checkpointing=True,
                                                 **scale)
            if checkpointed.peak_bytes + runtime <= budget:
                estimate, needed, fits = checkpointed, checkpointed.peak_bytes + runtime, True
                points -= 0.5
                reasons.append(f"fits only with --gradient-checkpointing ({_gb(needed)} of {_gb(budget)}, slower)")
        row.update(fits=fits, training_memory_gb=round(estimate.peak_bytes / 2**30, 2),
                   memory_needed_gb=round(needed / 2**30, 2), gradient_checkpointing=estimate.gradient_checkpointing,
                   memory_breakdown_mb=estimate.to_dict()["components_mb"],
                   host_offload_gb=round(estimate.offloaded_bytes / 2**30, 2))
        if not fits:
            row["status"] = "does not fit"
            reasons.insert(0, f"needs ~{_gb(needed)} to train, more than {_gb(budget)}")
        elif needed > TIGHT * budget and not reasons[-1].startswith("fits only"):
            points -= 0.25
            reasons.append(f"tight: ~{_gb(needed)} of {_gb(budget)}")

        # model size and data (the method's own adjustments), then the situation
        for bonus, why in method.guide_adjustments(situation):
            points += bonus
            if not (bonus < 0 and _states_same_threshold(why, guide_reason)):
                reasons.append(why)
        if few_shot and method.few_shot_guide is not None:
            bonus, why = method.few_shot_guide
            points += bonus
            reasons.append(why)
        if latency_critical:
            if method.mergeable:
                points += 1.5
                reasons.append("merges into the base weights: zero extra inference cost")
            else:
                points -= 1.0
                reasons.append(f"not mergeable: {method.inference_cost()}")
        whole_model = bool(method.trains_all_weights)
        per_task = 4 * (base_params if whole_model else footprint.inference_params)
        row["per_task_mb"] = round(per_task / 2**20, 2)
        row["storage_for_tasks_mb"] = round(int(tasks) * per_task / 2**20, 1)
        if int(tasks) > 1:
            points += _multi_task_points(whole_model, footprint.inference_params / max(base_params, 1), int(tasks),
                                         reasons, per_task, latency_critical and method.mergeable)
        row["score"] = round(points, 2)
        row["reason"] = "; ".join(reasons)
        unfit = 0 if fits else 1
        slow = 1 if latency_critical and not method.mergeable else 0
        row["_key"] = (unfit, slow, -points, order)
        rows.append(row)

    rows.sort(key=lambda r: r["_key"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
        del row["_key"]
    assumptions = [
        plan["sentence"],
        f"training memory for a {'CUDA GPU' if device == 'cuda' else 'CPU'}: fp32 weights (as peftlab loads them) "
        f"with bf16 autocast, AdamW, batch {batch_size} x {max_length} tokens; + {_gb(runtime)} runtime",
        "QLoRA: 4-bit NF4 base with double quantisation, gradient checkpointing, paged 8-bit AdamW on CUDA",
        "method options at their defaults (docs/methods/defaults.md)",
    ]
    if not sharding.plain:
        assumptions.insert(2, f"memory per rank: {sharding.describe()} (docs/scaling.md), batch {batch_size} per rank"
                           + (", offloaded state in host memory, not counted against the device" if
                              sharding.offload and device == "cuda" else ""))
    if task_object is not None:
        assumptions.insert(1, f"task type {task_type} from task '{task}' ({task_object.kind}), {num_labels} labels"
                           if kind.is_classification else f"task type {task_type} from task '{task}' ({task_object.kind})")
    if spec.source == "built in":
        assumptions.append(f"architecture of '{model}' from peftlab's built-in table (works offline)")
    return {
        "model": model,
        "model_source": spec.source,
        "model_params": base_params,
        "architecture": spec.architecture,
        "task": task,
        "task_type": task_type,
        "kind": kind,
        "note": kind_note,
        "memory_budget_gb": round(budget / 2**30, 2),
        "memory_source": plan["memory_source"],
        "tasks": int(tasks),
        "latency_critical": bool(latency_critical),
        "few_shot": bool(few_shot),
        "domain_specific": bool(domain_specific),
        "batch_size": int(batch_size),
        "max_length": int(max_length),
        "device": device,
        "device_source": plan["device_source"],
        "nproc": sharding.nproc,
        "sharding": sharding.describe(),
        "assumptions": assumptions,
        "ranking": rows,
    }


def _states_same_threshold(reason: str, guide_reason: str) -> bool:
    """Whether a penalty's reason repeats a size threshold ("~10B") that the guide row already gives."""
    thresholds = set(re.findall(r"~\d+(?:\.\d+)?[KMB]\b", reason))
    return bool(thresholds & set(re.findall(r"~\d+(?:\.\d+)?[KMB]\b", guide_reason)))


def _multi_task_points(whole_model: bool, fraction: float, tasks: int, reasons: list[str], per_task: float,
                       merged_for_latency: bool) -> float:
    """N tasks over one base: small per-task adapters win; a method that trains every weight keeps N full copies."""
    if whole_model:
        reasons.append(f"{tasks} tasks = {tasks} full copies ({_size(tasks * per_task)}) to store and serve")
        return -(1.0 + 0.5 * math.log2(tasks))
    shared = f"{tasks} tasks share one base: {tasks} x {_size(per_task)} adapters"
    if merged_for_latency:
        shared += " (merging for zero latency means one merged copy per task; unmerged they share the base)"
    reasons.append(shared)
    if fraction <= 0.01:
        return 1.0
    if fraction <= 0.05:
        return 0.5
    return 0.0


def _gb(size: float) -> str:
    return f"{size / 2**30:.1f} GB"


def _size(size: float) -> str:
    if size >= 2**30:
        return f"{size / 2**30:.1f} GB"
    if size >= 2**20:
        return f"{size / 2**20:.1f} MB"
    return f"{size / 2**10:.0f} KB"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


# ---- the table -----------------------------------------------------------------------------------------

def render(ranking: dict[str, Any]) -> None:
    """The ranking as a rich table, with the situation above it and the assumptions below."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    what = "GPU" if ranking["device"] == "cuda" else "CPU RAM"
    task = f"{ranking['task']}: " if ranking.get("task") else ""
    situation = [f"{task}{ranking['task_type']} ({ranking['kind']})", f"{ranking['memory_budget_gb']:g} GB {what}",
                 f"batch {ranking['batch_size']} x {ranking['max_length']}"]
    if ranking["tasks"] > 1:
        situation.append(f"{ranking['tasks']} tasks")
    if ranking.get("nproc", 1) > 1 or ranking.get("sharding", "one process") != "one process":
        situation.append(f"per rank: {ranking['sharding']}")
    for flag in ("latency_critical", "few_shot", "domain_specific"):
        if ranking.get(flag):
            situation.append(flag.replace("_", "-"))
    params = ranking["model_params"]
    title = (f"peftlab recommend: {ranking['model']} ({_count(params)} parameters"
             f"{', built in' if ranking['model_source'] == 'built in' else ''}) · " + " · ".join(situation))
    table = Table(title=title, title_justify="left", show_lines=True)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("method", style="bold", no_wrap=True)
    table.add_column("trainable", justify="right", no_wrap=True)
    table.add_column("train memory", justify="right", no_wrap=True)
    table.add_column("merges", no_wrap=True)
    table.add_column("why", ratio=1)
    for row in ranking["ranking"]:
        if row["status"] == "unsupported":
            memory_cell, trainable = "[yellow]unsupported[/]", "-"
        else:
            colour = "green" if row["fits"] else "red"
            memory_cell = f"[{colour}]{row['memory_needed_gb']:.1f} GB[/]"
            if not row["fits"]:
                memory_cell += " [red]won't fit[/]"
            elif row["gradient_checkpointing"]:
                memory_cell += " (ckpt)"
            trainable = f"{row['trainable_percent']:.3g}%"
        table.add_row(str(row["rank"]), row["method"], trainable, memory_cell,
                      "yes" if row["mergeable"] else "no", row["reason"])
    console.print(table)
    if ranking.get("note"):
        console.print(f"Note: {ranking['note']}")
    for line in ranking["assumptions"]:
        console.print(f"[dim]· {line}[/]")


def _count(n: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)
