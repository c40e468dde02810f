"""Using a trained adapter: reload it in a fresh process, score it, predict with it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.artifacts import RunManifest
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind


@dataclass
class Loaded:
    """A trained model ready for inference."""

    model: Any
    tokenizer: Any
    manifest: RunManifest
    method: Any
    adapter_dir: Path
    run_dir: Path | None = None  # the `peftlab train` folder it came from (None: a plain peft folder)

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def label_names(self) -> list[str] | None:
        return self.manifest.label_names


def load_trained(adapter: str | Path, *, device: str | None = None, base_model: str | None = None) -> Loaded:
    """Base model + trained method from a ``peftlab train`` folder or a plain peft adapter folder."""
    import torch

    from peftlab.methods import get_method
    from peftlab.models import load_model, load_tokenizer

    checked = checked_adapter(adapter)
    manifest, adapter_dir = checked.manifest, checked.adapter_dir
    if base_model:
        manifest.model = base_model
    if TaskKind(manifest.kind).is_classification and manifest.label_names is None and not manifest.is_regression:
        manifest.label_names = checked.label_names
    options = {k: v for k, v in manifest.method_options.items()}
    method = get_method(manifest.method, **options)
    tokenizer = load_tokenizer(manifest.model)
    template = saved_chat_template(adapter_dir)
    if template is not None:
        tokenizer.chat_template = template  # what the run rendered its conversations with
    base = load_model(manifest.model, manifest.kind, label_names=manifest.label_names,
                      is_regression=manifest.is_regression, **method.model_load_kwargs())
    model = method.load(base, adapter_dir, manifest.kind)
    target = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(base, "is_loaded_in_4bit", False):
        model.to(target)
    model.eval()
    return Loaded(model=model, tokenizer=tokenizer, manifest=manifest, method=method, adapter_dir=adapter_dir,
                  run_dir=checked.folder if checked.from_run else None)


def saved_chat_template(adapter_dir: str | Path | None) -> str | None:
    """The chat template a run on conversations saved beside its weights (None: not a chat adapter)."""
    from peftlab.tasks.own import CHAT_TEMPLATE_FILE

    path = Path(adapter_dir) / CHAT_TEMPLATE_FILE if adapter_dir else None
    return path.read_text(encoding="utf-8") if path is not None and path.is_file() else None


def checked_adapter(adapter: str | Path):
    """The one adapter check (``peftlab.adapter_check``) that eval, predict, merge, export and serve share:
    manifest, method, peft type against config and weights, safetensors only and complete, no custom code,
    ``adapter_dir`` inside the run folder. A merged model is a transformers folder, not an adapter. A Hub
    repository id (``org/name``, pushed with ``peftlab push``) is fetched first."""
    from peftlab.adapter_check import check_adapter
    from peftlab.hub import local_or_hub

    checked = check_adapter(local_or_hub(adapter))
    if checked.merged:
        raise PeftlabError(f"'{adapter}' is a merged model (a `peftlab merge` output), not an adapter: load it with "
                           "transformers' from_pretrained, or pass it to `peftlab export --model`.")
    return checked


def task_for_manifest(manifest: RunManifest, task: str | None, task_options: dict | None, *,
                      run_dir: Path | None = None):
    """The task to score a run on: its own (with the options it was trained with) unless ``task`` names another.

    File paths the manifest records are absolute; a relative one (runs of an earlier peftlab) is read from
    the current folder when it is there, else from ``run_dir``. A recorded dev file that is gone is named
    with the manifest it comes from, not blamed on a flag the user never gave."""
    from peftlab.tasks import get_task
    from peftlab.tasks.files import FILE_OPTIONS

    name = task or manifest.task
    if name is None:
        raise PeftlabError("This adapter does not record its task (it was not trained by peftlab): pass --task.")
    options = dict(manifest.task_options)
    for option, _flag in FILE_OPTIONS.values():
        recorded = options.get(option)
        if recorded and not Path(recorded).expanduser().is_absolute() and not Path(recorded).exists() and run_dir:
            options[option] = str(Path(run_dir) / recorded)
    dev_option, dev_flag = FILE_OPTIONS["dev"]
    recorded_dev = options.get(dev_option)
    if name == manifest.task and recorded_dev and not (task_options or {}).get(dev_option) \
            and not Path(recorded_dev).expanduser().is_file():
        where = f"'{Path(run_dir) / 'peftlab.json'}'" if run_dir else "the run's peftlab.json"
        raise PeftlabError(f"The dev file this run was trained with, '{recorded_dev}' (recorded in {where}), no "
                           f"longer exists: pass {dev_flag} to evaluate on another file.")
    options.update(task_options or {})
    task_object = get_task(name, **options)
    if name == manifest.task and manifest.label_names is not None:
        task_object.use_saved_label_names(manifest.label_names)  # runs saved with GLUE labels as "0"/"1"
    return task_object


def evaluate(adapter: str | Path, *, task: str | None = None, data_dir: str | None = None,
             max_eval_samples: int | None = None, batch_size: int = 64, precision: str = "auto",
             task_options: dict | None = None, loaded: Loaded | None = None, generate: int = 0,
             max_new_tokens: int = 64) -> dict[str, Any]:
    """Dev metrics of a trained adapter, reloaded from disk. ``generate=N`` also generates for N dev examples
    and scores the texts with the task's generation metric (BillSum: ROUGE-L; your own prompt/response, chat
    and seq2seq data: ROUGE-L, exact match and chrF), under ``"generation"``, with the samples; a run folder's
    ``metrics.json`` gets them too."""
    from peftlab import hardware
    from peftlab.evaluation import evaluate_model
    from peftlab.preprocess import tokenize
    from peftlab.tasks.base import select

    if loaded is None:  # the task and its files checked before the model loads
        checked = checked_adapter(adapter)
        task_for_manifest(checked.manifest, task, task_options, run_dir=checked.folder if checked.from_run else None)
        loaded = load_trained(adapter)
    task_object = task_for_manifest(loaded.manifest, task, task_options, run_dir=loaded.run_dir)
    data_dir = data_dir_for(loaded.manifest, data_dir)
    if task_object.kind != loaded.kind:
        raise PeftlabError(f"Task '{task_object.name}' is a {task_object.kind} task but the adapter was trained "
                           f"for {loaded.kind}.")
    resolved = hardware.resolve_precision(precision)
    dev_raw = select(task_object.load("dev", data_dir), max_eval_samples, 42)
    label_names = loaded.label_names
    dev = tokenize(dev_raw, task_object.kind, loaded.tokenizer, max_length=loaded.manifest.max_length,
                   label_names=label_names, is_regression=task_object.is_regression)
    started = time.perf_counter()
    scores = evaluate_model(loaded.model, task_object, loaded.tokenizer, dev, dev_raw, label_names=label_names,
                            batch_size=batch_size, precision=resolved)
    result = {
        "task": task_object.name,
        "method": loaded.manifest.method,
        "model": loaded.manifest.model,
        "metric_name": task_object.metric_name,
        "metric": scores[task_object.metric_name],
        "metrics": scores,
        "eval_examples": len(dev_raw),  # questions, for qa (whose long contexts give several features each)
        "eval_seconds": time.perf_counter() - started,
    }
    if generate:
        result["generation"] = generation_scores(loaded, task_object, dev_raw.select(range(min(generate, len(dev_raw)))),
                                                 max_new_tokens=max_new_tokens)
        record_generation(loaded.run_dir, result["generation"])
    return result


def record_generation(run_dir: Path | None, generation: dict[str, Any]) -> None:
    """Add the generation scores and samples to a run's ``metrics.json`` (a finished run folder only)."""
    from peftlab.artifacts import METRICS, write_json

    path = Path(run_dir) / METRICS if run_dir else None
    if path is None or not path.is_file():
        return
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return  # a damaged metrics.json is not eval's to repair
    write_json(path, {**metrics, "generation": generation})


