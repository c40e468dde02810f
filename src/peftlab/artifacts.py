"""The on-disk layout of a trained run, and reading it back.

A ``peftlab train --output DIR`` writes::

    DIR/peftlab.json     what was trained: method + options, task + options, model, labels, lengths
    DIR/adapter/         the trained weights in the method's own format (peft's for peft methods)
    DIR/metrics.json     final dev metrics, parameter counts, speed and memory
    DIR/log.jsonl        one JSON object per logging step and per evaluation
    DIR/loss.png         training loss (and dev metric per epoch)
    DIR/checkpoints/     step checkpoints while training (removed after a successful run)
    DIR/peftlab-run.json the marker written first, before any other file: this folder is a run, started with
                         these options (what ``--resume`` compares)

``--adapter`` also accepts a plain peft adapter folder made elsewhere (``adapter_config.json`` plus
weights): its base model and task type come from ``adapter_config.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind

MANIFEST = "peftlab.json"
ADAPTER_DIR = "adapter"  # the run folder's subfolder with the trained weights
METRICS = "metrics.json"  # written last: its presence means the run finished
LOG = "log.jsonl"
PLOT = "loss.png"
CHECKPOINTS = "checkpoints"  # the step checkpoints (for --resume)
RUN_MARKER = "peftlab-run.json"  # written first, atomically: the folder is a run from its first moment
RUN_FILES = (RUN_MARKER, MANIFEST, ADAPTER_DIR, METRICS, LOG, PLOT, CHECKPOINTS)  # all a run ever writes
# What `peftlab compare` puts into a run's folder before it trains there (peftlab.compare.worker): peftlab's,
# not the user's, so such a folder counts as empty.
COMPANION_FILES = ("compare-spec.json", "compare.log", "worker-result.json", "error.txt", "result.json")


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
    # The data folder it was trained from (--data-dir or $PEFTLAB_DATA_DIR, absolute): `peftlab eval` reads
    # the dev split from there when it is given none. None: the Hub, the user's own files, or an older run.
    data_dir: str | None = None

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
        return _manifest_from_peft_file(peft_config), run_dir
    if (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        return _manifest_from_peft_file(run_dir / ADAPTER_DIR / "adapter_config.json"), run_dir / ADAPTER_DIR
    raise PeftlabError(
        f"'{run_dir}' is neither a peftlab run folder (no {MANIFEST}) nor a peft adapter folder "
        "(no adapter_config.json). Pass the --output folder of `peftlab train` or a peft adapter folder."
    )


def _manifest_from_peft_file(config_path: Path) -> RunManifest:
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise PeftlabError(f"'{config_path}' is not valid JSON ({error.msg}, line {error.lineno}).") from None
    return manifest_from_peft_config(config, f"'{config_path}'")


def manifest_from_peft_config(config: dict, where: str) -> RunManifest:
    """What a plain peft adapter folder (no peftlab.json) is: the method that loads its ``peft_type``, with
    the options its config states that change the method's facts (``Method.options_from_peft_config``: a
    LoRA saved with ``use_dora`` is served as DoRA is), its base model and its kind. ``where`` names the
    config in messages."""
    from peftlab.methods import get_method_class, method_for_peft_type, method_names

    peft_type = str(config.get("peft_type", "")).upper()
    method = method_for_peft_type(peft_type)
    if method is None:
        loadable = sorted({get_method_class(name).peft_type for name in method_names()} - {None})
        raise PeftlabError(f"{where}: peft_type '{peft_type}' is not one peftlab can load ({', '.join(loadable)}).")
    base = config.get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise PeftlabError(f"{where} does not name its base model (base_model_name_or_path).")
    options = get_method_class(method).options_from_peft_config(config)
    return RunManifest(method=method, model=base, kind=TaskKind.from_peft_task_type(config.get("task_type")),
                       method_options=options)


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


def read_json_or_none(path: str | os.PathLike) -> Any:
    """A JSON file's content, or None when it is missing or not valid JSON (optional reports and metrics)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


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


# ---- starting a run: nothing overwritten, resume that says what it does -----------------------------------

@dataclass
class RunStart:
    """What :func:`start_run` decided for a run folder, and what to tell the user."""

    output: Path
    finished: dict[str, Any] | None = None  # --resume of a finished run: its metrics (nothing to train)
    resume_from: str | None = None  # the newest intact checkpoint a resumed run continues from
    notes: list[str] = field(default_factory=list)  # one line each: what was chosen and why
    owns_folder: bool = False  # the folder holds nothing but this run's files (removed again if it fails early)

    def abandon(self) -> None:
        """Undo a start that failed before its first checkpoint, so that the same --output works next time:
        the run's own files go (nothing else), and the folder too when it held nothing else."""
        if self.finished is not None or has_checkpoint(self.output) or (self.output / METRICS).exists():
            return
        for name in RUN_FILES:
            _remove(self.output / name)
        if self.owns_folder and self.output.is_dir() and not any(self.output.iterdir()):
            self.output.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def checkpoint_folders(output: Path) -> list[Path]:
    """The run's ``checkpoint-N`` folders, newest first (each appeared whole: see peftlab.trainer)."""
    folder = Path(output) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)


