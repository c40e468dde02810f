"""What the server asks of an adapter folder before it loads it, beyond the shared file checks.

The file-level checks (manifest, method, peft type against manifest and weights, safetensors only and
complete, no pickles, no custom code, base model identity, ``adapter_dir`` inside the run folder) are
:func:`peftlab.adapter_check.check_adapter`, shared with eval, predict, merge and export. Here: the adapter's
name, whether its task kind is served, how its method is hosted (``Method.serving_facts()``), and where a
run-time load may come from (:func:`locate`: only under ``--adapter-root``, Hub ids only with
``--allow-hub``, one answer for "missing" and "not allowed").
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.adapter_check import AdapterRefused, CheckedAdapter, check_adapter, display_model, path_inside
from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.methods.base import ServingFacts

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A Hugging Face Hub repository id: owner/name (huggingface_hub's rules, simplified).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
MAX_PATH_CHARS = 4096
NOT_FOUND_OR_NOT_ALLOWED = ("no adapter may be loaded from that path: it does not exist, or it is outside what "
                            "this server loads from (--adapter-root, --allow-hub).")


class NotFoundOrNotAllowed(PeftlabError):
    """The one answer for a path that is missing, outside the adapter root, or a Hub id not allowed."""

    def __init__(self):
        super().__init__(NOT_FOUND_OR_NOT_ALLOWED)


@dataclass
class AdapterSpec:
    """A checked adapter folder and how the server hosts it (not loaded yet)."""

    name: str
    checked: CheckedAdapter
    facts: ServingFacts
    method: Any  # the configured Method; None for a merged model
    notes: list[str] = field(default_factory=list)

    @property
    def manifest(self):
        return self.checked.manifest

    @property
    def kind(self) -> TaskKind:
        return self.checked.kind

    @property
    def method_name(self) -> str:
        return self.checked.method_name

    @property
    def adapter_dir(self) -> Path:
        return self.checked.adapter_dir

    @property
    def peft_type(self) -> str | None:
        return self.checked.peft_type

    @property
    def tensors(self) -> dict[str, tuple[int, ...]]:
        return self.checked.tensors

    @property
    def label_names(self) -> list[str] | None:
        return self.checked.label_names

    @property
    def n_outputs(self) -> int | None:
        return self.checked.n_outputs

    @property
    def parameters(self) -> int:
        return self.checked.parameters


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise PeftlabError(f"Adapter name {name!r} is not valid: use 1-64 letters, digits, '_', '-' or '.', "
                           "starting with a letter or digit.")
    return name


def inspect_adapter(name: str, path: str | os.PathLike, *, base_name: str, base_resolved: str,
                    base_model_type: str | None) -> AdapterSpec:
    """Check an adapter folder for serving on ``base_name``; raise ``PeftlabError`` with the reason, which
    names no server path."""
    check_name(name)
    try:
        checked = check_adapter(path, base_model=base_name, base_resolved=base_resolved,
                                base_model_type=base_model_type)
    except AdapterRefused as error:
        raise PeftlabError(error.reason) from None
    if not checked.kind.servable:
        raise PeftlabError(f"its task kind '{checked.kind}' cannot be served.")
    notes = list(checked.notes)
    if checked.merged:
        return AdapterSpec(name=name, checked=checked, method=None, notes=notes,
                           facts=ServingFacts(mode="own-copy", private="all"))
    method = checked.method()
    facts = method.serving_facts()
    if facts.note:
        notes.append(facts.note)
    return AdapterSpec(name=name, checked=checked, facts=facts, method=_full_precision(method), notes=notes)


def _full_precision(method):
    """The method that loads this adapter onto the server's full-precision base: itself, or, for a method
    trained on a quantised base (``quantized_base``), the method that saves the same peft type unquantised."""
    if not getattr(method, "quantized_base", False) or method.peft_type is None:
        return method
    from peftlab.methods import get_method, method_for_peft_type

    name = method_for_peft_type(method.peft_type)
    return get_method(name) if name else method


def locate(requested: Any, *, root: str | os.PathLike | None, allow_hub: bool = False) -> Path:
    """The local folder a run-time load request may read, or :class:`NotFoundOrNotAllowed`.

    A path (relative to ``root`` or absolute) counts only if it resolves inside ``root`` (symlinks followed,
    ``..`` allowed while it stays inside) and is a folder there. With ``allow_hub``, an ``owner/name`` that is
    no such folder is fetched from the Hugging Face Hub (configs and safetensors only). Every refusal is the
    same exception with the same message, so a client cannot tell a missing folder from a forbidden one.
    """
    if not isinstance(requested, str) or not requested or len(requested) > MAX_PATH_CHARS or "\x00" in requested:
        raise NotFoundOrNotAllowed()
    if root is not None:
        inside = path_inside(root, requested)
        if inside is not None and inside.is_dir():
            return inside
    if allow_hub and HUB_ID.match(requested):
        return _from_hub(requested)
    raise NotFoundOrNotAllowed()


def _from_hub(repo_id: str) -> Path:
    from peftlab.hub import download

    try:
        return download(repo_id)
    except Exception:  # noqa: BLE001 - missing, private, offline: all the same answer
        raise NotFoundOrNotAllowed() from None


def startup_folder(name: str, value: str) -> str:
    """``serve --adapter NAME=VALUE``: a local folder as given, else a Hub id (``org/name``) fetched now (the
    operator's own choice, so no ``--allow-hub`` is needed); one sentence when it cannot be fetched."""
    from peftlab.hub import local_or_hub

    return local_or_hub(value, f"--adapter {name}={value}")


def redact(text: str, replacements: dict[str, str]) -> str:
    """``text`` with each path in ``replacements`` (and its resolved form) replaced by its stand-in."""
    pairs = []
    for path, stand_in in replacements.items():
        if path:
            pairs.append((str(path), stand_in))
            pairs.append((os.path.realpath(str(path)), stand_in))
    for path, stand_in in sorted(pairs, key=lambda pair: -len(pair[0])):
        if len(path) > 1:
            text = text.replace(path, stand_in)
    return text


__all__ = ["AdapterSpec", "check_name", "inspect_adapter", "locate", "startup_folder",
           "NotFoundOrNotAllowed", "redact",
           "display_model", "NOT_FOUND_OR_NOT_ALLOWED"]
