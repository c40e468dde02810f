"""Building the models the server hosts: skeletons of the base, and adapters loaded over them.

The base checkpoint is read once per task kind it serves (sequence classification, token
classification, causal LM); the second and later kinds are re-pointed at the first copy's tensors, so
one copy of the backbone stays in memory. Heads of other widths (3 labels next to 2) are derived from
that copy with only a new head. These *skeletons* are never modified.

How an adapter is put over a skeleton is what its method declares (``Method.serving_facts().mode``):

* ``peft``: a module tree sharing the skeleton's tensors (``clone_sharing``) loaded with the method's own
  ``load(..., adapter_name=...)`` (so its ``prepare_base`` / ``finish_loaded`` run as in training), on a
  private copy first; every tensor is then compared with what peft built for it. Joining a live slot
  (``join``) is peft's ``load_adapter`` on the worker thread;
* ``module-tree``: the method loads into its own module tree over the shared tensors, owning only what
  ``ServingFacts.private`` names (the head, BitFit's biases);
* ``own-copy``: a whole model (a full fine-tune through its method, a merged folder through the kind's
  ``AutoModelFor...`` class).
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.modelinfo import HEAD_NAMES
from peftlab.serving.adapters import AdapterSpec
from peftlab.serving.records import Slot
from peftlab.serving.sharing import (clone_sharing, freeze_for_inference, is_head, private_parameters,
                                     resize_head, share_parameters)


class JoinFailed(Exception):
    """An adapter could not join a live slot (it is then kept in a group of its own)."""


class Loader:
    """Skeletons of one base model and the adapters built over them."""

    def __init__(self, base_name: str, base_config, device: str):
        self.base_name = base_name
        self.base_config = base_config
        self.device = device
        self._lock = threading.Lock()
        self._skeletons: dict[tuple, Any] = {}
        self._donor = None

    def skeleton(self, kind: str, n_outputs: int | None, labels: list[str] | None, is_regression: bool):
        """The pristine base model for ``kind`` with an ``n_outputs`` head, sharing the backbone's tensors."""
        import torch

        from peftlab.models import load_model

        key = (kind, n_outputs)
        with self._lock:
            if key in self._skeletons:
                return self._skeletons[key]
            kind_key = next((k for k in self._skeletons if k[0] == kind), None)
            model = None
            if kind_key is not None and n_outputs is not None:
                model = clone_sharing(self._skeletons[kind_key], private=is_head)
                if not resize_head(model, n_outputs):
                    model = None
            if model is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = load_model(self.base_name, kind, label_names=labels if not is_regression else None,
                                       is_regression=is_regression, dtype=torch.float32)
                if self._donor is None:
                    self._donor = model
                else:
                    share_parameters(self._donor, model, skip_prefixes=tuple(HEAD_NAMES))
            self._skeletons[key] = freeze_for_inference(model, self.device)
            return self._skeletons[key]

    def skeleton_for(self, spec: AdapterSpec):
        return self.skeleton(spec.kind, spec.n_outputs, spec.label_names, spec.manifest.is_regression)

    # ---- own copies and module trees ------------------------------------------------------------------
    def merged(self, spec: AdapterSpec):
        """A `peftlab merge` output: a standalone model of the kind's auto class."""
        import torch
        import transformers

        auto_class = getattr(transformers, TaskKind(spec.kind).auto_class)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = auto_class.from_pretrained(str(spec.adapter_dir), dtype=torch.float32, use_safetensors=True)
        except Exception as error:  # noqa: BLE001
            raise PeftlabError(f"the merged model does not load ({first_line(error)}).") from None
        if getattr(model.config, "model_type", None) != getattr(self.base_config, "model_type", None):
            raise PeftlabError(f"it is a {model.config.model_type} model; this server's base is a "
                               f"{self.base_config.model_type} model.")
        return freeze_for_inference(model, self.device)

    def module_tree(self, spec: AdapterSpec):
        """A peftlab-format adapter on its own module tree (or, for ``own-copy``, its own whole model)."""
        skeleton = self.skeleton_for(spec)
        facts = spec.facts
        base = skeleton if facts.mode == "own-copy" else clone_sharing(skeleton, private_parameters(facts.private))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = spec.method.load(base, spec.adapter_dir, spec.kind)
        except PeftlabError:
            raise
        except Exception as error:  # noqa: BLE001
            raise PeftlabError(f"its weights do not fit the base model ({first_line(error)}).") from None
        return freeze_for_inference(model, self.device)

    # ---- peft ---------------------------------------------------------------------------------------
    def peft_probe(self, spec: AdapterSpec, internal: str):
        """The adapter loaded through its method on a private module tree; every tensor checked there."""
        tree = clone_sharing(self.skeleton_for(spec), private=private_parameters(spec.facts.private))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = spec.method.load(tree, spec.adapter_dir, spec.kind, adapter_name=internal)
        except Exception as error:  # noqa: BLE001 - peft/torch raise ValueError, RuntimeError, KeyError...
            raise PeftlabError(f"its weights do not fit the base model '{self.base_display}' "
                               f"({first_line(error)}).") from None
        problems = state_mismatch(model, internal, spec)
        if problems:
            raise PeftlabError(f"its weights do not fit the base model '{self.base_display}' ({problems}).")
        model.to(self.device)
        model.eval()
        return model

    def join(self, slot: Slot, spec: AdapterSpec, internal: str, model_lock) -> None:
        """(worker thread) peft's ``load_adapter`` into a live slot; on any failure undo and raise JoinFailed."""
        if not slot.alive:
            raise JoinFailed("its group was unloaded meanwhile")
        model = slot.model
        with model_lock:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.load_adapter(str(spec.adapter_dir), adapter_name=internal, is_trainable=False)
                problems = state_mismatch(model, internal, spec)
                if problems:
                    raise RuntimeError(problems)
            except Exception as error:  # noqa: BLE001
                if internal in getattr(model, "peft_config", {}):
                    try:
                        model.delete_adapter(internal)
                    except Exception:  # noqa: BLE001
                        pass
                raise JoinFailed(f"could not join group {slot.id}: {first_line(error)}") from None
            model.eval()
            slot.adapters[spec.name] = internal

    @property
    def base_display(self) -> str:
        from peftlab.adapter_check import display_model

        return display_model(self.base_name)


def state_mismatch(model, internal: str, spec: AdapterSpec) -> str:
    """Compare the adapter's tensors in the file with what peft built for it: names and shapes."""
    from peft.utils import get_peft_model_state_dict

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, adapter_name=internal).items()}
    found = spec.tensors
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k} (file {found[k]}, model {expected[k]})" for k in set(found) & set(expected)
                   if tuple(found[k]) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:3])}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {', '.join(wrong[:3])}")
    return "; ".join(problems)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
