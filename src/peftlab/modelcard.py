"""Model cards: a README.md with Hugging Face Hub metadata for every saved adapter and merged model.

The card is built from what the run already wrote (``peftlab.json``: method, options, task, base model;
``metrics.json``: the measured dev scores, budget and hardware) with ``huggingface_hub``'s own
``ModelCardData`` and ``EvalResult``, so its YAML header is the Hub's format: ``base_model``,
``library_name``, ``pipeline_tag``, ``datasets``, ``license`` (when known), ``tags`` (the method among them)
and a ``model-index`` with the dev metrics. The body says what was trained, the method's options, the
training budget and hardware, and how to load it with plain peft/transformers and with peftlab.

* :func:`write_card` ``(run_dir)``: a ``peftlab train`` folder -> ``<run>/adapter/README.md`` (replacing
  peft's empty template);
* :func:`write_merged_card` ``(folder, report)``: a ``peftlab merge`` output -> ``<folder>/README.md``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from peftlab.artifacts import ADAPTER_DIR, MANIFEST, RunManifest, read_json_or_none
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind

CARD = "README.md"
METRICS = "metrics.json"
LIBRARY = "peftlab"
# The bundled offline aliases are copies of these Hub models (both Apache-2.0). Belongs beside
# ``peftlab.models.BUNDLED``; kept here until that module declares it.
BUNDLED_HUB_IDS = {"minilm": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
                   "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# metrics.json fields shown under "Training budget", in this order
BUDGET = (("train_examples", "training examples"), ("eval_examples", "dev examples"), ("epochs", "epochs"),
          ("steps", "optimizer steps"), ("effective_batch_size", "effective batch size"),
          ("learning_rate", "peak learning rate"), ("warmup_ratio", "warm-up ratio"), ("seed", "seed"),
          ("train_seconds", "training time (s)"), ("train_samples_per_second", "examples per second"))
HARDWARE = (("device", "device"), ("precision", "precision"), ("peak_memory_mb", "peak memory (MB)"))


# ---- facts about the base model, the task and the kind -------------------------------------------------

def base_model_facts(model: str) -> tuple[str | None, str | None]:
    """(Hub id, licence) of the base model: a bundled alias's source, a Hub id as given, or a local folder's
    own card (its ``base_model``/``license`` metadata, else its name when it looks like a Hub id)."""
    if model in BUNDLED_HUB_IDS:
        return BUNDLED_HUB_IDS[model]
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        metadata = _card_metadata(path / CARD)
        hub_id = metadata.get("base_model") if isinstance(metadata.get("base_model"), str) else None
        return hub_id, metadata.get("license") if isinstance(metadata.get("license"), str) else None
    return (model, None) if HUB_ID.match(model) else (None, None)


def _card_metadata(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(path).data.to_dict()
    except Exception:  # noqa: BLE001 - a card we cannot read tells us nothing
        return {}


def pipeline_tag(kind: TaskKind) -> str | None:
    """The Hub's pipeline tag for a kind: the kind's own ``pipeline_tag`` if it declares one, else the
    transformers pipeline whose model class is the kind's auto class."""
    declared = getattr(kind, "pipeline_tag", None)
    if declared:
        return declared
    try:
        from transformers.pipelines import SUPPORTED_TASKS

        for tag, spec in SUPPORTED_TASKS.items():
            if kind.auto_class in [model_class.__name__ for model_class in spec.get("pt", ())]:
                return tag
    except ImportError:  # pragma: no cover
        pass
    if kind.is_generative:
        return "text-generation"
    # AutoModelForQuestionAnswering -> question-answering (transformers 5 has no pipeline for it)
    words = re.findall(r"[A-Z][a-z]+", kind.auto_class.removeprefix("AutoModelFor"))
    return "-".join(word.lower() for word in words) or None


