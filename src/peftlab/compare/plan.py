"""Planning a comparison before anything trains: the methods, each task's budget and data (with its trivial
baseline), which methods each model/task can take, and the grid of jobs (tuning, then runs).

A task whose data cannot be loaded (missing locally and unreachable on the Hub) gets one sentence and is left
out; the other tasks still run. A method the model cannot take is ``unsupported`` with its reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.compare.baseline import task_splits, trivial_baseline
from peftlab.compare.parallel import Job
from peftlab.compare.runner import flat_options
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind

# The training budget per task kind when the user gives neither --max-train-samples nor --epochs.
# Classification: 2,000 examples x 3 epochs is where the methods separate (LoRA reaches ~0.81 SST-2
# accuracy, prompt tuning is still far behind) and all ten methods fit in the demo's time budget.
# Language models are far slower per example on a CPU (SmolLM2-135M on Alpaca: seconds per example),
# so their default is a smoke-sized budget: raise it (and use a GPU) for a ranking that means much.
DEFAULT_BUDGETS: dict[TaskKind, dict[str, Any]] = {
    TaskKind.SEQ_CLS: {"max_train_samples": 2000, "epochs": 3.0},
    TaskKind.TOKEN_CLS: {"max_train_samples": 2000, "epochs": 3.0},
    TaskKind.CAUSAL_LM: {"max_train_samples": 100, "epochs": 1.0},
    TaskKind.SEQ2SEQ: {"max_train_samples": 500, "epochs": 2.0},
}
# Options compare sets differently from `peftlab train` unless the user gives them: one dev evaluation
# at the end (not per epoch: it would be charged to every method's wall time) and no progress bar (the
# worker's output goes to a log file). Precision stays `auto`: on the AVX512-BF16 CPUs here bf16
# autocast trained LoRA on MiniLM 1.8x faster than fp32 at the same dev accuracy (docs/compare.md).
COMPARE_DEFAULTS: dict[str, Any] = {"eval_each_epoch": False, "progress": False}


@dataclass
class TaskPlan:
    """One task of the comparison: its options, each method's config and support, its data and baseline."""

    name: str
    task: Any = None  # peftlab.tasks.base.Task
    options: dict[str, Any] = field(default_factory=dict)  # flat options, compare's budget defaults applied
    defaults_applied: list[str] = field(default_factory=list)
    configs: dict[str, Any] = field(default_factory=dict)  # method -> TrainConfig (first seed)
    reasons: dict[str, str | None] = field(default_factory=dict)  # method -> why unsupported (None: runs)
    missing: str | None = None  # why its data could not be loaded
    baseline: dict[str, Any] | None = None
    score_metrics: tuple[str, ...] = ()

    def info(self) -> dict[str, Any]:
        task, first = self.task, next(iter(self.configs.values()), None)
        return {
            "kind": task.kind if task else None, "metric_name": task.metric_name if task else None,
            "higher_is_better": task.higher_is_better if task else True,
            "score_metrics": list(self.score_metrics), "description": task.description if task else None,
            "missing": self.missing, "defaults_applied": self.defaults_applied,
            "max_train_samples": first.max_train_samples if first else None,
            "max_eval_samples": first.max_eval_samples if first else None,
            "epochs": first.epochs if first else None,
            "train_examples": self.baseline and self.baseline.get("train_examples"),
            "eval_examples": self.baseline and self.baseline.get("eval_examples"),
        }


def resolve_methods(methods: str | list[str] | None) -> list[str]:
    """'all', 'lora,bitfit' or a list -> validated, de-duplicated names (unknown ones list the valid)."""
    from peftlab.methods import parse_methods

    if methods is None:
        methods = "all"
    if isinstance(methods, str):
        methods = [part.strip() for part in methods.split(",") if part.strip()]
    methods = list(methods)
    if not methods:
        raise PeftlabError("--methods is empty: give 'all' or a comma list such as lora,bitfit.")
    if "all" in methods:
        if methods != ["all"]:
            raise PeftlabError("--methods 'all' cannot be combined with other names.")
        return parse_methods("all")
    names = parse_methods(methods)  # raises PeftlabError naming the valid methods
    return list(dict.fromkeys(names))