def has_checkpoint(output: Path) -> bool:
    return bool(checkpoint_folders(output))


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a truncated or garbled file), or None when it is intact.

    Read without torch: safetensors files against their header's sizes, torch's zip files against their
    CRCs, JSON files parsed."""
    if not (folder / "trainer_state.json").is_file():
        return "trainer_state.json is missing"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        try:
            if path.suffix == ".safetensors":
                problem = _safetensors_problem(path)
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
                problem = None
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                problem = f"its entry {bad} is corrupt" if bad else None
            else:
                problem = None
        except (OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError):
            problem = "it is truncated or garbled"
        if problem:
            return f"{name}: {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            return "it is truncated"
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            return "it is truncated"
        header = json.loads(stream.read(length))
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end > size:
        return f"it is truncated ({size:,} of {8 + length + end:,} bytes)"
    return None


def intact_checkpoint(output: Path) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint that is intact, 'checkpoint-N (why)' for each newer one that is not)."""
    damaged = []
    for folder in checkpoint_folders(output):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, damaged
        damaged.append(f"{folder.name} ({problem})")
    return None, damaged


def _entries(output: Path) -> list[str]:
    """The folder's entries that are not peftlab's companion files, sorted."""
    if not output.is_dir():
        return []
    return sorted(p.name for p in output.iterdir() if p.name not in COMPANION_FILES)


def run_state(output: Path) -> str:
    """'absent', 'empty', 'finished', 'unfinished' (it has a checkpoint), 'failed-start' (a run that stopped
    before its first checkpoint) or 'foreign' (a non-empty folder that is not a run)."""
    output = Path(output)
    if not output.exists():
        return "absent"
    entries = _entries(output)
    if not entries:
        return "empty"
    marked = (output / RUN_MARKER).is_file()
    if (output / METRICS).is_file() and (marked or ((output / MANIFEST).is_file() and (output / ADAPTER_DIR).is_dir())):
        return "finished"
    if has_checkpoint(output):
        return "unfinished"
    # A run of an earlier peftlab that died before its first checkpoint left checkpoints/ (and log.jsonl).
    if marked or ((output / CHECKPOINTS).is_dir() and set(entries) <= set(RUN_FILES)):
        return "failed-start"
    return "foreign"


