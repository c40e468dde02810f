"""What a PEFT method is, in one interface.

Every method module under ``peftlab/methods/`` defines one ``Method`` subclass with:

* class attributes: ``name`` (the ``--method`` name), ``category`` ("reparameterization",
  "additive", "selective" or "full"), ``mergeable``, ``paper``, ``summary``, ``kinds`` (task kinds it
  supports) and ``Options`` (a dataclass of its hyperparameters; every field has a default from the
  paper or the peft docs and a ``help`` string in its metadata; ``learning_rate`` is one of them);
* ``check_supported(model, kind)``: raise ``PeftlabError`` with one sentence when the method cannot
  run on this model/task (called before any training);
* ``apply(model, kind)``: freeze/inject and return the trainable model;
* ``save(model, directory)`` / ``load(base_model, directory, kind)``: only the trained tensors
  (safetensors) plus a JSON config; ``load`` on a freshly loaded base reproduces the outputs exactly;
* ``merge(model)``: a plain transformers model with the method folded in (mergeable methods only);
* ``trainable_parameters_formula(model, kind)``: the count the method's formula predicts, used by
  the conformance tests to check ``apply``;
* ``inference_cost()``: what the method adds at inference ("none", "+20 virtual tokens", ...).

peft-backed methods derive from ``PeftMethod`` and only say how to build their ``PeftConfig``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.errors import PeftlabError

CATEGORIES = ("reparameterization", "additive", "selective", "full")
ALL_KINDS = ("seq-cls", "token-cls", "causal-lm", "seq2seq", "qa")

# peft's TaskType per peftlab task kind
PEFT_TASK_TYPES = {
    "seq-cls": "SEQ_CLS",
    "token-cls": "TOKEN_CLS",
    "causal-lm": "CAUSAL_LM",
    "seq2seq": "SEQ_2_SEQ_LM",
    "qa": "QUESTION_ANS",
}

# Task heads that are newly initialised for classification and QA and so always trained.
HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs")
# The task kinds whose model gets such a new head (sequence/token classification, extractive QA's span head).
HEAD_KINDS = ("seq-cls", "token-cls", "qa")


def option(default, help: str, **extra):
    """A dataclass field that documents itself (peft's config style)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass
class BaseOptions:
    learning_rate: float = option(2e-4, "Peak learning rate (linear decay after warm-up).")


class Method:
    name: ClassVar[str]
    category: ClassVar[str]
    mergeable: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ALL_KINDS
    Options: ClassVar[type] = BaseOptions
    # Fraction of the steps with linear learning-rate warm-up when --warmup-ratio is not given (RoBERTa's 6%).
    warmup_ratio: ClassVar[float] = 0.06

    def __init__(self, options=None, **overrides):
        if options is None:
            options = self.make_options(overrides)
        elif overrides:
            options = dataclasses.replace(options, **overrides)
        self.options = options

    # ---- options -------------------------------------------------------------------------
    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls.Options))

    @classmethod
    def make_options(cls, overrides: dict[str, Any] | None = None):
        """Options from defaults plus ``overrides`` (recipe YAML / CLI), checked by name and type."""
        overrides = {k.replace("-", "_"): v for k, v in (overrides or {}).items() if v is not None}
        fields = {f.name: f for f in cls.option_fields()}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise PeftlabError(
                f"Method '{cls.name}' has no option {', '.join(repr(u) for u in unknown)}. "
                f"Its options are: {', '.join(sorted(fields))}."
            )
        values = {}
        for key, value in overrides.items():
            default = fields[key].default
            if default is dataclasses.MISSING:
                default = fields[key].default_factory()  # type: ignore[misc]
            values[key] = _coerce(cls.name, key, value, default)
        return cls.Options(**values)

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    @property
    def learning_rate(self) -> float:
        return float(self.options.learning_rate)

    # ---- lifecycle -------------------------------------------------------------------------
    def check_supported(self, model: nn.Module, kind: str) -> None:
        if kind not in self.kinds:
            raise PeftlabError(
                f"Method '{self.name}' cannot run {kind} on {type(model).__name__} ({model_family(model)}): "
                f"it supports only {', '.join(self.kinds)} tasks."
            )

    def model_load_kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` keyword arguments for the base model (qlora: quantization)."""
        return {}

    def apply(self, model: nn.Module, kind: str) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, base_model: nn.Module, directory: Path, kind: str) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        raise PeftlabError(
            f"Method '{self.name}' cannot be merged into the base weights: {self.why_not_mergeable()} "
            "Serve it unmerged (peftlab serve) or export it (peftlab export)."
        )

    def why_not_mergeable(self) -> str:
        return "it adds computation that is not a change to existing weights."

    def trainable_parameters_formula(self, model: nn.Module, kind: str) -> int:  # pragma: no cover
        raise NotImplementedError

    def inference_cost(self) -> str:
        return "none"


def _coerce(method: str, key: str, value, default):
    """YAML/CLI values to the option's type, with a message that names the option."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return list(value)
        return value
    except (TypeError, ValueError):
        raise PeftlabError(
            f"Option '{key}' of method '{method}' must be {type(default).__name__} (like {default!r}); got {value!r}."
        ) from None


# ---- helpers shared by the methods ---------------------------------------------------------------

def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The task head(s) a classification model adds on top of the backbone, by attribute name."""
    return {name: getattr(model, name) for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights counted as their logical size."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            count = int(getattr(parameter, "quant_state", None).shape.numel()) if getattr(
                parameter, "quant_state", None) is not None else count * 2
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, GPT-2 Conv1D or bitsandbytes 4-bit linear."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if module.__class__.__name__ == "Conv1D":  # GPT-2 stores weight as (in, out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def model_family(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", type(model).__name__)


class PeftMethod(Method):
    """A method that peft implements: subclasses return the ``PeftConfig``."""

    def peft_config(self, model: nn.Module, kind: str):  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, model, kind):
        from peft import get_peft_model

        from peftlab.methods.compat import add_qa_token_type_compat

        self.check_supported(model, kind)
        return add_qa_token_type_compat(get_peft_model(model, self.peft_config(model, kind)))

    def save(self, model, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(directory), safe_serialization=True)

    def load(self, base_model, directory, kind):
        from peft import PeftModel

        from peftlab.methods.compat import add_qa_token_type_compat

        return add_qa_token_type_compat(PeftModel.from_pretrained(base_model, str(directory), is_trainable=False))

    def merge(self, model):
        if not self.mergeable:
            return super().merge(model)
        from peftlab.methods.compat import remove_qa_token_type_compat

        return remove_qa_token_type_compat(model.merge_and_unload())


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the tensors that train (for methods peftlab implements itself)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