def options_for(name: str, options: dict[str, Any], per_method: dict[str, dict]) -> dict[str, Any]:
    """The flat options for one method: training options, plus the method options it has."""
    from peftlab.methods import get_method_class, method_names
    from peftlab.training import TrainConfig

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    own = {f.name for f in get_method_class(name).option_fields()}
    other = set()
    for other_name in method_names():
        other |= {f.name for f in get_method_class(other_name).option_fields()}
    foreign = other - own - train_fields  # another method's option: not for this one
    chosen = {k: v for k, v in options.items() if k not in foreign}
    chosen.update(per_method.get(name, {}))
    chosen["method"] = name
    return chosen


def plan_task(name: str, names: list[str], options: dict[str, Any], per_method: dict[str, dict]) -> TaskPlan:
    """One task's plan: budget defaults by its kind, configs, its data loaded once (the sentence if it cannot
    be), its trivial baseline, and which methods the model can take for it."""
    from peftlab.compare.suite import score_metrics
    from peftlab.tasks import get_task
    from peftlab.training import config_from_options

    plan = TaskPlan(name=name, options={**options, "task": name})
    first = config_from_options(options_for(names[0], plan.options, per_method))
    plan.task = get_task(first.task, **first.task_options)
    for key, value in {**DEFAULT_BUDGETS.get(plan.task.kind, {}), **COMPARE_DEFAULTS}.items():
        if key not in options:
            plan.defaults_applied.append(key)
            plan.options[key] = value
    plan.configs = {method: config_from_options(options_for(method, plan.options, per_method)) for method in names}
    plan.score_metrics = score_metrics(plan.task)
    first = plan.configs[names[0]]
    try:
        train_raw, dev_raw = task_splits(plan.task, first.data_dir, first.max_train_samples, first.max_eval_samples,
                                         first.seed)
        plan.baseline = trivial_baseline(plan.task, train_raw, dev_raw)
        if plan.baseline is not None:
            plan.baseline["train_examples"] = len(train_raw)
    except PeftlabError as error:
        plan.missing = str(error)
        return plan
    plan.reasons = preflight(names, first.model, plan.task,
                             {method: plan.configs[method].method_options for method in names})
    for method in names:
        refusal = packing_refusal(method) if plan.configs[method].packing else None
        if refusal and not plan.reasons.get(method):
            plan.reasons[method] = f"cannot train with --packing: {refusal}"
    return plan


def generation_refusal(task) -> str | None:
    """Why ``--generate`` cannot score ``task``'s generations (not a generation task, no reference texts), or None."""
    from peftlab.kinds import TaskKind

    if not TaskKind.parse(task.kind).is_generative:
        return f"task '{task.name}' is a {task.kind} task, with no text to generate."
    scorer = getattr(task, "generation_metrics", None)
    if not callable(scorer):
        return f"task '{task.name}' has no reference texts to score generations against (dev perplexity only)."
    try:
        scorer(["a"], ["a"])  # the task's own refusal (own plain-text data has no references)
    except PeftlabError as error:
        return str(error)
    return None


def packing_refusal(name: str) -> str | None:
    """Why method ``name`` cannot train on packed rows (its declared fact), or None."""
    from peftlab.methods import get_method_class

    return get_method_class(name).packing_refusal


