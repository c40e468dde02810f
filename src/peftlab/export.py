"""``peftlab export``: a trained model as an ONNX graph that onnxruntime runs, verified against PyTorch.

Sources:

* ``--model DIR``: a merged model folder (``peftlab merge --output``; any transformers classification /
  causal-LM folder with safetensors weights works);
* ``--adapter DIR``: a ``peftlab train`` folder. Mergeable methods (lora, ia3, bitfit, full, qlora) are
  merged in memory first, so the graph is the plain base architecture. Other methods are exported
  unmerged: the bottleneck adapter traces as ordinary layers; prompt tuning, P-Tuning and prefix methods
  go through peft's forward, and when the traced graph does not reproduce PyTorch (or the trace fails)
  the command says so and suggests ``peftlab serve``.

The exporter is torch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``, opset 17): the
torch.export-based default of torch >= 2.9 needs the ``onnxscript`` package, which peftlab does not
depend on. The graph has named inputs (``input_ids``, ``attention_mask`` and, for BERT-style models,
``token_type_ids``), one output ``logits``, and dynamic ``batch`` and ``sequence`` axes. Causal LMs are
exported without a key/value cache (full-sequence logits: scoring, or step-by-step decoding).

Verification: onnxruntime (CPU) and PyTorch run the same inputs at two different batch sizes and
sequence lengths; the largest absolute logit difference must be within ``tolerance`` (default 1e-4).

``--quantize int8`` adds ``model.int8.onnx`` (``onnxruntime.quantization.quantize_dynamic``: int8 weights,
activations quantised on the fly) and scores fp32 and int8 on the task's dev set (the manifest's task,
data from ``--data-dir`` / ``$PEFTLAB_DATA_DIR``), with both file sizes, in ``export_report.json``.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from peftlab.artifacts import RunManifest, prepare_output_folder, write_json
from peftlab.errors import PeftlabError
from peftlab.version import __version__
from peftlab.kinds import TaskKind

REPORT_NAME = "export_report.json"
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
EXPORTER = "torch.onnx.export (TorchScript exporter, dynamo=False)"
KIND_BY_ARCHITECTURE = (("ForSequenceClassification", TaskKind.SEQ_CLS), ("ForTokenClassification", TaskKind.TOKEN_CLS),
                        ("ForCausalLM", TaskKind.CAUSAL_LM), ("LMHeadModel", TaskKind.CAUSAL_LM),
                        ("ForConditionalGeneration", TaskKind.SEQ2SEQ))


def _logits_module(model, kind: str, input_names: list[str]):
    """An nn.Module with forward(input_ids, attention_mask[, token_type_ids]) -> logits (a fixed signature)."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *tensors):
            inputs = dict(zip(input_names, tensors))
            if kind == TaskKind.CAUSAL_LM:
                inputs["use_cache"] = False
            return self.inner(**inputs).logits

    wrapper = LogitsOnly(model)
    wrapper.eval()
    return wrapper


def kind_from_config(config) -> str:
    for architecture in getattr(config, "architectures", None) or []:
        for suffix, kind in KIND_BY_ARCHITECTURE:
            if architecture.endswith(suffix):
                return kind
    raise PeftlabError("Cannot tell what kind of model this is from its config.json (architectures: "
                       f"{getattr(config, 'architectures', None)}): export a folder written by `peftlab merge`.")


def _load_model_folder(folder: Path):
    """(model, tokenizer, manifest-like RunManifest, source description) for a merged model folder."""
    import torch
    import transformers

    from peftlab.merge import read_merge_report

    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise PeftlabError(f"'{folder}' is not a model folder (no config.json). Pass the --output of `peftlab merge`.")
    if not any(folder.glob("*.safetensors")):
        raise PeftlabError(f"'{folder}' has no .safetensors weights; peftlab reads only safetensors files.")
    report = read_merge_report(folder) or {}
    config = transformers.AutoConfig.from_pretrained(str(folder))
    kind = report.get("kind") or kind_from_config(config)
    from peftlab.models import AUTO_CLASSES

    auto_class = getattr(transformers, AUTO_CLASSES[kind])
    try:
        model = auto_class.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise PeftlabError(f"Could not load the model in '{folder}' ({str(error).splitlines()[0][:200]}).") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    labels = report.get("label_names")
    if labels is None and TaskKind(kind).is_classification and getattr(config, "id2label", None):
        labels = [config.id2label[i] for i in sorted(config.id2label)]
    manifest = RunManifest(
        method=report.get("method", "merged"), model=report.get("model", str(folder)), kind=kind,
        task=report.get("task"), label_names=labels, is_regression=bool(report.get("is_regression", False)),
        max_length=int(report.get("max_length", 128)),
        task_options=(report.get("task_options") or {}),
    )
    model.eval()
    return model, tokenizer, manifest