def data_dir_for(manifest: RunManifest, data_dir: str | None) -> str | None:
    """The data folder to read dev data from: ``data_dir`` (--data-dir), else $PEFTLAB_DATA_DIR, else the one
    the run was trained from (remembered in its manifest) when it still exists; None: the Hub."""
    from peftlab.tasks.base import DATA_DIR_ENV

    if data_dir or os.environ.get(DATA_DIR_ENV):
        return data_dir
    remembered = manifest.data_dir
    return remembered if isinstance(remembered, str) and Path(remembered).is_dir() else None


def generation_scores(loaded: Loaded, task, rows, *, max_new_tokens: int = 64) -> dict[str, Any]:
    """Generate (greedily) for dev ``rows`` and score the texts with ``task.generation_metrics`` (BillSum:
    ROUGE-L). Returns the scores, the number of examples and the generated/reference pairs."""
    scorer = getattr(task, "generation_metrics", None)
    if scorer is None or not TaskKind(task.kind).is_generative:
        having = [name for name in _task_names_safe() if callable(getattr(_task_class(name), "generation_metrics", None))]
        raise PeftlabError(f"Task '{task.name}' has no generation metric to score generated text with "
                           f"(tasks that have one: {', '.join(having)}); leave out --generate.")
    kind = TaskKind(task.kind)
    started = time.perf_counter()
    outputs = predict(loaded, [kind.record_from_example(row) for row in rows], max_new_tokens=max_new_tokens)
    predictions = [output["generated"] for output in outputs]
    references = [kind.reference_from_example(row) for row in rows]
    return {"metrics": scorer(predictions, references), "examples": len(rows), "max_new_tokens": max_new_tokens,
            "seconds": time.perf_counter() - started,
            "samples": [{"reference": r, "generated": p} for r, p in zip(references, predictions)]}