def task_dataset(task_name: str | None, task_options: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(Hub dataset id, config) a task reads, when the task says: its ``hub_dataset``/``hub_config``, else
    its module's ``HUB_PATH``. None for your own files."""
    if not task_name:
        return None, None
    try:
        import importlib

        from peftlab.tasks import get_task

        task = get_task(task_name, **(task_options or {}))
    except Exception:  # noqa: BLE001 - a task that no longer exists: the card names it only
        return None, None
    dataset = getattr(task, "hub_dataset", None) or getattr(importlib.import_module(type(task).__module__),
                                                            "HUB_PATH", None)
    config = getattr(task, "hub_config", None)
    return (dataset if isinstance(dataset, str) else None), config


# ---- the card ---------------------------------------------------------------------------------------------

def card_for(manifest: RunManifest, metrics: dict[str, Any] | None, *, repo_id: str | None = None,
             merged: bool = False, merge_report: dict[str, Any] | None = None):
    """A ``huggingface_hub.ModelCard`` for a run (or, with ``merged``, its merge output)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from peftlab.methods import get_method

    metrics = metrics or {}
    kind = TaskKind.parse(manifest.kind)
    method = get_method(manifest.method, **(manifest.method_options or {}))
    base_id, licence = base_model_facts(manifest.model)
    dataset, dataset_config = task_dataset(manifest.task, manifest.task_options)
    tag = pipeline_tag(kind)
    peft_format = method.peft_type is not None and not merged
    library = "transformers" if merged or method.trains_all_weights else ("peft" if peft_format else LIBRARY)
    name = repo_id.split("/")[-1] if repo_id else f"{manifest.method}-{manifest.task or kind}"
    tags = [LIBRARY, manifest.method, method.category, str(kind)]
    tags += [t for t in (manifest.task, "merged" if merged else None, method.peft_type and method.peft_type.lower(),
                         "peft" if peft_format else None) if t]
    tags = list(dict.fromkeys(str(t) for t in tags))
    results = []
    scores = metrics.get("metrics") or {}
    for metric_name, value in scores.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and tag:
            results.append(EvalResult(
                task_type=tag, dataset_type=dataset or (manifest.task or "custom"),
                dataset_name=manifest.task or "your data", dataset_config=dataset_config, dataset_split="dev",
                metric_type=metric_name, metric_value=float(value), metric_name=f"dev {metric_name}"))
    data = ModelCardData(
        base_model=base_id, library_name=library, pipeline_tag=tag, license=licence,
        datasets=[dataset] if dataset else None, tags=tags, model_name=name if results else None,
        eval_results=results or None)
    body = _body(manifest, metrics, method, kind, base_id, repo_id=repo_id, name=name, merged=merged,
                 peft_format=peft_format, merge_report=merge_report,
                 plain_checkpoint=merged or method.trains_all_weights)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _body(manifest: RunManifest, metrics: dict[str, Any], method, kind: TaskKind, base_id: str | None, *,
          repo_id: str | None, name: str, merged: bool, peft_format: bool, merge_report: dict | None,
          plain_checkpoint: bool) -> str:
    base = base_id or manifest.model
    where = repo_id or ("THIS_FOLDER" if merged else "THIS_ADAPTER")
    what = "merged into the base weights" if merged else "adapter trained"
    lines = [f"# {name}", "",
             f"A **{method.name}** ({method.category}) {what} for **{kind}** on "
             f"**{manifest.task or 'your own data'}**, over the base model `{base}`, trained with "
             f"[peftlab](https://pypi.org/project/peftlab/) {manifest.peftlab_version or ''}.".replace(" .", "."),
             ""]
    if method.summary:
        lines += [method.summary.strip(), ""]
    scores = {k: v for k, v in (metrics.get("metrics") or {}).items() if isinstance(v, (int, float))}
    if scores:
        lines += ["## Dev results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" for key, value in scores.items()]
        if metrics.get("trainable_params") is not None and metrics.get("total_params"):
            lines += ["", f"Trainable parameters: {metrics['trainable_params']:,} of {metrics['total_params']:,} "
                          f"({100 * metrics['trainable_params'] / metrics['total_params']:.3f}%)."]
        lines.append("")
    lines += ["## Method options", "", "| option | value |", "|---|---|"]
    lines += [f"| `{key}` | `{json.dumps(value)}` |" for key, value in sorted((manifest.method_options or {}).items())]
    lines += ["", f"Labels: {', '.join(map(str, manifest.label_names))}." if manifest.label_names else "",
              f"Maximum length: {manifest.max_length} tokens; precision: {manifest.precision}.", ""]
    budget = [(label, metrics[key]) for key, label in BUDGET if metrics.get(key) is not None]
    hardware = [(label, metrics[key]) for key, label in HARDWARE if metrics.get(key) is not None]
    if budget:
        lines += ["## Training budget", "", *[f"- {label}: {_number(value)}" for label, value in budget], ""]
    if hardware:
        lines += ["## Hardware", "", *[f"- {label}: {_number(value)}" for label, value in hardware], ""]
    if merge_report:
        lines += ["## Merge check", "",
                  f"Verified on {merge_report.get('samples')} inputs ({merge_report.get('sample_source')}): "
                  f"max |merged - unmerged| = {merge_report.get('max_abs_diff', 0):.3g} "
                  f"(allowed {merge_report.get('allowed_abs_diff', 0):.3g}).", ""]
    lines += ["## How to load it", ""] + _usage(manifest, kind, base, where, merged=merged, peft_format=peft_format,
                                                    plain_checkpoint=plain_checkpoint)
    return "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1])) + "\n"


def _usage(manifest: RunManifest, kind: TaskKind, base: str, where: str, *, merged: bool, peft_format: bool,
           plain_checkpoint: bool):
    auto = kind.auto_class
    head = ""
    if kind.is_classification and manifest.label_names and not merged:
        head = f", num_labels={len(manifest.label_names)}"
    elif manifest.is_regression and not merged:
        head = ", num_labels=1"
    if plain_checkpoint:  # a merged model, or full fine-tuning's whole model: a transformers checkpoint
        plain = ["With transformers alone:", "", "```python",
                 f"from transformers import {auto}, AutoTokenizer", "",
                 f'model = {auto}.from_pretrained("{where}")', f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
                 "```", ""]
    elif peft_format:
        plain = ["With peft and transformers (no peftlab needed):", "", "```python", "from peft import PeftModel",
                 f"from transformers import {auto}, AutoTokenizer", "",
                 f'base = {auto}.from_pretrained("{base}"{head})',
                 f'model = PeftModel.from_pretrained(base, "{where}")',
                 f'tokenizer = AutoTokenizer.from_pretrained("{base}")', "```", ""]
    else:
        plain = [f"The weights are in peftlab's own format for `{manifest.method}` (peft has no such method): load "
                 "them with peftlab.", ""]
    peftlab = ["With peftlab:", "", "```bash",
               f'peftlab predict --adapter {where} --text "..."' if not merged else
               f"peftlab serve --base {manifest.model} --adapter merged={where}",
               "```", ""]
    if not merged:
        peftlab += ["```python", "from peftlab.inference import load_trained, predict", "",
                    f'print(predict(load_trained("{where}"), ["..."]))', "```", ""]
    return plain + peftlab


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# ---- writing ----------------------------------------------------------------------------------------------

def read_metrics(folder: Path) -> dict[str, Any] | None:
    return read_json_or_none(Path(folder) / METRICS)


def write_card(run_dir: str | os.PathLike, *, repo_id: str | None = None, target: str | os.PathLike | None = None) -> Path:
    """Write the card of a ``peftlab train`` folder to ``<run>/adapter/README.md`` (or ``target``); its path."""
    from peftlab.artifacts import atomic_write_text

    run = Path(run_dir).expanduser()
    if not (run / MANIFEST).is_file():
        raise PeftlabError(f"'{run}' is not a peftlab run folder (no {MANIFEST}): a card is written from its "
                           f"{MANIFEST} and {METRICS}.")
    manifest = RunManifest(**json.loads((run / MANIFEST).read_text()))
    card = card_for(manifest, read_metrics(run), repo_id=repo_id)
    path = Path(target) if target is not None else run / (manifest.adapter_dir or ADAPTER_DIR) / CARD
    atomic_write_text(path, str(card))
    return path


def write_merged_card(folder: str | os.PathLike, report: dict[str, Any], *, repo_id: str | None = None) -> Path:
    """Write the card of a ``peftlab merge`` output (``report``: its ``peftlab_merge.json``) to ``<folder>/README.md``;
    the dev metrics come from the source run's ``metrics.json`` when it has one."""
    from peftlab.artifacts import atomic_write_text

    source = Path(report.get("source_adapter") or "")
    manifest_path = source / MANIFEST
    if manifest_path.is_file():
        manifest = RunManifest(**json.loads(manifest_path.read_text()))
    else:
        manifest = RunManifest(method=report["method"], model=report["model"], kind=report["kind"],
                               task=report.get("task"), label_names=report.get("label_names"),
                               is_regression=bool(report.get("is_regression")),
                               max_length=report.get("max_length") or 128)
    card = card_for(manifest, read_metrics(source) if source.is_dir() else None, repo_id=repo_id, merged=True,
                    merge_report=report)
    path = Path(folder) / CARD
    atomic_write_text(path, str(card))
    return path


__all__ = ["write_card", "write_merged_card", "card_for", "base_model_facts", "pipeline_tag", "task_dataset",
           "read_metrics", "BUNDLED_HUB_IDS", "CARD"]
