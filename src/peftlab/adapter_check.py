"""One check of an adapter folder before anything loads it: eval, predict, merge, export and serve.

``check_adapter(path)`` reads small JSON files and safetensors *headers* only (no tensor data, no model)
and returns a :class:`CheckedAdapter` or raises :class:`AdapterRefused` with one sentence. It checks:

* what the folder is: a ``peftlab train`` run (``peftlab.json``), a plain peft adapter folder
  (``adapter_config.json``) or a ``peftlab merge`` output (``peftlab_merge.json``);
* that the run's ``adapter_dir`` and every file read stay inside the folder (resolved: no ``..``,
  absolute path or symlink leads out);
* the method the manifest names, and that the peft type agrees three ways: the method's declared
  ``peft_type``, ``adapter_config.json``'s ``peft_type`` and the tensor names in the weights (a LoRA
  adapter labelled ``IA3`` would otherwise load with its weights silently dropped);
* the weights: safetensors only and complete (the header must cover the file), no pickle-based files
  beside them (unpickling runs arbitrary code), no configs asking for custom code;
* the base model it was built for, when the caller names one (``base_model``);
* for classification, label names (or a trained head to size them from).

Reasons name files relative to the folder and never echo a path from inside a config, so the server can
return them to clients; ``str(error)`` adds the folder for the command line. Checks that need the built
model (every tensor's name and shape against the modules it adapts) happen when the weights are loaded.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.artifacts import ADAPTER_DIR, MANIFEST, RunManifest, manifest_from_peft_config
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind

# Files that are (or may be) pickles: loading one can run arbitrary code, so their presence is refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
NATIVE_CONFIG = "peftlab_adapter_config.json"  # peftlab's own methods (methods/adapter.py writes it)
MERGE_REPORT = "peftlab_merge.json"  # a `peftlab merge` output (merge.py writes it)
SHARD_INDEX = "model.safetensors.index.json"
# peft saves the virtual-token table of every prompt-learning method under this one name.
PROMPT_EMBEDDINGS = "prompt_embeddings"


class AdapterRefused(PeftlabError):
    """An adapter folder that must not be loaded. ``reason`` names no server path (safe to send a client);
    ``str()`` adds the folder for the command line."""

    def __init__(self, folder: str | os.PathLike, reason: str):
        self.folder, self.reason = str(folder), reason
        super().__init__(f"Adapter '{folder}' cannot be used: {reason}")


@dataclass
class CheckedAdapter:
    """A checked adapter folder: what it is and where its weights are (nothing loaded)."""

    folder: Path  # the folder given, resolved
    adapter_dir: Path  # the folder with the weights, resolved, inside ``folder``
    manifest: RunManifest
    peft_type: str | None  # peft's PeftType name; None for peftlab's own formats and merged models
    weights: list[Path]
    tensors: dict[str, tuple[int, ...]]  # tensor name -> shape, from the safetensors headers
    label_names: list[str] | None
    n_outputs: int | None  # classification head width (1 for regression); None for the other kinds
    merged: bool = False  # a `peftlab merge` output: a standalone model
    from_run: bool = False  # a `peftlab train` folder (peftlab.json), not a plain peft folder
    merged_from: str | None = None  # the method a merged model was trained with
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> TaskKind:
        return TaskKind(self.manifest.kind)

    @property
    def method_name(self) -> str:
        return self.manifest.method

    def method(self):
        """The configured ``Method`` (None for a merged model)."""
        if self.merged:
            return None
        from peftlab.methods import get_method

        return get_method(self.manifest.method, **(self.manifest.method_options or {}))

    @property
    def parameters(self) -> int:
        total = 0
        for shape in self.tensors.values():
            count = 1
            for size in shape:
                count *= int(size)
            total += count
        return total


# ---- paths ------------------------------------------------------------------------------------------

def path_inside(root: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """``path`` (relative to ``root``, or absolute) resolved, if it lies inside ``root`` resolved; else None.

    Symlinks are followed before the comparison, so a link inside ``root`` that points out is outside."""
    root_resolved = Path(os.path.realpath(root))
    candidate = Path(os.path.expanduser(str(path)))
    if not candidate.is_absolute():
        candidate = root_resolved / candidate
    resolved = Path(os.path.realpath(candidate))
    if resolved == root_resolved or root_resolved in resolved.parents:
        return resolved
    return None


def display_model(name: str) -> str:
    """A model name fit to show anyone: a Hub id or alias as is, a local folder by its last part only."""
    text = str(name)
    local = os.path.isabs(text) or text.startswith(("./", "../", "~"))
    if local or (os.sep in text and Path(text).expanduser().exists()):
        return Path(text.rstrip(os.sep)).name or "a local folder"
    return text


def resolved_model(name: str) -> str:
    """A model name as a comparable key: a local folder's real path, else the name (alias resolved)."""
    from peftlab.models import resolve_model

    try:
        value = resolve_model(name)
    except PeftlabError:
        value = name
    path = Path(value).expanduser()
    return os.path.realpath(path) if path.exists() else value


