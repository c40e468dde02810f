"""``peftlab recommend``: rank the ten methods for a model, a task and a memory budget.

Each method gets points from the selection guide (docs/recommend.md), then the situation moves them:

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
listed last with the reason.
"""

from __future__ import annotations

import math
import re
from typing import Any

from peftlab.errors import PeftlabError

TASK_TYPES = ("classification", "ner", "qa", "generation", "seq2seq")
VERY_LARGE = 3e9  # parameters: T-Few's (IA)3 results are on 3B and 11B models
HUGE = 1e10  # Lester et al.: prompt tuning matches fine-tuning from ~10B parameters
SMALL = 1e9
TIGHT = 0.85  # above this share of the budget, allocator fragmentation may still push it over

# The selection guide: points and the one-line reason, per task type and method.
GUIDE: dict[str, dict[str, tuple[float, str]]] = {
    "classification": {
        "adapter": (3.0, "classification favours adapters: within ~0.4% of full fine-tuning on GLUE with ~3% of "
                         "the parameters (Houlsby et al. 2019)"),
        "lora": (2.5, "matches full fine-tuning on GLUE classification (Hu et al. 2021)"),
        "bitfit": (2.0, "bias-only training is competitive on small and medium classification sets "
                        "(Ben Zaken et al. 2022)"),
        "p-tuning-v2": (2.0, "deep prompts match fine-tuning on classification across model sizes (Liu et al. 2022)"),
        "full": (2.0, "the accuracy reference, at full cost"),
        "ia3": (1.5, "a few rescaling vectors; strongest on large models (Liu et al. 2022)"),
        "qlora": (1.0, "LoRA on a 4-bit base: for bases too big to train in 16/32 bits"),
        "prefix-tuning": (1.0, "made for generation; below deep prompts on classification"),
        "p-tuning": (1.0, "input-level prompts lag fine-tuning on small and medium models (Liu et al. 2022)"),
        "prompt-tuning": (0.5, "input prompts alone lag fine-tuning on classification"),
    },
    "ner": {
        "adapter": (3.0, "adapters hold up on sequence labelling, close to full fine-tuning"),
        "p-tuning-v2": (2.5, "deep prompts were designed to handle sequence labelling (Liu et al. 2022)"),
        "lora": (2.5, "low-rank updates in every layer; strong on token classification"),
        "full": (2.0, "the accuracy reference, at full cost"),
        "bitfit": (1.5, "bias-only training trails on token-level tasks"),
        "ia3": (1.0, "a few rescaling vectors; weaker on token-level tasks on small models"),
        "prefix-tuning": (1.0, "made for generation; P-Tuning v2 is its sequence-labelling form"),
        "qlora": (1.0, "LoRA on a 4-bit base: for bases too big to train in 16/32 bits"),
        "prompt-tuning": (0.0, "prepends tokens, so outputs no longer line up with the labels"),
        "p-tuning": (0.0, "prepends tokens, so outputs no longer line up with the labels"),
    },
    "qa": {
        "adapter": (3.0, "adapters reach full fine-tuning on extractive QA (SQuAD, Houlsby et al. 2019)"),
        "lora": (2.5, "low-rank updates in every layer; strong on span extraction"),
        "p-tuning-v2": (2.5, "deep prompts match fine-tuning on SQuAD-style QA (Liu et al. 2022)"),
        "full": (2.0, "the accuracy reference, at full cost"),
        "bitfit": (1.5, "bias-only training trails on span extraction"),
        "ia3": (1.0, "a few rescaling vectors; weaker on token-level tasks on small models"),
        "prefix-tuning": (1.0, "made for generation; P-Tuning v2 is its token-level form"),
        "qlora": (1.0, "LoRA on a 4-bit base: for bases too big to train in 16/32 bits"),
        "prompt-tuning": (0.0, "prepends tokens, so answer positions shift"),
        "p-tuning": (0.0, "prepends tokens, so answer positions shift"),
    },
    "generation": {
        "lora": (3.0, "generation favours LoRA: the standard for instruction and generative tuning (Hu et al. 2021)"),
        "qlora": (2.5, "LoRA quality on a 4-bit base at a fraction of the memory (Dettmers et al. 2023)"),
        "prefix-tuning": (2.0, "made for generation: table-to-text and summarisation (Li & Liang 2021)"),
        "full": (2.0, "the quality reference, at full cost"),
        "ia3": (1.5, "a few rescaling vectors; best on large models (Liu et al. 2022)"),
        "adapter": (1.5, "works, but adds sequential latency to every generated token"),
        "p-tuning-v2": (1.5, "deep prompts; less studied for open-ended generation"),
        "prompt-tuning": (1.0, "input prompts only; weak below ~10B parameters (Lester et al. 2021)"),
        "p-tuning": (1.0, "input prompts from an encoder; weak for open-ended generation"),
        "bitfit": (0.5, "biases alone move generation little"),
    },
    "seq2seq": {
        "lora": (3.0, "LoRA is the default for encoder-decoder and seq2seq tuning (Hu et al. 2021)"),
        "qlora": (2.5, "LoRA quality on a 4-bit base at a fraction of the memory (Dettmers et al. 2023)"),
        "prefix-tuning": (2.5, "made for conditional generation: summarisation on BART (Li & Liang 2021)"),
        "ia3": (2.0, "(IA)3 was built on the T0 encoder-decoder (Liu et al. 2022)"),
        "full": (2.0, "the quality reference, at full cost"),
        "adapter": (1.5, "works, but adds sequential latency to every generated token"),
        "prompt-tuning": (1.5, "prompt tuning was introduced on T5 and scales with it (Lester et al. 2021)"),
        "p-tuning-v2": (1.5, "deep prompts; less studied for seq2seq"),
        "p-tuning": (1.0, "input prompts from an encoder; weak for seq2seq"),
        "bitfit": (0.5, "biases alone move generation little"),
    },
}

