"""Checking an adapter folder before the server loads it: complete, safetensors only, built for this base.

Everything here reads files and small JSON; nothing builds a model. The checks that need the model
(tensor names and shapes against the modules they adapt) run when the adapter is loaded on a private
copy of the module tree (see ``engine.py``), before it joins a live model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.artifacts import MANIFEST, RunManifest, read_run
from peftlab.errors import PeftlabError

# Files that are (or may be) pickles: loading one can run arbitrary code, so their presence is refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
NATIVE_CONFIG = "peftlab_adapter_config.json"
MERGE_REPORT = "peftlab_merge.json"
SERVABLE_KINDS = ("seq-cls", "token-cls", "causal-lm", "seq2seq")
PEFT_METHOD_TYPES = {"lora": "LORA", "qlora": "LORA", "ia3": "IA3", "prompt-tuning": "PROMPT_TUNING",
                     "prefix-tuning": "PREFIX_TUNING", "p-tuning-v2": "PREFIX_TUNING", "p-tuning": "P_TUNING"}


@dataclass
class AdapterSpec:
    """A checked adapter folder: what it is and where its weights are (not loaded yet)."""

    name: str
    path: Path  # what the user gave (run folder or peft folder)
    adapter_dir: Path  # the folder with the weights
    manifest: RunManifest
    peft_type: str | None  # LORA, IA3, PROMPT_TUNING, PREFIX_TUNING, P_TUNING; None for peftlab's own methods
    weights: list[Path]
    tensors: dict[str, tuple[int, ...]]  # name -> shape, read from the safetensors headers
    label_names: list[str] | None
    n_outputs: int | None  # classification head width; None for generative kinds
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.manifest.method

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def parameters(self) -> int:
        total = 0
        for shape in self.tensors.values():
            count = 1
            for size in shape:
                count *= int(size)
            total += count
        return total


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise PeftlabError(f"Adapter name {name!r} is not valid: use 1-64 letters, digits, '_', '-' or '.', "
                           "starting with a letter or digit.")
    return name


def _resolved(name: str) -> str:
    from peftlab.models import resolve_model

    try:
        value = resolve_model(name)
    except PeftlabError:
        value = name
    path = Path(value).expanduser()
    return os.path.realpath(path) if path.exists() else value


def same_model(recorded: str, base_name: str, base_resolved: str) -> bool:
    """Whether a recorded model name/folder denotes the served base (alias, folder or Hub id)."""
    if recorded == base_name:
        return True
    return _resolved(recorded) == base_resolved


def _refuse_pickles(folders: list[Path]) -> None:
    found = []
    for folder in folders:
        for entry in sorted(folder.iterdir()):
            if entry.is_file() and entry.suffix.lower() in PICKLE_SUFFIXES:
                found.append(entry.name)
    if found:
        raise PeftlabError(
            f"it contains pickle-based weight files ({', '.join(sorted(set(found)))}); peftlab loads only "
            "safetensors, because unpickling a file can run arbitrary code. Remove them (or re-save the "
            "weights as safetensors).")


def _read_json(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PeftlabError(f"'{path.name}' is not valid JSON ({error}).") from None
    if not isinstance(payload, dict):
        raise PeftlabError(f"'{path.name}' does not hold a JSON object.")
    return payload


def safetensors_shapes(paths: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as error:  # noqa: BLE001 - safetensors raises its own and OSError/ValueError types
            raise PeftlabError(f"'{path.name}' is not a readable safetensors file ({str(error)[:160]}).") from None
    if not shapes:
        raise PeftlabError(f"'{paths[0].name}' holds no tensors.")
    return shapes


def _inspect_merged(name: str, folder: Path, *, base_name: str, base_resolved: str) -> AdapterSpec:
    """A `peftlab merge` output: a standalone model (its own weights), served like an adapter."""
    _refuse_pickles([folder])
    report = _read_json(folder / MERGE_REPORT)
    kind = report.get("kind")
    if kind not in SERVABLE_KINDS:
        raise PeftlabError(f"{MERGE_REPORT} names no servable task kind ({kind!r}).")
    if not (folder / "config.json").is_file():
        raise PeftlabError(f"'{folder}' has no config.json: the merged model is incomplete.")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise PeftlabError(f"'{folder}' has no .safetensors weights (peftlab reads only safetensors).")
    if _read_json(folder / "config.json").get("auto_map"):
        raise PeftlabError("its config.json asks for custom code (auto_map), which peftlab never runs.")
    model = str(report.get("model") or "")
    if model and not same_model(model, base_name, base_resolved):
        raise PeftlabError(f"it was merged from base model '{model}', but this server's base is '{base_name}'.")
    labels = report.get("label_names")
    manifest = RunManifest(method="merged", model=model or base_name, kind=kind, task=report.get("task"),
                           task_options=report.get("task_options") or {}, label_names=labels,
                           is_regression=bool(report.get("is_regression")),
                           max_length=int(report.get("max_length") or 128))
    n_outputs = None
    if kind in ("seq-cls", "token-cls"):
        n_outputs = 1 if manifest.is_regression else len(labels or [])
        if not n_outputs:
            raise PeftlabError(f"{MERGE_REPORT} records no label names for this classification model.")
    return AdapterSpec(name=name, path=folder, adapter_dir=folder, manifest=manifest, peft_type=None,
                       weights=weights, tensors=safetensors_shapes(weights), label_names=labels,
                       n_outputs=n_outputs,
                       notes=[f"merged {report.get('method')} model: its own copy of every weight (nothing shared)."])


def _is_head_key(key: str) -> bool:
    from peftlab.methods.base import HEAD_NAMES

    return "modules_to_save" in key or any(part in HEAD_NAMES for part in key.split("."))


def inspect_adapter(name: str, path: str | os.PathLike, *, base_name: str, base_resolved: str,
                    base_model_type: str | None) -> AdapterSpec:
    """Check an adapter folder for serving on ``base_name``; raise ``PeftlabError`` with the reason."""
    from peftlab.methods import get_method

    check_name(name)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PeftlabError(f"folder '{folder}' does not exist.")
    if (folder / MERGE_REPORT).is_file():
        return _inspect_merged(name, folder, base_name=base_name, base_resolved=base_resolved)
    manifest, adapter_dir = read_run(folder)
    _refuse_pickles([folder, adapter_dir] if adapter_dir != folder else [folder])
    method = get_method(manifest.method, **(manifest.method_options or {}))
    if manifest.kind not in SERVABLE_KINDS:
        raise PeftlabError(f"its task kind '{manifest.kind}' cannot be served.")
    from_peftlab = (folder / MANIFEST).is_file()
    if from_peftlab and not same_model(manifest.model, base_name, base_resolved):
        raise PeftlabError(f"it was trained on base model '{manifest.model}', but this server's base is "
                           f"'{base_name}'. Serve it from a server started with --base {manifest.model}.")
    notes: list[str] = []
    peft_type = PEFT_METHOD_TYPES.get(method.name)
    if peft_type is not None:
        config_path, weights_path = adapter_dir / PEFT_CONFIG, adapter_dir / PEFT_WEIGHTS
        if not config_path.is_file():
            raise PeftlabError(f"'{adapter_dir}' has no {PEFT_CONFIG}: the adapter is incomplete.")
        if not weights_path.is_file():
            raise PeftlabError(f"'{adapter_dir}' has no {PEFT_WEIGHTS}: the adapter is incomplete (peftlab reads "
                               "only safetensors weights).")
        config = _read_json(config_path)
        recorded_type = str(config.get("peft_type", "")).upper()
        if recorded_type != peft_type:
            raise PeftlabError(f"{PEFT_CONFIG} says peft_type '{recorded_type}', but the run is a '{method.name}' "
                               f"run (peft_type {peft_type}): the folder was modified.")
        recorded_base = str(config.get("base_model_name_or_path") or "")
        # peft records the folder the base was loaded from; a folder that exists here must be the base.
        # (A path from another machine is judged by the run manifest above.)
        if recorded_base and (not from_peftlab or Path(recorded_base).exists()) and not same_model(
                recorded_base, base_name, base_resolved):
            raise PeftlabError(f"its {PEFT_CONFIG} says it was built for base model '{recorded_base}', but this "
                               f"server's base is '{base_name}'.")
        if config.get("auto_mapping") or config.get("trust_remote_code"):
            raise PeftlabError(f"its {PEFT_CONFIG} asks for custom code (auto_mapping), which peftlab never runs.")
        weights = [weights_path]
        if method.name == "qlora":
            notes.append("qlora adapter served on the full-precision base: outputs differ from the 4-bit trained "
                         "model by the base's quantisation error.")
    elif method.name == "full":
        if not (adapter_dir / "config.json").is_file():
            raise PeftlabError(f"'{adapter_dir}' has no config.json: the fully fine-tuned model is incomplete.")
        weights = sorted(adapter_dir.glob("*.safetensors"))
        if not weights:
            raise PeftlabError(f"'{adapter_dir}' has no .safetensors weights (peftlab reads only safetensors).")
        config = _read_json(adapter_dir / "config.json")
        if config.get("auto_map"):
            raise PeftlabError("its config.json asks for custom code (auto_map), which peftlab never runs.")
        if base_model_type and config.get("model_type") not in (None, base_model_type):
            raise PeftlabError(f"it is a {config.get('model_type')} model; this server's base is a "
                               f"{base_model_type} model.")
        notes.append("full fine-tune: its own copy of every weight (nothing shared with the base).")
    else:
        config_path, weights_path = adapter_dir / NATIVE_CONFIG, adapter_dir / PEFT_WEIGHTS
        if not config_path.is_file():
            raise PeftlabError(f"'{adapter_dir}' has no {NATIVE_CONFIG}: the adapter is incomplete.")
        if not weights_path.is_file():
            raise PeftlabError(f"'{adapter_dir}' has no {PEFT_WEIGHTS}: the adapter is incomplete.")
        config = _read_json(config_path)
        saved_type = (config.get("base_model") or {}).get("model_type")
        if base_model_type and saved_type and saved_type != base_model_type:
            raise PeftlabError(f"it was trained on a {saved_type} model; this server's base is a {base_model_type} "
                               "model.")
        weights = [weights_path]
        if method.name == "adapter":
            notes.append("bottleneck adapter: served on its own module tree over the shared base weights "
                         "(no batching with other adapters).")
        if method.name == "bitfit":
            notes.append("bitfit: its own copy of the bias vectors; all other weights shared with the base.")
    tensors = safetensors_shapes(weights)

    label_names = manifest.label_names
    n_outputs: int | None = None
    if manifest.kind in ("seq-cls", "token-cls"):
        if manifest.is_regression:
            n_outputs = 1
        else:
            if label_names is None:
                from peftlab.inference import labels_from_weights

                label_names = labels_from_weights(adapter_dir)
            if not label_names:
                raise PeftlabError("it is a classification adapter without label names or a trained head.")
            n_outputs = len(label_names)
        if peft_type is not None and not any(_is_head_key(key) for key in tensors):
            raise PeftlabError("it has no trained classification head (modules_to_save) in its weights.")
    return AdapterSpec(name=name, path=folder, adapter_dir=adapter_dir, manifest=manifest, peft_type=peft_type,
                       weights=weights, tensors=tensors, label_names=label_names, n_outputs=n_outputs, notes=notes)