def same_model(recorded: str, base_model: str, base_resolved: str | None = None) -> bool:
    """Whether a recorded model name or folder denotes ``base_model`` (alias, folder or Hub id)."""
    if recorded == base_model:
        return True
    return resolved_model(recorded) == (base_resolved or resolved_model(base_model))


# ---- the check --------------------------------------------------------------------------------------

def check_adapter(path: str | os.PathLike, *, base_model: str | None = None, base_resolved: str | None = None,
                  base_model_type: str | None = None) -> CheckedAdapter:
    """Check an adapter folder (run, peft folder or merged model); raise :class:`AdapterRefused` if unfit.

    ``base_model``: the base it is about to be used with (alias, folder or Hub id); its identity is checked
    against what the folder records. ``base_resolved`` / ``base_model_type`` save re-reading the base.
    """
    given = Path(os.path.expanduser(str(path)))
    if not given.is_dir():
        raise AdapterRefused(path, "the folder does not exist (no such folder).")
    folder = Path(os.path.realpath(given))
    checker = _Checker(path, folder, base_model, base_resolved, base_model_type)
    return checker.check()


class _Checker:
    def __init__(self, shown, folder: Path, base_model, base_resolved, base_model_type):
        self.shown, self.folder = shown, folder
        self.base_model = base_model
        self.base_resolved = base_resolved or (resolved_model(base_model) if base_model else None)
        self.base_model_type = base_model_type or (_local_model_type(self.base_resolved) if base_model else None)

    def refuse(self, reason: str) -> AdapterRefused:
        return AdapterRefused(self.shown, reason)

    def relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.folder).as_posix() or "."
        except ValueError:
            return path.name

    def inside(self, path: Path) -> Path:
        """``path`` resolved, refusing anything (a symlink, ``..``) that leads out of the folder."""
        resolved = path_inside(self.folder, path)
        if resolved is None:
            raise self.refuse(f"'{self.relative(path)}' leads outside the adapter folder (a symlink or '..'); "
                              "every file must lie inside it.")
        return resolved

    def read_json(self, path: Path) -> dict[str, Any]:
        name = self.relative(path)
        try:
            payload = json.loads(self.inside(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise self.refuse(f"'{name}' is not valid JSON ({type(error).__name__}).") from None
        except RecursionError:
            raise self.refuse(f"'{name}' is nested too deeply to be a config file.") from None
        except OSError as error:
            raise self.refuse(f"'{name}' cannot be read ({error.strerror or type(error).__name__}).") from None
        if not isinstance(payload, dict):
            raise self.refuse(f"'{name}' does not hold a JSON object.")
        return payload

    def require(self, path: Path, what: str) -> Path:
        if not path.is_file():
            where = "it" if path.parent == self.folder else f"'{self.relative(path.parent)}/'"
            raise self.refuse(f"{where} has no {path.name}: {what}")
        return self.inside(path)

    def refuse_pickles(self, folders: list[Path]) -> None:
        found = sorted({entry.name for folder in folders for entry in folder.iterdir()
                        if entry.suffix.lower() in PICKLE_SUFFIXES and entry.is_file()})
        if found:
            raise self.refuse(
                f"it contains pickle-based weight files ({', '.join(found)}); peftlab loads only safetensors, "
                "because unpickling a file can run arbitrary code. Remove them (or re-save the weights as "
                "safetensors).")

    def refuse_custom_code(self, config: dict, name: str) -> None:
        if config.get("auto_map") or config.get("auto_mapping") or config.get("trust_remote_code"):
            raise self.refuse(f"its {name} asks for custom code (auto_map), which peftlab never runs.")

    def shapes(self, paths: list[Path]) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape from the safetensors headers; a truncated or padded file is refused."""
        from safetensors import safe_open

        shapes: dict[str, tuple[int, ...]] = {}
        for path in paths:
            try:
                with safe_open(str(self.inside(path)), framework="numpy") as handle:
                    for key in handle.keys():
                        shapes[key] = tuple(int(size) for size in handle.get_slice(key).get_shape())
            except AdapterRefused:
                raise
            except Exception as error:  # noqa: BLE001 - safetensors raises its own, OSError and ValueError types
                detail = "incomplete: the file is cut short or has extra bytes" if "not fully covered" in str(
                    error) else type(error).__name__
                raise self.refuse(f"'{self.relative(path)}' is not a readable safetensors file ({detail}).") from None
        if not shapes:
            raise self.refuse(f"'{self.relative(paths[0])}' holds no tensors.")
        return shapes

    def check_base(self, recorded: str, what: str) -> None:
        if self.base_model and recorded and not same_model(recorded, self.base_model, self.base_resolved):
            raise self.refuse(f"{what} base model '{display_model(recorded)}', not '{display_model(self.base_model)}'.")

    def check_model_type(self, saved_type: str | None, what: str) -> None:
        if self.base_model_type and saved_type and saved_type != self.base_model_type:
            raise self.refuse(f"{what} a {saved_type} model; the base model here is a {self.base_model_type} model.")

    # ---- the three kinds of folder ----------------------------------------------------------------
    def check(self) -> CheckedAdapter:
        folder = self.folder
        if (folder / MERGE_REPORT).is_file():
            return self.merged()
        if (folder / MANIFEST).is_file():
            manifest = self.manifest()
            adapter_dir = self.adapter_dir(manifest)
            from_run = True
        elif (folder / PEFT_CONFIG).is_file() or (folder / ADAPTER_DIR / PEFT_CONFIG).is_file():
            adapter_dir = folder if (folder / PEFT_CONFIG).is_file() else self.inside(folder / ADAPTER_DIR)
            manifest = self.manifest_from_peft(adapter_dir / PEFT_CONFIG)
            from_run = False
        else:
            raise self.refuse(f"it is neither a peftlab run folder (no {MANIFEST}) nor a peft adapter folder (no "
                              f"{PEFT_CONFIG}). Pass the --output folder of `peftlab train` or a peft adapter folder.")
        self.refuse_pickles([folder, adapter_dir] if adapter_dir != folder else [folder])
        from peftlab.methods import get_method_class

        method_class = get_method_class(manifest.method)
        if method_class.peft_type is not None:
            weights, peft_type = self.peft_weights(manifest, adapter_dir, method_class.peft_type, from_run)
        elif method_class.trains_all_weights:
            weights, peft_type = self.whole_model(adapter_dir), None
        else:
            weights, peft_type = self.native_weights(manifest, adapter_dir), None
        tensors = self.shapes(weights)
        if peft_type is not None:
            self.peft_tensors_agree(peft_type, tensors)
        label_names, n_outputs = self.outputs(manifest, tensors, require_head=peft_type is not None)
        return CheckedAdapter(folder=folder, adapter_dir=adapter_dir, manifest=manifest, peft_type=peft_type,
                              weights=weights, tensors=tensors, label_names=label_names, n_outputs=n_outputs,
                              from_run=from_run)

    def manifest(self) -> RunManifest:
        payload = self.read_json(self.folder / MANIFEST)
        try:
            manifest = RunManifest(**payload)
        except TypeError as error:
            raise self.refuse(f"{MANIFEST} is not a valid run manifest ({str(error).split('(')[-1].strip(') ')}).") from None
        except PeftlabError as error:
            raise self.refuse(f"{MANIFEST}: {error}") from None
        if not isinstance(manifest.method, str) or not isinstance(manifest.model, str):
            raise self.refuse(f"{MANIFEST} must name its method and model as strings.")
        from peftlab.methods import get_method, method_names

        if manifest.method not in method_names():
            raise self.refuse(f"{MANIFEST} names method '{manifest.method}', which this peftlab does not have "
                              f"(it has {', '.join(method_names())}).")
        if not isinstance(manifest.method_options, dict):
            raise self.refuse(f"{MANIFEST}'s method_options must be an object of option names and values.")
        try:
            get_method(manifest.method, **manifest.method_options)
        except PeftlabError as error:
            raise self.refuse(f"{MANIFEST}: {error}") from None
        labels = manifest.label_names
        if labels is not None and not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
            raise self.refuse(f"{MANIFEST}'s label_names must be a list of names.")
        if isinstance(manifest.max_length, bool) or not isinstance(manifest.max_length, int) or manifest.max_length < 1:
            raise self.refuse(f"{MANIFEST}'s max_length must be a whole number of tokens.")
        self.check_base(manifest.model, "it was trained on")
        return manifest

    def adapter_dir(self, manifest: RunManifest) -> Path:
        recorded = manifest.adapter_dir
        if not isinstance(recorded, str) or not recorded or os.path.isabs(recorded) or ".." in Path(recorded).parts:
            raise self.refuse(f"{MANIFEST}'s adapter_dir must name a folder inside the run folder (normally "
                              "'adapter'), not an absolute path or one with '..'.")
        adapter_dir = self.inside(self.folder / recorded)
        if not adapter_dir.is_dir():
            raise self.refuse(f"it has no '{recorded}/' folder: the run did not finish. Resume it with "
                              "`peftlab train ... --resume`.")
        return adapter_dir

    def manifest_from_peft(self, config_path: Path) -> RunManifest:
        config = self.read_json(config_path)
        try:
            return manifest_from_peft_config(config, PEFT_CONFIG)
        except PeftlabError as error:
            raise self.refuse(str(error)) from None

    def peft_weights(self, manifest, adapter_dir: Path, peft_type: str, from_run: bool) -> tuple[list[Path], str]:
        config_path = self.require(adapter_dir / PEFT_CONFIG, "the adapter is incomplete.")
        weights = self.require(adapter_dir / PEFT_WEIGHTS,
                               "the adapter is incomplete (peftlab reads only safetensors weights).")
        config = self.read_json(config_path)
        recorded_type = str(config.get("peft_type", "")).upper()
        if recorded_type != peft_type:
            raise self.refuse(f"{PEFT_CONFIG} says peft_type '{recorded_type}', but the run is a '{manifest.method}' "
                              f"run (peft_type {peft_type}): the folder was modified.")
        recorded_base = config.get("base_model_name_or_path")
        recorded_base = recorded_base if isinstance(recorded_base, str) else ""
        # peft records the folder the base was loaded from: a folder that exists here must be the base. (A path
        # from another machine is judged by the run manifest.)
        if recorded_base and (not from_run or Path(recorded_base).exists()):
            self.check_base(recorded_base, f"its {PEFT_CONFIG} says it was built for")
        self.refuse_custom_code(config, PEFT_CONFIG)
        return [weights], peft_type

    def peft_tensors_agree(self, peft_type: str, tensors: dict[str, tuple[int, ...]]) -> None:
        """The tensor names must be the ones a ``peft_type`` adapter saves (peft's own prefixes)."""
        found = _peft_families(tensors)
        expected = _peft_family(peft_type)
        if expected is None:
            return  # a peft type this peft does not know: peft itself will refuse the config
        if expected not in found or (found - {expected}):
            others = sorted(found - {expected})
            seen = f"{', '.join(repr(name) for name in others)} tensors" if others else f"no {expected!r} tensors"
            raise self.refuse(f"{PEFT_CONFIG} says peft_type '{peft_type}', but its weights hold {seen}: the config "
                              "and the weights disagree (the folder was modified).")

    def whole_model(self, adapter_dir: Path) -> list[Path]:
        config = self.read_json(self.require(adapter_dir / "config.json", "the fully fine-tuned model is incomplete."))
        self.refuse_custom_code(config, "config.json")
        self.check_model_type(config.get("model_type"), "it is")
        return self.safetensors_files(adapter_dir)

    def native_weights(self, manifest: RunManifest, adapter_dir: Path) -> list[Path]:
        config = self.read_json(self.require(adapter_dir / NATIVE_CONFIG, "the adapter is incomplete."))
        weights = self.require(adapter_dir / PEFT_WEIGHTS, "the adapter is incomplete.")
        if config.get("method") not in (None, manifest.method):
            raise self.refuse(f"{NATIVE_CONFIG} is for method '{config.get('method')}', but the run is a "
                              f"'{manifest.method}' run: the folder was modified.")
        base = config.get("base_model") if isinstance(config.get("base_model"), dict) else {}
        self.check_model_type(base.get("model_type"), "it was trained on")
        return [weights]

    def safetensors_files(self, folder: Path) -> list[Path]:
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            raise self.refuse(f"'{self.relative(folder)}' has no .safetensors weights (peftlab reads only safetensors).")
        index = folder / SHARD_INDEX
        if index.is_file():
            listed = self.read_json(index).get("weight_map") or {}
            missing = sorted({str(shard) for shard in listed.values()} - {path.name for path in weights})
            if missing:
                raise self.refuse(f"its {SHARD_INDEX} lists weight files that are missing ({', '.join(missing[:3])}).")
        return weights

    def merged(self) -> CheckedAdapter:
        folder = self.folder
        self.refuse_pickles([folder])
        report = self.read_json(folder / MERGE_REPORT)
        try:
            kind = TaskKind.parse(report.get("kind"), f"task kind in {MERGE_REPORT}")
        except PeftlabError as error:
            raise self.refuse(str(error)) from None
        config = self.read_json(self.require(folder / "config.json", "the merged model is incomplete."))
        self.refuse_custom_code(config, "config.json")
        if (folder / "tokenizer_config.json").is_file():
            self.refuse_custom_code(self.read_json(folder / "tokenizer_config.json"), "tokenizer_config.json")
        self.check_model_type(config.get("model_type"), "it is")
        model = str(report.get("model") or "")
        self.check_base(model, "it was merged from")
        labels = report.get("label_names")
        try:
            manifest = RunManifest(method="merged", model=model or (self.base_model or ""), kind=kind,
                                   task=report.get("task"), task_options=report.get("task_options") or {},
                                   label_names=labels, is_regression=bool(report.get("is_regression")),
                                   max_length=int(report.get("max_length") or 128))
        except (TypeError, ValueError):
            raise self.refuse(f"{MERGE_REPORT} has fields of the wrong type.") from None
        weights = self.safetensors_files(folder)
        tensors = self.shapes(weights)
        label_names, n_outputs = self.outputs(manifest, tensors, require_head=False)
        method = str(report.get("method") or "")
        return CheckedAdapter(folder=folder, adapter_dir=folder, manifest=manifest, peft_type=None, weights=weights,
                              tensors=tensors, label_names=label_names, n_outputs=n_outputs, merged=True,
                              merged_from=method or None,
                              notes=[f"merged {method} model: its own copy of every weight (nothing shared)."])

    def outputs(self, manifest: RunManifest, tensors, *, require_head: bool) -> tuple[list[str] | None, int | None]:
        """(label names, head width) of a classification adapter; (names, None) for the other kinds."""
        label_names = manifest.label_names
        if not TaskKind(manifest.kind).is_classification:
            return label_names, None
        if require_head and not any(_is_head_tensor(key) for key in tensors):
            raise self.refuse("it has no trained classification head (modules_to_save) in its weights.")
        if manifest.is_regression:
            return label_names, 1
        if label_names is None:
            width = head_width(tensors)
            label_names = [str(i) for i in range(width)] if width else None
        if not label_names:
            raise self.refuse("it is a classification adapter without label names or a trained head.")
        return list(label_names), len(label_names)


# ---- tensor names ------------------------------------------------------------------------------------

def _is_head_tensor(key: str) -> bool:
    from peftlab.modelinfo import is_head_parameter

    return "modules_to_save" in key or is_head_parameter(key)


def head_width(tensors: dict[str, tuple[int, ...]]) -> int | None:
    """The output width of a saved classification head (its narrowest 2-D weight), or None."""
    widths = [shape[0] for key, shape in tensors.items()
              if key.endswith("weight") and len(shape) == 2 and _is_head_tensor(key) and not _peft_families([key])]
    return min(widths) if widths else None


@functools.lru_cache(maxsize=1)
def _peft_prefixes() -> dict[str, str]:
    """peft type name -> the prefix its tuner gives every tensor it adds (peft's own table)."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    return {str(getattr(peft_type, "value", peft_type)): prefix for peft_type, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items()}


def _is_prompt_learning(peft_type: str) -> bool:
    from peft.config import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_class = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    return isinstance(config_class, type) and issubclass(config_class, PromptLearningConfig)


def _peft_family(peft_type: str) -> str | None:
    """What a ``peft_type`` adapter's tensors are recognised by: a tuner prefix, or the prompt table."""
    if _is_prompt_learning(peft_type):
        return PROMPT_EMBEDDINGS
    return _peft_prefixes().get(peft_type)


def _peft_families(tensors) -> set[str]:
    """The peft tensor families present among tensor names: tuner prefixes (``lora_``) and the prompt table."""
    parts = {part for key in tensors for part in key.split(".")}
    found = {prefix for prefix in set(_peft_prefixes().values()) if any(part.startswith(prefix) for part in parts)}
    if PROMPT_EMBEDDINGS in parts:
        found.add(PROMPT_EMBEDDINGS)
    return found


def _local_model_type(resolved: str | None) -> str | None:
    """``model_type`` from a local model folder's config.json (None for a Hub id or an unreadable file)."""
    if not resolved:
        return None
    config = Path(resolved) / "config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


__all__ = ["check_adapter", "CheckedAdapter", "AdapterRefused", "path_inside", "same_model", "display_model",
           "resolved_model", "head_width", "PICKLE_SUFFIXES"]