def _task_names_safe() -> list[str]:
    """Registered tasks that build without options (the csv/tsv/jsonl ones need files)."""
    from peftlab.tasks import task_names

    return [name for name in task_names() if _task_class(name) is not None]


def _task_class(name: str):
    from peftlab.tasks import get_task

    try:
        return type(get_task(name))
    except PeftlabError:
        return None


def predict(adapter: str | Path | Loaded, inputs: list[Any], *, batch_size: int = 32, max_new_tokens: int = 64,
            precision: str = "fp32") -> list[dict[str, Any]]:
    """Predictions for raw inputs: strings, or dicts with text/text_pair, tokens, instruction/prompt, or
    question/context (extractive QA: the answer span, its probability among the best candidates and its
    character offsets in the context)."""
    import torch

    from peftlab.hardware import autocast, resolve_precision
    from peftlab.evaluation import model_device

    loaded = adapter if isinstance(adapter, Loaded) else load_trained(adapter)
    if not inputs:
        return []
    kind = loaded.kind
    records = [TaskKind(kind).record_from_input(item, f"input {i + 1}") for i, item in enumerate(inputs)]
    tokenizer, model = loaded.tokenizer, loaded.model
    device = model_device(model)
    resolved = resolve_precision(precision)
    results: list[dict[str, Any]] = []
    max_length = loaded.manifest.max_length
    if kind == TaskKind.QA:
        return _answer_questions(loaded, records, batch_size=batch_size, precision=resolved)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        with torch.no_grad(), autocast(resolved):
            if kind == TaskKind.SEQ_CLS:
                pairs = [r["text_pair"] for r in chunk]
                encoded = tokenizer([r["text"] for r in chunk],
                                    [p or "" for p in pairs] if any(p is not None for p in pairs) else None,
                                    truncation=True, max_length=max_length, padding=True, return_tensors="pt")
                logits = model(**encoded.to(device)).logits.float().cpu()
                for record, row in zip(chunk, logits):
                    if loaded.manifest.is_regression:
                        results.append({"text": record["text"], "score": float(row.reshape(-1)[0])})
                        continue
                    probabilities = row.softmax(-1)
                    best = int(probabilities.argmax())
                    names = loaded.label_names or [str(i) for i in range(len(probabilities))]
                    results.append({
                        "text": record["text"], **({"text_pair": record["text_pair"]} if record["text_pair"] else {}),
                        "label": names[best], "score": float(probabilities[best]),
                        "probabilities": {names[i]: float(p) for i, p in enumerate(probabilities)},
                    })
            elif kind == TaskKind.TOKEN_CLS:
                encoded = tokenizer([r["tokens"] for r in chunk], is_split_into_words=True, truncation=True,
                                    max_length=max_length, padding=True, return_tensors="pt")
                logits = model(**{k: v.to(device) for k, v in encoded.items()}).logits.float().cpu()
                for row, record in enumerate(chunk):
                    tags, previous = [], None
                    for position, word in enumerate(encoded.word_ids(row)):
                        if word is not None and word != previous:
                            tags.append(loaded.label_names[int(logits[row, position].argmax())])
                        previous = word
                    tags += ["O"] * (len(record["tokens"]) - len(tags))  # words cut by max_length
                    results.append({"tokens": record["tokens"], "tags": tags,
                                    "entities": entities_from_tags(record["tokens"], tags)})
            else:
                results.extend(_generate(loaded, chunk, max_new_tokens, device))
    return results