def read_marker(output: Path) -> dict[str, Any]:
    try:
        payload = json.loads((Path(output) / RUN_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return payload if isinstance(payload, dict) else {}


def finished_metrics(output: Path) -> dict[str, Any] | None:
    """The metrics of a finished run in ``output`` (None when there is none)."""
    path = Path(output) / METRICS
    if run_state(output) != "finished":
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise PeftlabError(f"'{path}' is not valid JSON: the run's record is damaged. Choose another --output.") from None


def start_run(output: str | os.PathLike, *, resume: bool, overwrite: bool, identity: dict[str, Any],
              describe_changes=None) -> RunStart:
    """Check ``--output`` and mark it as this run's before anything else is written (rank 0 only).

    A finished run: refused (``--resume``: its metrics, nothing to train; ``--overwrite``: replaced).
    An unfinished run: refused without ``--resume`` (``--overwrite`` starts it over); resumed from its newest
    intact checkpoint when its options (``identity``, see ``peftlab.validation.training_identity``) are the
    ones it started with (``describe_changes(started, now)`` lists the others for the refusal). A run that
    died before its first checkpoint: started again. Any other non-empty folder: refused, unless
    ``--overwrite`` and none of the run's file names is taken there (files peftlab did not write are never
    deleted or replaced). A file: refused."""
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise PeftlabError(f"--output '{out}' is a file: choose a folder (a new or empty one).")
    state = run_state(out)
    notes: list[str] = []
    if state == "finished":
        if resume:
            metrics = finished_metrics(out) or {}
            score = f": dev {metrics.get('metric_name')} = {metrics['metric']:.4f}" if isinstance(
                metrics.get("metric"), (int, float)) else ""
            return RunStart(out, finished=metrics, notes=[f"'{out}' holds a finished run{score}; nothing to resume."])
        if not overwrite:
            raise PeftlabError(f"'{out}' already holds a finished run. Choose another --output, delete it, or pass "
                               "--overwrite to replace it.")
        notes.append(f"--overwrite: replacing the finished run in '{out}' (its own files only)")
        _clear_run(out)
    elif state == "unfinished" and resume:
        return _resume(out, identity, describe_changes)
    elif state == "unfinished":
        if not overwrite:
            raise PeftlabError(f"'{out}' holds an unfinished run. Continue it with --resume, or choose another "
                               "--output (--overwrite starts it over).")
        notes.append(f"--overwrite: starting the unfinished run in '{out}' over (its own files only)")
        _clear_run(out)
    elif state == "failed-start":
        notes.append(f"'{out}' holds a run that stopped before its first checkpoint"
                     f"{' (nothing to resume)' if resume else ''}: starting it again")
        _clear_run(out)
    elif state == "foreign":
        entries = _entries(out)
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        if not overwrite:
            raise PeftlabError(f"'{out}' is not empty and is not a peftlab run (it holds {shown}): choose another "
                               "--output, or pass --overwrite to train into it beside those files (peftlab never "
                               "deletes or replaces files it did not write).")
        taken = [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
        if taken:
            raise PeftlabError(f"'{out}' holds {', '.join(taken)}, which a run would write but peftlab did not: "
                               "--overwrite never replaces files peftlab did not write. Move them, or choose "
                               "another --output.")
        notes.append(f"--overwrite: training into '{out}' beside its {len(entries)} other entries, which peftlab "
                     "leaves as they are")
    if resume and state != "failed-start":
        notes.append(f"--resume: nothing to resume in '{out}' (no checkpoint); starting a fresh run")
    owns_folder = state in ("absent", "failed-start")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, identity)
    except OSError as error:
        raise PeftlabError(f"Cannot write --output '{out}' ({error.strerror or error}). Choose a folder you can "
                           "write to.") from None
    return RunStart(out, notes=notes, owns_folder=owns_folder)


def _resume(out: Path, identity: dict[str, Any], describe_changes) -> RunStart:
    marker = read_marker(out)
    started = marker.get("identity")
    if isinstance(started, dict) and describe_changes is not None:
        changes = describe_changes(started, identity)
        if changes:
            raise PeftlabError(f"--resume: '{out}' was started with other options ({'; '.join(changes)}); resume "
                               "with the options it was started with, or start a new run with another --output.")
    checkpoint, damaged = intact_checkpoint(out)
    notes = [f"--resume: {name} is damaged, so it is skipped" for name in damaged]
    if checkpoint is None:
        notes.append(f"--resume: no intact checkpoint in '{out}'; training again from step 0")
    else:
        notes.append(f"--resume: resuming from {checkpoint.name} (step {checkpoint.name.split('-', 1)[1]})")
    if not marker:
        write_marker(out, identity)  # a run of an earlier peftlab: marked now, compared next time
    return RunStart(out, resume_from=str(checkpoint) if checkpoint else None, notes=notes)


def _clear_run(out: Path) -> None:
    """Remove what an earlier run wrote in ``out`` (only the run's own file names)."""
    for name in RUN_FILES:
        _remove(out / name)


def write_marker(out: Path, identity: dict[str, Any]) -> None:
    from peftlab.version import __version__

    write_json(out / RUN_MARKER, {"peftlab_version": __version__, "started": time.time(), "identity": identity})


# ---- where a run's data came from -----------------------------------------------------------------------

def absolute_paths(options: dict[str, Any], keys) -> dict[str, Any]:
    """``options`` with the file paths under ``keys`` made absolute (so a run reloads from any folder)."""
    return {key: (os.path.abspath(os.path.expanduser(str(value))) if key in keys and value else value)
            for key, value in options.items()}


def remembered_data_dir(task, data_dir: str | None) -> str | None:
    """The data folder a task read (``--data-dir``, else ``$PEFTLAB_DATA_DIR``), absolute; None for the Hub
    and for tasks over the user's own files."""
    if getattr(task, "local_only", False):
        return None
    from peftlab.tasks.base import resolve_data_dir

    path = resolve_data_dir(data_dir)
    return str(path.resolve()) if path is not None else None


# ---- peftlab compare --output ----------------------------------------------------------------------------

COMPARE_OUTPUTS = ("results.json", "results.csv", "report.md", "report.html", "runs")


def check_comparison_folder(output: str | os.PathLike, *, overwrite: bool, plots=()) -> Path:
    """``peftlab compare --output``: a new or empty folder, or an earlier comparison (compare resumes or
    refuses it); any other non-empty folder only with ``--overwrite`` and only when none of the names a
    comparison writes (``COMPARE_OUTPUTS``, ``plots``) is taken there."""
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise PeftlabError(f"--output '{out}' is a file: choose a folder (a new or empty one).")
    if not out.is_dir() or not any(out.iterdir()) or (out / "results.json").is_file() or (out / "runs").is_dir():
        return out
    entries = sorted(p.name for p in out.iterdir())
    if not overwrite:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise PeftlabError(f"'{out}' is not empty and is not a comparison (it holds {shown}): choose another --output, "
                           "or pass --overwrite to write the comparison beside those files (peftlab never deletes or "
                           "replaces files it did not write).")
    taken = [name for name in (*COMPARE_OUTPUTS, *plots) if (out / name).exists()]
    if taken:
        raise PeftlabError(f"'{out}' holds {', '.join(taken)}, which a comparison would write but peftlab did not: "
                           "--overwrite never replaces files peftlab did not write. Move them, or choose another "
                           "--output.")
    return out
