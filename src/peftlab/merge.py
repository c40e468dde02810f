"""``peftlab merge``: fold a trained adapter into the base weights and save a standalone model.

The output folder is an ordinary transformers checkpoint (``config.json`` with the label names,
``model.safetensors``, the tokenizer files) that ``AutoModelFor<Kind>.from_pretrained(OUT)`` loads with
neither peft nor peftlab installed, plus ``peftlab_merge.json`` (where it came from and how well the
merge was verified).

Which methods merge (``Method.mergeable``):

* ``lora``: W + (alpha/r)·B·A (peft ``merge_and_unload``); ``ia3``: W·diag(l) (peft);
* ``bitfit`` and ``full``: the trained model already *is* a plain model;
* ``qlora``: folding B·A into 4-bit weights would re-quantise the sum and lose most of the update, so
  the merge goes into a float32 copy of the base (see ``peftlab.methods.qlora``); a note says so.

``adapter`` (bottleneck MLPs with a non-linearity) and the prompt-learning methods (virtual tokens and
per-layer prefixes are extra inputs, not weight changes) cannot merge: the command says why in one
sentence and points to ``peftlab serve`` / ``peftlab export``.

Verification: the unmerged model and the merged model *reloaded from the saved folder* run on the same
inputs (a sample of the task's dev set, or fixed synthetic text when the data is not available); the
largest absolute difference of their logits (over real, non-padding positions) must be within
``tolerance`` times the outputs' scale (the largest |unmerged logit|, counted as 1 when smaller), else nothing
is written and the command fails. Relative, because float32 merges are exact to a few parts in a million of
the output: a classifier's logits of size ~3 differ by ~1e-7, a causal LM's logits of size ~30 by ~1e-4; a
wrong merge is off by orders of magnitude more.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from peftlab.artifacts import (ADAPTER_DIR, RunManifest, prepare_output_folder, read_json_or_none, read_run,
                               write_json)
from peftlab.errors import PeftlabError
from peftlab.version import __version__
from peftlab.kinds import TaskKind

REPORT_NAME = "peftlab_merge.json"

# Fixed inputs for when the task's dev set cannot be read (no data folder, no Hub).
SYNTHETIC_TEXTS = [
    "a gripping, funny and beautifully acted film",
    "the plot is thin and the jokes fall flat",
    "I would watch it again tomorrow.",
    "Nothing in this movie works, not even the music.",
    "The committee approved the new budget on Tuesday in Geneva.",
    "She said the results were better than expected.",
    "an uneven but ultimately rewarding experience",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "The quick brown fox jumps over the lazy dog.",
    "Stocks fell sharply after the announcement by Apple in New York.",
    "it is neither the best nor the worst of the series",
    "Explain why the sky is blue in one sentence.",
    "terrible",
    "Paris",
    "a masterpiece of quiet, patient storytelling that rewards attention from the first scene to the last",
]


def not_mergeable_message(method, adapter: str | os.PathLike) -> str:
    """One sentence: why this method cannot merge, and what to do instead."""
    why = method.why_not_mergeable().strip().rstrip(".")
    return (f"Method '{method.name}' cannot be merged into the base weights: {why}; serve it unmerged instead "
            f"(peftlab serve --base BASE --adapter NAME={adapter}) or export it as it is "
            f"(peftlab export --adapter {adapter} --format onnx --output DIR).")


# ---- sample inputs --------------------------------------------------------------------------------

def sample_records(manifest: RunManifest, count: int, data_dir: str | None = None) -> tuple[list[dict], str]:
    """Up to ``count`` inputs in the normalised record form of ``manifest.kind`` and where they came from.

    The first ``count`` examples of the task's dev set when it can be read; else fixed synthetic text.
    """
    count = max(1, int(count))
    if manifest.task:
        try:
            from peftlab.tasks import get_task

            task = get_task(manifest.task, **(manifest.task_options or {}))
            if task.kind == manifest.kind:
                dev = task.load("dev", data_dir)
                rows = [dev[i] for i in range(min(count, len(dev)))]
                records = [TaskKind(manifest.kind).record_from_example(row) for row in rows]
                if records:
                    return records, f"{task.name} dev set (first {len(records)} examples)"
        except Exception:  # noqa: BLE001 - no data here (offline, no folder): fall back to synthetic text
            pass
    texts = [SYNTHETIC_TEXTS[i % len(SYNTHETIC_TEXTS)] for i in range(count)]
    kind = manifest.kind
    if kind == TaskKind.TOKEN_CLS:
        records = [{"tokens": t.split()} for t in texts]
    elif kind == TaskKind.CAUSAL_LM:
        records = [{"prompt": t} for t in texts]
    elif kind == TaskKind.SEQ2SEQ:
        records = [{"source": t} for t in texts]
    elif kind == TaskKind.QA:  # each text asked about with another one as the question
        records = [{"question": SYNTHETIC_TEXTS[(i + 7) % len(SYNTHETIC_TEXTS)], "context": t}
                   for i, t in enumerate(texts)]
    else:
        records = [{"text": t, "text_pair": None} for t in texts]
    return records, f"{len(records)} synthetic texts (the task's dev set was not available)"


def encode_records(tokenizer, kind: str, records: list[dict], max_length: int) -> dict:
    """Model inputs (padded ``pt`` tensors) for records, tokenised the way ``peftlab predict`` does."""
    if kind == TaskKind.TOKEN_CLS:
        return dict(tokenizer([r["tokens"] for r in records], is_split_into_words=True, truncation=True,
                              max_length=max_length, padding=True, return_tensors="pt"))
    if kind == TaskKind.CAUSAL_LM:
        return dict(tokenizer([r["prompt"] for r in records], truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt"))
    if kind == TaskKind.SEQ2SEQ:
        encoded = dict(tokenizer([r["source"] for r in records], truncation=True, max_length=max_length,
                                 padding=True, return_tensors="pt"))
        return encoded
    if kind == TaskKind.QA:  # every window of every context (long contexts give several rows), as predict sees them
        from peftlab.preprocess import encode_qa

        windows = encode_qa(tokenizer, [r["question"] for r in records], [r["context"] for r in records],
                            max_length=max_length)
        inputs = {k: windows[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in windows}
        return dict(tokenizer.pad(inputs, return_tensors="pt"))
    pairs = [r.get("text_pair") for r in records]
    has_pairs = any(p is not None for p in pairs)
    return dict(tokenizer([r["text"] for r in records], [p or "" for p in pairs] if has_pairs else None,
                          truncation=True, max_length=max_length, padding=True, return_tensors="pt"))


def model_logits(model, encoded: dict, kind: str):
    """float32 logits on CPU for encoded inputs (seq2seq: teacher-forced on a short decoder prefix; qa: start and
    end logits stacked on a last axis of 2)."""
    import torch

    from peftlab.evaluation import model_device

    device = model_device(model)
    inputs = {k: v.to(device) for k, v in encoded.items()}
    if kind == TaskKind.SEQ2SEQ:
        start = getattr(getattr(model, "config", None), "decoder_start_token_id", None) or 0
        prefix = inputs["input_ids"][:, :8]
        inputs["decoder_input_ids"] = torch.cat(
            [torch.full((prefix.shape[0], 1), int(start), dtype=prefix.dtype, device=device), prefix], dim=1)
    with torch.no_grad():
        outputs = model(**inputs)
    if kind == TaskKind.QA:  # (batch, tokens, 2): start and end logits side by side
        return torch.stack([outputs.start_logits, outputs.end_logits], dim=-1).float().cpu()
    return outputs.logits.float().cpu()


def max_abs_difference(reference, other, encoded: dict, kind: str) -> float:
    """Largest |a - b| over the outputs that mean something (per-token outputs: real tokens only)."""
    import torch

    if reference.shape != other.shape:
        raise PeftlabError(f"merged and unmerged outputs have different shapes ({tuple(other.shape)} vs "
                           f"{tuple(reference.shape)}).")
    difference = (reference - other).abs()
    if kind != TaskKind.SEQ2SEQ and "attention_mask" in encoded and difference.dim() == 3:  # per-token outputs
        mask = encoded["attention_mask"].bool()
        difference = difference[mask]
    if difference.numel() == 0:
        return 0.0
    if not torch.isfinite(difference).all():
        return float("inf")
    return float(difference.max())


# ---- merging --------------------------------------------------------------------------------------

def auto_class_name(kind: str) -> str:
    from peftlab.models import AUTO_CLASSES

    return AUTO_CLASSES[kind]


def prepare_config(model, manifest: RunManifest) -> None:
    """A config a plain transformers install reads: label names, no quantisation, no peftlab attributes."""
    config = model.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            try:
                delattr(config, attribute)
            except AttributeError:
                pass
    if TaskKind(manifest.kind).is_classification:
        if manifest.is_regression:
            config.num_labels = 1
            config.problem_type = "regression"
        elif manifest.label_names:
            config.id2label = {index: str(label) for index, label in enumerate(manifest.label_names)}
            config.label2id = {str(label): index for index, label in enumerate(manifest.label_names)}
    for attribute in ("_peftlab_kind",):
        model.__dict__.pop(attribute, None)


def merged_model(loaded) -> Any:
    """The loaded (unmerged) model with its method folded in: a plain transformers model, float32, eval."""
    import torch

    method = loaded.method
    if not method.mergeable:
        raise PeftlabError(not_mergeable_message(method, loaded.adapter_dir.parent
                                                 if loaded.adapter_dir.name == ADAPTER_DIR else loaded.adapter_dir))
    model = method.merge(loaded.model)
    from peftlab.methods.compat import remove_prefix_compat

    remove_prefix_compat(model)
    if any(p.dtype != torch.float32 and p.is_floating_point() for p in model.parameters()):
        model = model.to(torch.float32)
    prepare_config(model, loaded.manifest)
    model.eval()
    return model


def merge(adapter: str | os.PathLike, output: str | os.PathLike, *, samples: int = 16, tolerance: float = 1e-4,
          data_dir: str | None = None, quiet: bool = False, overwrite: bool = False, push: str | None = None,
          private: bool = False) -> dict[str, Any]:
    """Merge ``adapter`` (a ``peftlab train`` folder or a peft adapter folder) into a standalone model at
    ``output``; verify it against the unmerged model; return (and write) the report. An earlier merge output
    at ``output`` is replaced only with ``overwrite``. The output gets a model card (README.md); ``push``
    (``ORG/NAME``) uploads it to the Hugging Face Hub afterwards (checked before any work: offline, it stops
    at once)."""
    import torch
    import transformers

    from peftlab.hub import local_or_hub
    from peftlab.inference import checked_adapter, load_trained, saved_chat_template
    from peftlab.methods import get_method, get_method_class

    adapter = local_or_hub(adapter)  # a Hub repository id (peftlab push) works like a folder
    recorded, _ = read_run(adapter)  # what the method is decides first whether there is anything to merge
    if not get_method_class(recorded.method).mergeable:
        raise PeftlabError(not_mergeable_message(get_method(recorded.method), adapter))
    checked = checked_adapter(adapter)  # before any work: the same check as eval, predict, export and serve
    manifest, adapter_dir = checked.manifest, checked.adapter_dir
    method = get_method(manifest.method, **(manifest.method_options or {}))
    if samples < 1:
        raise PeftlabError(f"--samples must be at least 1; got {samples}.")
    if not tolerance >= 0:
        raise PeftlabError(f"--tolerance must be a non-negative number; got {tolerance}.")
    if push is not None:
        from peftlab.hub import check_reachable, check_repo_id

        check_repo_id(push, "--push")
        check_reachable()
    source = Path(adapter).expanduser().resolve()
    out = prepare_output_folder(output, source=source, marker=REPORT_NAME, command="merge", overwrite=overwrite)

    notes: list[str] = []
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))
    if method.merge_note():
        note = f"warning: {method.merge_note()}"
        notes.append(note)
        print(note, file=sys.stderr, flush=True)

    loaded = load_trained(adapter, device="cpu")
    kind = manifest.kind
    records, sample_source = sample_records(loaded.manifest, samples, data_dir)
    encoded = encode_records(loaded.tokenizer, kind, records, loaded.manifest.max_length)
    reference = model_logits(loaded.model, encoded, kind)

    merged = merged_model(loaded)
    staging = out.parent / f".{out.name}.merge-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        merged.save_pretrained(str(staging))
        template = saved_chat_template(loaded.adapter_dir)
        if template:  # a chat adapter: the merged model's tokenizer renders conversations as training did
            loaded.tokenizer.chat_template = template
        loaded.tokenizer.save_pretrained(str(staging))
        del merged, loaded
        auto_class = getattr(transformers, auto_class_name(kind))
        reloaded = auto_class.from_pretrained(str(staging), dtype=torch.float32)
        reloaded.eval()
        difference = max_abs_difference(reference, model_logits(reloaded, encoded, kind), encoded, kind)
        del reloaded
        scale = max(1.0, max_abs_difference(reference, torch.zeros_like(reference), encoded, kind))
        allowed = tolerance * scale
        if not difference <= allowed:
            raise PeftlabError(
                f"The merged model does not reproduce the adapter: max |merged - unmerged| = {difference:.3g} on "
                f"{len(records)} inputs ({sample_source}), above the tolerance {tolerance:g} x the largest |output| "
                f"{scale:.3g} = {allowed:.3g}. Nothing was written to the output folder.")
        report = {
            "source_adapter": str(source),
            "adapter_dir": str(Path(adapter_dir).resolve()),
            "method": manifest.method,
            "model": manifest.model,
            "kind": kind,
            "task": manifest.task,
            "task_options": manifest.task_options,
            "label_names": manifest.label_names,
            "is_regression": manifest.is_regression,
            "max_length": manifest.max_length,
            "auto_class": auto_class_name(kind),
            "max_abs_diff": difference,
            "tolerance": tolerance,
            "output_scale": scale,
            "allowed_abs_diff": allowed,
            "samples": len(records),
            "sample_source": sample_source,
            "notes": notes,
            "peftlab_version": __version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        }
        write_json(staging / REPORT_NAME, report)
        write_card(staging, report)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"Merged {manifest.method} adapter '{source}' into '{out}' ({report['auto_class']}).")
    say(f"Verified on {len(records)} inputs ({sample_source}): max |merged - unmerged| = {difference:.3g} "
        f"(allowed {allowed:.3g}: tolerance {tolerance:g} x largest |output| {scale:.3g}).")
    say(f"Load it with: transformers.{report['auto_class']}.from_pretrained('{out}')")
    if push is not None:
        from peftlab.hub import push as push_to_hub

        report["pushed_to"] = push_to_hub(out, push, private=private, quiet=quiet)
    return report


def write_card(folder: Path, report: dict[str, Any]) -> None:
    """The merged model's README.md (Hub metadata, dev metrics of the source run, how to load it). A card that
    cannot be written is a warning: the merged weights are what was asked for."""
    from peftlab.modelcard import write_merged_card

    try:
        write_merged_card(folder, report)
    except Exception as error:  # noqa: BLE001
        print(f"warning: no model card written ({type(error).__name__}: {str(error)[:200]})", file=sys.stderr,
              flush=True)


def read_merge_report(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``peftlab_merge.json`` of a merged folder, or None for a folder merged elsewhere."""
    return read_json_or_none(Path(folder) / REPORT_NAME)