def _answer_questions(loaded: Loaded, records: list[dict], *, batch_size: int, precision: str) -> list[dict]:
    """Extractive QA: the same windows and span search as ``peftlab eval`` (preprocess + evaluation)."""
    import datasets

    from peftlab.evaluation import qa_answers
    from peftlab.preprocess import tokenize

    raw = datasets.Dataset.from_list(records)
    features = tokenize(raw, TaskKind.QA, loaded.tokenizer, max_length=loaded.manifest.max_length, label_names=None,
                        with_labels=False)
    answers = qa_answers(loaded.model, loaded.tokenizer, features, [r["context"] for r in records],
                         batch_size=batch_size, precision=precision)
    return [{"question": r["question"], **answer} for r, answer in zip(records, answers)]


def entities_from_tags(tokens: list[str], tags: list[str]) -> list[dict[str, Any]]:
    from seqeval.metrics.sequence_labeling import get_entities

    return [{"type": label, "text": " ".join(tokens[start:end + 1]), "start": start, "end": end + 1}
            for label, start, end in get_entities(tags)]


def _generate(loaded: Loaded, chunk: list[dict], max_new_tokens: int, device) -> list[dict]:
    tokenizer, model = loaded.tokenizer, loaded.model
    if loaded.kind == TaskKind.SEQ2SEQ:
        texts = [r["source"] for r in chunk]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(device)
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
        return [{"source": t, "generated": tokenizer.decode(o, skip_special_tokens=True)} for t, o in zip(texts, output)]
    template = chat_template_for(loaded)
    rendered = [render_prompt(loaded, r, template) for r in chunk]
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    # a rendered chat already holds the template's special tokens: the tokenizer adds none of its own
    encoded = tokenizer.pad([tokenizer(text, add_special_tokens=not chat) for text, chat in rendered],
                            return_tensors="pt").to(device)
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[:, encoded["input_ids"].shape[1]:]
    return [{**({"messages": r["messages"]} if "messages" in r else {"prompt": r["prompt"]}),
             "generated": tokenizer.decode(o, skip_special_tokens=True).strip()} for r, o in zip(chunk, new_tokens)]


def chat_template_for(loaded: Loaded) -> str | None:
    """The chat template an adapter trained on conversations saved (None: it was not trained on chats)."""
    return saved_chat_template(loaded.adapter_dir)


def render_prompt(loaded: Loaded, record: dict, template: str | None) -> tuple[str, bool]:
    """(the text generation continues, whether the chat template rendered it).

    A chat adapter (``template``) renders a conversation, or wraps a bare text as the user's turn, through the
    template it was trained with, ending where the assistant's answer starts. A conversation for another
    adapter goes through the tokenizer's own template; other records get the task's prompt template."""
    from peftlab.preprocess import render_chat
    from peftlab.tasks.chat import user_turn

    if "messages" not in record and (template is None or record.get("raw_key") == "prompt"):
        return format_prompt(loaded, record), False
    messages = record.get("messages") or user_turn(format_text(record))
    tokenizer = loaded.tokenizer
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise PeftlabError("This adapter was not trained on conversations and its tokenizer has no chat template: "
                           "give the input as text ({\"text\": ...}) instead of messages.")
    if template is not None and tokenizer.chat_template != template:
        tokenizer.chat_template = template
    return render_chat(tokenizer, messages, "the input", add_generation_prompt=True), True


def format_text(record: dict) -> str:
    """A bare input's text, with its 'input' field (alpaca's second part) after a blank line when given."""
    extra = record.get("input") or ""
    return f"{record['prompt']}\n\n{extra}" if extra.strip() else record["prompt"]


def format_prompt(loaded: Loaded, record: dict) -> str:
    """The task's own prompt template (alpaca's '### Instruction' form) when it has one."""
    if record.get("raw_key") == "prompt" or loaded.manifest.task is None:
        return record["prompt"]
    try:
        from peftlab.tasks import get_task

        task = get_task(loaded.manifest.task, **loaded.manifest.task_options)
    except PeftlabError:
        return record["prompt"]
    formatter = getattr(task, "format_prompt", None)
    return formatter(record["prompt"], record.get("input", "")) if formatter else record["prompt"]


def read_inputs(path: str | Path) -> list[Any]:
    """One JSON value per line (objects or strings), for ``peftlab predict --input``."""
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"Input file '{path}' does not exist.")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise PeftlabError(f"{path}, line {number}: invalid JSON ({error.msg}).") from None
    if not items:
        raise PeftlabError(f"Input file '{path}' has no lines to predict.")
    return items