FEW_SHOT = {
    "prompt-tuning": (2.5, "few-shot favours prompt methods: few trainable values, hard to overfit"),
    "prefix-tuning": (2.0, "few-shot favours prefix methods (Li & Liang: best in low-data settings)"),
    "p-tuning": (2.0, "few-shot favours prompt methods (P-Tuning was built for few-shot)"),
    "p-tuning-v2": (2.0, "few-shot favours prompt methods: few trainable values"),
    "ia3": (1.0, "(IA)3 was designed for few-shot learning (T-Few)"),
    "full": (-1.5, "full fine-tuning overfits a few dozen examples"),
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


def task_kind(task_type: str, architecture: str, model: str) -> tuple[str, str | None]:
    """The peftlab task kind a task type runs as on this architecture, and a note when it is not obvious."""
    if task_type not in TASK_TYPES:
        raise PeftlabError(f"Unknown task type '{task_type}'. Use one of: {', '.join(TASK_TYPES)}.")
    if task_type == "classification":
        return "seq-cls", None
    if task_type == "ner":
        if architecture == "encoder-decoder":
            return "seq2seq", "NER on an encoder-decoder runs as text-to-text (tags generated as text)."
        return "token-cls", None
    if task_type == "qa":
        if architecture == "encoder":
            return "token-cls", ("Extractive QA: a start/end span head on every token, estimated as token "
                                 "classification (the methods that prepend tokens cannot run it).")
        kind = "seq2seq" if architecture == "encoder-decoder" else "causal-lm"
        return kind, "QA on a generative model runs as generative QA (the answer is generated)."
    if architecture == "encoder":
        raise PeftlabError(
            f"'{model}' is an encoder-only model: it cannot generate text, so it cannot do --task-type {task_type}. "
            "Use a decoder (smollm2, gpt2, meta-llama/Llama-2-7b-hf) or an encoder-decoder (t5-small), or "
            "--task-type classification / ner / qa.")
    if task_type == "seq2seq" and architecture == "decoder":
        return "causal-lm", "seq2seq on a decoder-only model: input and output in one sequence (causal LM)."
    if task_type == "generation" and architecture == "encoder-decoder":
        return "seq2seq", None
    return ("seq2seq" if task_type == "seq2seq" else "causal-lm"), None


# ---- the ranking ---------------------------------------------------------------------------------------

def recommend(model: str, task_type: str, memory: str | int | float = "16GB", tasks: int = 1,
              latency_critical: bool = False, few_shot: bool = False, batch_size: int = 8,
              max_length: int = 512, domain_specific: bool = False, device: str = "cuda") -> dict[str, Any]:
    """The ten methods ranked for this situation, best first, each with a one-line reason (JSON-able)."""
    from peftlab import memory as memory_model
    from peftlab.methods import get_method, method_names

    budget = parse_memory(memory)
    if int(tasks) < 1:
        raise PeftlabError(f"--tasks must be at least 1; got {tasks}.")
    if int(batch_size) < 1:
        raise PeftlabError(f"--batch-size must be at least 1; got {batch_size}.")
    if int(max_length) < 8:
        raise PeftlabError(f"--max-length must be at least 8; got {max_length}.")
    if device not in memory_model.DEVICES:
        raise PeftlabError(f"Unknown device '{device}'. Use one of: {', '.join(memory_model.DEVICES)}.")
    spec = memory_model.model_spec(model)
    kind, kind_note = task_kind(task_type, spec.architecture, model)
    num_labels = 9 if task_type == "ner" and kind == "token-cls" else 2  # CoNLL-2003's 9 tags; span start/end
    # QA or NER run generatively (decoders, encoder-decoders) follow the generative guide
    guide = GUIDE[task_type if kind not in ("causal-lm", "seq2seq") or task_type not in ("qa", "ner")
                  else ("generation" if kind == "causal-lm" else "seq2seq")]
    footprints = memory_model.footprints(model, kind, num_labels)
    base_params = next(iter(footprints.values())).base_total
    runtime = memory_model.CUDA_RUNTIME_BYTES if device == "cuda" else memory_model.CPU_RUNTIME_BYTES

    rows = []
    for order, name in enumerate(method_names()):
        method = get_method(name)
        footprint = footprints[name]
        row: dict[str, Any] = {
            "method": name, "category": method.category, "mergeable": bool(method.mergeable),
            "inference_cost": method.inference_cost(), "summary": method.summary,
            "status": "ok", "fits": None, "trainable_params": None, "trainable_percent": None,
            "training_memory_gb": None, "memory_needed_gb": None, "gradient_checkpointing": None,
            "memory_breakdown_mb": None, "per_task_mb": None, "storage_for_tasks_mb": None,
        }
        points, guide_reason = guide[name]
        reasons = [guide_reason]
        if not footprint.supported:
            row.update(status="unsupported", score=None, reason=_one_line(footprint.reason), _key=(2, 0, 0, order))
            rows.append(row)
            continue
        row["trainable_params"] = footprint.trainable
        row["trainable_percent"] = round(100 * footprint.trainable / max(base_params, 1), 4)

        # memory: as configured, and with gradient checkpointing if that is what makes it fit
        estimate = memory_model.estimate(model, name, kind, batch_size=batch_size, seq_length=max_length,
                                         device=device, num_labels=num_labels)
        needed = estimate.peak_bytes + runtime
        fits = needed <= budget
        if not fits and not estimate.gradient_checkpointing:
            checkpointed = memory_model.estimate(model, name, kind, batch_size=batch_size, seq_length=max_length,
                                                 device=device, num_labels=num_labels, gradient_checkpointing=True)
            if checkpointed.peak_bytes + runtime <= budget:
                estimate, needed, fits = checkpointed, checkpointed.peak_bytes + runtime, True
                points -= 0.5
                reasons.append(f"fits only with --gradient-checkpointing ({_gb(needed)} of {_gb(budget)}, slower)")
        row.update(fits=fits, training_memory_gb=round(estimate.peak_bytes / 2**30, 2),
                   memory_needed_gb=round(needed / 2**30, 2), gradient_checkpointing=estimate.gradient_checkpointing,
                   memory_breakdown_mb=estimate.to_dict()["components_mb"])
        if not fits:
            row["status"] = "does not fit"
            reasons.insert(0, f"needs ~{_gb(needed)} to train, more than {_gb(budget)}")
        elif needed > TIGHT * budget and not reasons[-1].startswith("fits only"):
            points -= 0.25
            reasons.append(f"tight: ~{_gb(needed)} of {_gb(budget)}")

        # model size
        if base_params >= VERY_LARGE and name == "ia3":
            points += 2.0
            reasons.append("very large model: (IA)3's few vectors shine at billions of parameters (T-Few, 3B-11B)")
        if name == "prompt-tuning":
            if base_params >= HUGE:
                points += 2.0
                reasons.append("at ~10B+ parameters prompt tuning matches fine-tuning (Lester et al. 2021)")
            elif base_params < SMALL:
                points -= 1.0
                if "10B" not in guide_reason:
                    reasons.append("prompt tuning only catches up with fine-tuning at ~10B parameters (Lester et al. 2021)")
        if name == "qlora" and base_params < SMALL:
            points -= 1.0
            reasons.append("on a model this small a 4-bit base saves little and slows training: use LoRA")
        if name == "full" and base_params >= VERY_LARGE:
            points -= 1.0
            reasons.append("very large model: full fine-tuning is rarely worth its cost")

        # situation
        if few_shot and name in FEW_SHOT:
            bonus, why = FEW_SHOT[name]
            points += bonus
            reasons.append(why)
        if domain_specific and name == "bitfit":
            points += 2.0
            reasons.append("domain-specific data favours BitFit: bias-only updates adapt to a domain from little data")
        if latency_critical:
            if method.mergeable:
                points += 1.5
                reasons.append("merges into the base weights: zero extra inference cost")
            else:
                points -= 1.0
                reasons.append(f"not mergeable: {method.inference_cost()}")
        per_task = 4 * (base_params if name == "full" else footprint.inference_params)
        row["per_task_mb"] = round(per_task / 2**20, 2)
        row["storage_for_tasks_mb"] = round(int(tasks) * per_task / 2**20, 1)
        if int(tasks) > 1:
            points += _multi_task_points(name, footprint.inference_params / max(base_params, 1), int(tasks), reasons,
                                         per_task, latency_critical and method.mergeable)
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
        f"training memory for a {'CUDA GPU' if device == 'cuda' else 'CPU'}: fp32 weights (as peftlab loads them) "
        f"with bf16 autocast, AdamW, batch {batch_size} x {max_length} tokens; + {_gb(runtime)} runtime",
        "QLoRA: 4-bit NF4 base with double quantisation, gradient checkpointing, paged 8-bit AdamW on CUDA",
        "method options at their defaults (docs/methods/defaults.md)",
    ]
    if spec.source == "built in":
        assumptions.append(f"architecture of '{model}' from peftlab's built-in table (works offline)")
    return {
        "model": model,
        "model_source": spec.source,
        "model_params": base_params,
        "architecture": spec.architecture,
        "task_type": task_type,
        "kind": kind,
        "note": kind_note,
        "memory_budget_gb": round(budget / 2**30, 2),
        "tasks": int(tasks),
        "latency_critical": bool(latency_critical),
        "few_shot": bool(few_shot),
        "domain_specific": bool(domain_specific),
        "batch_size": int(batch_size),
        "max_length": int(max_length),
        "device": device,
        "assumptions": assumptions,
        "ranking": rows,
    }


def _multi_task_points(name: str, fraction: float, tasks: int, reasons: list[str], per_task: float,
                       merged_for_latency: bool) -> float:
    """N tasks over one base: small per-task adapters win; full fine-tuning keeps N full copies."""
    if name == "full":
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
    situation = [f"{ranking['task_type']} ({ranking['kind']})", f"{ranking['memory_budget_gb']:g} GB",
                 f"batch {ranking['batch_size']} x {ranking['max_length']}"]
    if ranking["tasks"] > 1:
        situation.append(f"{ranking['tasks']} tasks")
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
