"""The on-disk layout of a trained run, and reading it back.

A ``peftlab train --output DIR`` writes::

    DIR/peftlab.json     what was trained: method + options, task + options, model, labels, lengths
    DIR/adapter/         the trained weights in the method's own format (peft's for peft methods)
    DIR/metrics.json     final dev metrics, parameter counts, speed and memory
    DIR/log.jsonl        one JSON object per logging step and per evaluation
    DIR/loss.png         training loss (and dev metric per epoch)
    DIR/checkpoints/     step checkpoints while training (removed after a successful run)

``--adapter`` also accepts a plain peft adapter folder made elsewhere (``adapter_config.json`` plus
weights): its base model and task type come from ``adapter_config.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind

MANIFEST = "peftlab.json"
ADAPTER_DIR = "adapter"  # the run folder's subfolder with the trained weights


@dataclass
class RunManifest:
    method: str
    model: str  # as the user named it (alias, folder or Hub id)
    kind: str
    task: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    label_names: list[str] | None = None
    is_regression: bool = False
    max_length: int = 128
    precision: str = "fp32"
    peftlab_version: str = ""
    adapter_dir: str = ADAPTER_DIR  # relative to the run folder

    def __post_init__(self):
        self.kind = TaskKind.parse(self.kind, "task kind in the run manifest")

    def save(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / MANIFEST, json.dumps(asdict(self), indent=2) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, then rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_run(path: str | os.PathLike) -> tuple[RunManifest, Path]:
    """(manifest, adapter folder) for a train output folder or a plain peft adapter folder."""
    run_dir = Path(path).expanduser()
    if not run_dir.is_dir():
        raise PeftlabError(f"Adapter folder '{run_dir}' does not exist.")
    manifest_path = run_dir / MANIFEST
    if manifest_path.is_file():
        try:
            payload = json.loads(manifest_path.read_text())
            manifest = RunManifest(**payload)
        except (json.JSONDecodeError, TypeError) as error:
            raise PeftlabError(f"'{manifest_path}' is not a valid peftlab run manifest ({error}).") from None
        adapter = run_dir / manifest.adapter_dir
        inside = os.path.realpath(run_dir)
        if os.path.commonpath([inside, os.path.realpath(adapter)]) != inside:
            raise PeftlabError(f"'{manifest_path}': adapter_dir '{manifest.adapter_dir}' points outside the run folder; "
                               "peftlab reads weights only from inside it. The manifest was modified: restore it.")
        if not adapter.is_dir():
            raise PeftlabError(f"'{run_dir}' has no '{manifest.adapter_dir}/' folder: the run did not finish. "
                               "Resume it with `peftlab train ... --resume`.")
        return manifest, adapter
    peft_config = run_dir / "adapter_config.json"
    if peft_config.is_file():
        return _manifest_from_peft(peft_config), run_dir
    if (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        return _manifest_from_peft(run_dir / ADAPTER_DIR / "adapter_config.json"), run_dir / ADAPTER_DIR
    raise PeftlabError(
        f"'{run_dir}' is neither a peftlab run folder (no {MANIFEST}) nor a peft adapter folder "
        "(no adapter_config.json). Pass the --output folder of `peftlab train` or a peft adapter folder."
    )


def _manifest_from_peft(config_path: Path) -> RunManifest:
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise PeftlabError(f"'{config_path}' is not valid JSON ({error.msg}, line {error.lineno}).") from None
    from peftlab.methods import get_method_class, method_for_peft_type, method_names

    peft_type = str(config.get("peft_type", "")).upper()
    method = method_for_peft_type(peft_type)
    if method is None:
        loadable = sorted({get_method_class(name).peft_type for name in method_names()} - {None})
        raise PeftlabError(f"'{config_path}': peft_type '{peft_type}' is not one peftlab can load "
                           f"({', '.join(loadable)}).")
    base = config.get("base_model_name_or_path")
    if not base:
        raise PeftlabError(f"'{config_path}' does not name its base model (base_model_name_or_path).")
    kind = TaskKind.from_peft_task_type(config.get("task_type"))
    return RunManifest(method=method, model=base, kind=kind)


def prepare_output_folder(output: str | os.PathLike, *, source: str | os.PathLike, marker: str, command: str,
                          overwrite: bool = False) -> Path:
    """The resolved ``--output`` of ``peftlab merge``/``export``, checked before any work.

    Refused: a folder that overlaps the source, a file, a non-empty folder that is not an earlier output of
    the same command (identified by its ``marker`` report file; such folders are never deleted), an earlier
    output unless ``overwrite``, and a place this process cannot write. The command writes into a staging
    folder beside it and renames it into place, so a failure leaves the old output as it was."""
    out = Path(output).expanduser().resolve()
    origin = Path(source).expanduser().resolve()
    if out == origin or origin in out.parents or out in origin.parents:
        raise PeftlabError(f"--output '{out}' overlaps the source folder '{origin}': choose a separate folder.")
    if out.exists() and not out.is_dir():
        raise PeftlabError(f"--output '{out}' is a file: choose a folder (a new or empty one).")
    if out.is_dir() and any(out.iterdir()):
        if not (out / marker).is_file():
            raise PeftlabError(f"'{out}' already exists and is not an earlier `peftlab {command}` output: choose "
                               "another --output or empty it yourself (peftlab never deletes other files).")
        if not overwrite:
            raise PeftlabError(f"'{out}' already holds a `peftlab {command}` output: pass --overwrite to replace it, "
                               "or choose another --output.")
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PeftlabError(f"Cannot write --output '{out}': '{existing}' is not writable by this user. "
                           "Choose a folder you can write to.")
    return out


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(Path(path), json.dumps(payload, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
    except ImportError:  # pragma: no cover
        pass
    return str(value)