def export(*, adapter: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
           output: str | os.PathLike, fmt: str = "onnx", quantize: str | None = None, data_dir: str | None = None,
           tolerance: float = 1e-4, samples: int = 8, max_eval_samples: int | None = None,
           quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Export to ONNX, verify with onnxruntime, optionally add an int8 variant; returns the report. An earlier
    export at ``output`` is replaced only with ``overwrite``."""
    import torch


    if fmt != "onnx":
        raise PeftlabError(f"Unknown export format '{fmt}': peftlab exports onnx.")
    if quantize not in (None, "int8"):
        raise PeftlabError(f"Unknown --quantize '{quantize}': the choice is int8.")
    if (adapter is None) == (model is None):
        raise PeftlabError("Pass exactly one of --adapter (a train folder) or --model (a merged model folder).")
    _require_onnx()
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))
    source = Path(adapter if adapter is not None else model).expanduser().resolve()
    out = prepare_output_folder(output, source=source, marker=REPORT_NAME, command="export", overwrite=overwrite)

    notes: list[str] = []
    if adapter is not None:
        from peftlab.inference import checked_adapter, load_trained
        from peftlab.merge import merged_model

        checked_adapter(adapter)  # before loading anything: the same check as eval, predict, merge and serve
        loaded = load_trained(adapter, device="cpu")
        manifest, tokenizer = loaded.manifest, loaded.tokenizer
        method = loaded.method
        if method.mergeable:
            if method.merge_note():
                notes.append(method.merge_note())
            network = merged_model(loaded)
            merged = True
        else:
            network = loaded.model
            merged = False
            notes.append(f"'{method.name}' is not mergeable: exported unmerged (its extra computation is in the graph).")
        source_type = "run"
    else:
        network, tokenizer, manifest = _load_model_folder(source)
        merged, source_type = True, "model"
        method = None
    kind = manifest.kind
    if kind == TaskKind.QA:
        raise PeftlabError("ONNX export of extractive question-answering (qa) models is not supported by peftlab "
                           "(their two span outputs need their own post-processing): use `peftlab predict`, or "
                           "`peftlab merge` and load the merged folder with transformers.")
    if kind == TaskKind.SEQ2SEQ:
        raise PeftlabError("ONNX export of encoder-decoder (seq2seq) models is not supported by peftlab: export "
                           "seq-cls, token-cls or causal-lm models.")
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    network.eval()

    from peftlab.merge import encode_records, sample_records

    records, sample_source = sample_records(manifest, max(2, samples), data_dir)
    probe = encode_records(tokenizer, kind, records[:2], manifest.max_length)
    input_names = [name for name in INPUT_NAMES if name in probe]
    wrapper = _logits_module(network, kind, input_names)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    dynamic_axes["logits"] = {0: "batch"} if kind == TaskKind.SEQ_CLS else {0: "batch", 1: "sequence"}

    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    what = (f"'{method.name}' adapter (unmerged)" if method is not None and not merged else "model")
    try:
        onnx_path = staging / MODEL_FILE
        started = time.perf_counter()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapper, tuple(probe[name] for name in input_names), str(onnx_path),
                                  dynamo=False, opset_version=OPSET, input_names=input_names,
                                  output_names=["logits"], dynamic_axes=dynamic_axes, do_constant_folding=True)
        except Exception as error:  # noqa: BLE001 - the tracer raises many types
            raise PeftlabError(
                f"Could not export the {what} to ONNX ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
                + ("Serve it with `peftlab serve` instead." if not merged else "")) from None
        export_seconds = time.perf_counter() - started
        wrapper.eval()  # the TorchScript exporter restores the wrapper's training flag on every submodule
        network.eval()

        session = _session(onnx_path)
        difference, checked = _verify(session, wrapper, tokenizer, kind, records, manifest.max_length, input_names)
        if not difference <= tolerance:
            raise PeftlabError(
                f"The ONNX graph of the {what} does not reproduce PyTorch: max |onnxruntime - torch| = "
                f"{difference:.3g} on {checked} (tolerance {tolerance:g}); nothing was written. "
                + ("Its extra inputs do not trace into a graph that generalises across batch sizes and lengths: "
                   "serve it with `peftlab serve` instead." if not merged else ""))
        tokenizer.save_pretrained(str(staging))
        _base_config(network).save_pretrained(str(staging))  # config.json with id2label, for ONNX users

        report: dict[str, Any] = {
            "source": str(source),
            "source_type": source_type,
            "method": manifest.method,
            "merged": merged,
            "model": manifest.model,
            "kind": kind,
            "task": manifest.task,
            "label_names": manifest.label_names,
            "max_length": manifest.max_length,
            "format": "onnx",
            "exporter": EXPORTER,
            "opset": OPSET,
            "inputs": input_names,
            "outputs": ["logits"],
            "dynamic_axes": dynamic_axes,
            "files": {"fp32": MODEL_FILE},
            "fp32_bytes": onnx_path.stat().st_size,
            "export_seconds": round(export_seconds, 2),
            "verification": {"runtime": "onnxruntime CPUExecutionProvider", "max_abs_diff": difference,
                             "tolerance": tolerance, "inputs": checked, "sample_source": sample_source},
            "notes": notes,
            "peftlab_version": __version__,
            "torch_version": torch.__version__,
            "onnxruntime_version": _ort_version(),
        }
        if quantize == "int8":
            report["quantization"] = _quantize_int8(staging, session, tokenizer, manifest, data_dir,
                                                    max_eval_samples, input_names)
            report["files"]["int8"] = INT8_FILE
        write_json(staging / REPORT_NAME, report)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    say(f"Exported the {what} to '{out / MODEL_FILE}' ({_mb(report['fp32_bytes'])} MB, opset {OPSET}, dynamic batch "
        "and sequence axes).")
    say(f"onnxruntime vs PyTorch on {checked}: max |difference| = {difference:.3g} (tolerance {tolerance:g}).")
    quant = report.get("quantization")
    if quant:
        say(f"int8 (dynamic quantisation): '{out / INT8_FILE}' {_mb(quant['int8_bytes'])} MB vs fp32 "
            f"{_mb(quant['fp32_bytes'])} MB.")
        if quant.get("metric_name"):
            agreement = quant.get("prediction_agreement")
            say(f"Dev {quant['metric_name']} on {quant['eval_examples']} examples: fp32 {quant['fp32_metric']:.4f}, "
                f"int8 {quant['int8_metric']:.4f}"
                + (f"; int8 agrees with fp32 on {100 * agreement:.1f}% of predictions" if agreement is not None else "")
                + f" ({quant['int8_ms_per_example']:.2f} vs {quant['fp32_ms_per_example']:.2f} ms/example).")
        else:
            say(f"No dev-set score: {quant.get('metric_unavailable')}")
    return report


# ---- helpers ----------------------------------------------------------------------------------------

def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise PeftlabError("ONNX export needs the onnx and onnxruntime packages: pip install 'peftlab[export]'.") from None


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f}"


def _base_config(network):
    """The transformers config to ship beside the graph (the base model's for a peft wrapper)."""
    from peftlab.methods.compat import unwrap

    return unwrap(network).config


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(encoded: dict, input_names: list[str]) -> dict:
    return {name: encoded[name].numpy() for name in input_names}


def _verify(session, wrapper, tokenizer, kind, records, max_length, input_names) -> tuple[float, str]:
    """max |ORT - torch| over two batches of different size and length (real tokens only)."""
    import torch

    from peftlab.merge import encode_records, max_abs_difference

    # all samples together (padded to the longest), then the shortest alone: different batch and sequence sizes
    shortest = min(range(len(records)), key=lambda i: len(str(records[i])))
    batches = [records, [records[shortest]]]
    worst = 0.0
    shapes = []
    for batch in batches:
        encoded = encode_records(tokenizer, kind, batch, max_length)
        with torch.no_grad():
            expected = wrapper(*(encoded[name] for name in input_names)).float()
        got = torch.from_numpy(session.run(["logits"], _feed(encoded, input_names))[0]).float()
        worst = max(worst, max_abs_difference(expected, got, encoded, kind))
        shapes.append("x".join(str(s) for s in encoded["input_ids"].shape))
    return worst, f"{len(records) + 1} inputs in batches of shape {' and '.join(shapes)}"


def _dev_records(manifest: RunManifest, data_dir, limit):
    """(task, dev records with references) or (None, reason)."""
    if not TaskKind(manifest.kind).is_classification:
        return None, f"dev-set scoring covers classification and tagging models, not {manifest.kind}."
    if not manifest.task:
        return None, "the model does not record its task (export a `peftlab merge` output or a train folder)."
    try:
        from peftlab.tasks import get_task
        from peftlab.tasks.base import select

        task = get_task(manifest.task, **(manifest.task_options or {}))
        dev = select(task.load("dev", data_dir), limit, 42)
    except PeftlabError as error:
        return None, f"the {manifest.task} dev set could not be read ({error})"
    return (task, [dev[i] for i in range(len(dev))]), None


def ort_scores(session, tokenizer, task, rows, manifest: RunManifest, input_names, batch_size: int = 32):
    """The task's dev metrics for an onnxruntime session, and milliseconds per example."""
    import numpy as np

    from peftlab.merge import encode_records

    kind = manifest.kind
    order = sorted(range(len(rows)), key=lambda i: -len(str(rows[i].get("text") or rows[i].get("tokens"))))
    predictions: dict[int, Any] = {}
    references: dict[int, Any] = {}
    labels = manifest.label_names or []
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        records = [TaskKind(kind).record_from_example(rows[i]) for i in indices]
        encoded = encode_records(tokenizer, kind, records, manifest.max_length)
        logits = session.run(["logits"], _feed(encoded, input_names))[0]
        for row, index in enumerate(indices):
            if kind == TaskKind.SEQ_CLS:
                if manifest.is_regression:
                    predictions[index] = float(np.asarray(logits[row]).reshape(-1)[0])
                    references[index] = float(rows[index]["label"])
                else:
                    predictions[index] = int(np.argmax(logits[row]))
                    references[index] = labels.index(str(rows[index]["label"]))
            else:
                tags, previous = [], None
                word_ids = _word_ids(tokenizer, records[row]["tokens"], manifest.max_length)
                for position, word in enumerate(word_ids):
                    if word is not None and word != previous:
                        tags.append(labels[int(np.argmax(logits[row, position]))])
                    previous = word
                tags += ["O"] * (len(records[row]["tokens"]) - len(tags))
                predictions[index] = tags
                references[index] = list(rows[index]["tags"])
    seconds = time.perf_counter() - started
    keys = sorted(predictions)
    ordered = [predictions[i] for i in keys]
    scores = task.compute_metrics(ordered, [references[i] for i in keys])
    return scores, 1000.0 * seconds / max(1, len(rows)), ordered


def _word_ids(tokenizer, tokens, max_length):
    return tokenizer([tokens], is_split_into_words=True, truncation=True, max_length=max_length).word_ids(0)


def _quantize_int8(folder: Path, fp32_session, tokenizer, manifest, data_dir, limit, input_names) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path, int8_path = folder / MODEL_FILE, folder / INT8_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    int8_session = _session(int8_path)
    result: dict[str, Any] = {
        "method": "onnxruntime.quantization.quantize_dynamic (int8 weights, per-tensor; activations quantised "
                  "at run time)",
        "fp32_bytes": fp32_path.stat().st_size,
        "int8_bytes": int8_path.stat().st_size,
    }
    result["size_ratio"] = round(result["int8_bytes"] / result["fp32_bytes"], 3)
    loaded, reason = _dev_records(manifest, data_dir, limit)
    if loaded is None:
        result["metric_unavailable"] = reason
        return result
    task, rows = loaded
    fp32_scores, fp32_ms, fp32_predictions = ort_scores(fp32_session, tokenizer, task, rows, manifest, input_names)
    int8_scores, int8_ms, int8_predictions = ort_scores(int8_session, tokenizer, task, rows, manifest, input_names)
    if manifest.kind == TaskKind.SEQ_CLS and not manifest.is_regression:
        same = sum(a == b for a, b in zip(fp32_predictions, int8_predictions))
        agreement = same / max(1, len(fp32_predictions))
    elif manifest.kind == TaskKind.TOKEN_CLS:
        pairs = [(a, b) for x, y in zip(fp32_predictions, int8_predictions) for a, b in zip(x, y)]
        agreement = sum(a == b for a, b in pairs) / max(1, len(pairs))
    else:
        agreement = None
    result.update({
        "task": task.name,
        "metric_name": task.metric_name,
        "eval_examples": len(rows),
        "fp32_metric": fp32_scores[task.metric_name],
        "int8_metric": int8_scores[task.metric_name],
        "metric_change": int8_scores[task.metric_name] - fp32_scores[task.metric_name],
        "prediction_agreement": agreement,  # share of dev predictions (tags for tagging) int8 and fp32 agree on
        "fp32_metrics": fp32_scores,
        "int8_metrics": int8_scores,
        "fp32_ms_per_example": round(fp32_ms, 3),
        "int8_ms_per_example": round(int8_ms, 3),
    })
    return result