def preflight(names: list[str], model: str, task, method_options: dict[str, dict] | None = None
              ) -> dict[str, str | None]:
    """Why each method cannot run on ``model`` for ``task`` (None: it can), checked on a weightless copy.

    The model is built from its config on PyTorch's meta device (no weights are read), which is all
    ``check_supported`` looks at. Methods that need a special load (QLoRA's 4-bit base) get only the
    task-kind check here; anything else they reject shows up as a failed run. A model whose config
    cannot be read here (a Hub id offline) is not pre-checked: the runs report what goes wrong.
    """
    from peftlab.catalog import unsupported_reason
    from peftlab.methods import get_method

    reasons: dict[str, str | None] = {}
    model_skeleton = skeleton(model, task)
    for name in names:
        method = get_method(name, **(method_options or {}).get(name, {}))
        if model_skeleton is None or needs_special_load(method):
            reasons[name] = unsupported_reason_kind_only(method, task.kind)
        else:
            reasons[name] = unsupported_reason(method, model_skeleton, task.kind)
    return reasons


def unsupported_reason_kind_only(method, kind: str) -> str | None:
    """The model-independent part of ``check_supported``: does the method handle this task kind."""
    from peftlab.methods.base import Method

    try:
        Method.check_supported(method, None, kind)
    except PeftlabError as error:
        return str(error)
    return None


def needs_special_load(method) -> bool:
    try:
        return bool(method.model_load_kwargs())
    except Exception:  # noqa: BLE001 - e.g. bitsandbytes missing: the run itself will say so
        return True


def skeleton(model: str, task):
    """The task model built from ``model``'s config on the meta device, or None if the config is unreachable."""
    try:
        import torch
        import transformers

        from peftlab.catalog import task_labels
        from peftlab.models import resolve_model

        kind = TaskKind(task.kind)
        config = transformers.AutoConfig.from_pretrained(resolve_model(model))
        if kind.is_classification:
            config.num_labels = 1 if task.is_regression else len(task_labels(task))
        auto_class = getattr(transformers, kind.auto_class)
        with torch.device("meta"):
            return auto_class.from_config(config)
    except PeftlabError:
        raise
    except Exception:  # noqa: BLE001 - offline Hub id, exotic config: the runs will report the problem
        return None


# ---- the grid of jobs ---------------------------------------------------------------------------------

def job_folder(kind: str, task: str, run_name: str, several_tasks: bool) -> str:
    """A job's folder relative to the comparison: runs/<run> (one task), runs/<task>/<run>, tuning/[<task>/]<m>."""
    top = "runs" if kind == "run" else "tuning"
    return f"{top}/{task}/{run_name}" if several_tasks else f"{top}/{run_name}"


def make_job(kind: str, plan: TaskPlan, method: str, seed: int, config, *, out: Path, several_tasks: bool,
             repeats: int, common: dict[str, Any]) -> Job:
    """A run (``kind`` "run") or a cell's tuning ("tune") of ``method`` on ``plan``'s task, ready to execute."""
    run_name = method if kind == "tune" or repeats == 1 else f"{method}-seed{seed}"
    relative = job_folder(kind, plan.name, run_name, several_tasks)
    folder = (out / relative).resolve()
    config = dataclasses.replace(config, seed=seed, output=str(folder))
    if hasattr(config, "run_name"):  # the run's name in the trackers (--report-to): unique in the comparison
        config = dataclasses.replace(config, run_name=f"{plan.name}-{run_name}" if several_tasks else run_name)
    label = run_name if not several_tasks else f"{run_name} · {plan.name}"
    spec = {"job": kind, "options": flat_options(config), "run_name": run_name, "relative": relative,
            "seed": seed, **common}
    key = (kind, plan.name, method) if kind == "tune" else (kind, plan.name, method, seed)
    return Job(key=key, label=label, method=method, task=plan.name, run_dir=folder, spec=spec)


__all__ = ["DEFAULT_BUDGETS", "COMPARE_DEFAULTS", "TaskPlan", "resolve_methods", "options_for", "plan_task",
           "packing_refusal", "generation_refusal",
           "preflight", "unsupported_reason_kind_only", "needs_special_load", "skeleton", "job_folder", "make_job"]
