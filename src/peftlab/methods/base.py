"""What a PEFT method is, in one interface: what it does and every fact the rest of peftlab asks of it.

Every method module under ``peftlab/methods/`` defines one ``Method`` subclass. Nobody outside
``methods/`` branches on a method's name: training, serving, merging, exporting, the memory estimator,
``recommend`` and ``compare`` read what the method declares here.

What it is (class attributes): ``name`` (the ``--method`` name), ``category`` ("reparameterization",
"additive", "selective" or "full"), ``mergeable``, ``paper``, ``summary``, ``kinds`` (task kinds it
supports), ``Options`` (a dataclass of its hyperparameters; every field has a default from the paper or the
peft docs and a ``help`` string; ``learning_rate`` is one of them), ``warmup_ratio``.

What it declares for the others:

* ``peft_type``: the peft ``PeftType`` name of the adapters it saves (None: peftlab's own format);
  ``trains_all_weights`` (full fine-tuning: a whole model per task); ``quantized_base`` (QLoRA);
* ``serving_facts()``: how ``peftlab serve`` hosts an adapter of it (a :class:`ServingFacts`);
* ``optimizer`` / ``optimizer_parameter_groups()`` / ``training_callbacks()``: what the trainer needs;
  ``total_steps`` is set before ``apply`` so a method whose schedule depends on it (AdaLoRA) can read it;
* ``guide`` / ``few_shot_guide`` / ``guide_adjustments()``: its rows of the selection guide (``recommend``);
* ``memory_facts()`` / ``apply_for_estimate()``: what the memory estimator cannot read off the modules;
* ``merge_note()``: what a user should know when it is merged or exported.

What it does: ``check_supported(model, kind)`` (one sentence when it cannot run), ``apply(model, kind)``,
``save(model, directory)`` / ``load(base_model, directory, kind)`` (``load`` on a fresh base reproduces
the outputs exactly), ``merge(model)`` (mergeable methods), ``trainable_parameters_formula(model, kind)``
(checked against ``apply`` by the conformance tests), ``inference_cost()``.

peft-backed methods derive from ``PeftMethod`` and only say how to build their ``PeftConfig``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from peftlab.errors import PeftlabError
from peftlab.kinds import ALL_KINDS, HEAD_KINDS, TaskKind
from peftlab.modelinfo import (HEAD_NAMES, count_parameters, head_modules, linear_shape,  # noqa: F401 (re-exported)
                               model_family)

CATEGORIES = ("reparameterization", "additive", "selective", "full")
# The selection guide's task types (``peftlab recommend --task-type``).
GUIDE_TASK_TYPES = ("classification", "ner", "qa", "generation", "seq2seq")


def option(default, help: str, **extra):
    """A dataclass field that documents itself (peft's config style)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass
class BaseOptions:
    learning_rate: float = option(2e-4, "Peak learning rate (linear decay after warm-up).")


@dataclass(frozen=True)
class ServingFacts:
    """How ``peftlab serve`` hosts an adapter of a method.

    ``mode``: "peft" (loaded into a PeftModel shared with the other adapters of its ``group`` over the
    base weights), "module-tree" (its own module tree over the shared base weights: peftlab's own
    methods) or "own-copy" (a whole model of its own: full fine-tuning, merged models).
    ``group``: adapters with the same group, kind and head width share one PeftModel (peft type, plus a
    variant that peft cannot mix, such as DoRA). ``mixed_batch``: adapters of the group can share one
    forward pass (peft's ``adapter_names``; peft refuses it for DoRA). ``private``: what each hosted
    adapter owns beyond the shared base ("head", "biases+head" or "all"). ``note``: shown when it loads.
    """

    mode: str
    group: str | None = None
    mixed_batch: bool = False
    private: str = "head"
    note: str = ""


@dataclass(frozen=True)
class GuideSituation:
    """What ``recommend`` knows about the user's situation, for a method's ``guide_adjustments``."""

    base_params: int
    domain_specific: bool = False


# Model sizes the selection guide's adjustments refer to (parameters).
VERY_LARGE = 3e9  # T-Few's (IA)3 results are on 3B and 11B models
HUGE = 1e10  # Lester et al.: prompt tuning matches fine-tuning from ~10B parameters
SMALL = 1e9


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

    # ---- declared facts (read by serving, merge, export, artifacts, memory, recommend, compare) ----------
    # peft's PeftType name of the adapters this method saves; None: peftlab's own tensor format.
    peft_type: ClassVar[str | None] = None
    # Every weight trains and is saved: one whole model per task (full fine-tuning).
    trains_all_weights: ClassVar[bool] = False
    # The base is loaded quantised (QLoRA): merging and serving use a full-precision copy of it.
    quantized_base: ClassVar[bool] = False
    # Selection guide rows (``peftlab recommend``): task type -> (points, one-line reason with its source).
    guide: ClassVar[dict[str, tuple[float, str]]] = {}
    # Extra points and the reason when the user has only a few dozen examples; None: no change.
    few_shot_guide: ClassVar[tuple[float, str] | None] = None
    # Why the method cannot train on packed rows (``--packing``: several examples in one row, kept apart by
    # their position ids), or None when it can. Read by training (a refusal before any work) and compare (an
    # ``unsupported`` row instead of a failed run).
    packing_refusal: ClassVar[str | None] = None

    def __init__(self, options=None, **overrides):
        if options is None:
            options = self.make_options(overrides)
        elif overrides:
            options = dataclasses.replace(options, **overrides)
        self.options = options
        # The number of optimizer steps the run will take, set by the trainer before ``apply`` (None when
        # the method is applied outside training: estimates, reloading). A method whose schedule depends on
        # it (AdaLoRA's budget) reads it in ``apply`` and refuses to train without it.
        self.total_steps: int | None = None

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

    @classmethod
    def options_from_peft_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Options a plain peft adapter folder's ``adapter_config.json`` states (no peftlab.json to read them
        from) that change what the method declares: LoRA's ``use_dora`` decides how the server batches it."""
        return {}

    # ---- what the trainer asks ---------------------------------------------------------------------
    @property
    def optimizer(self) -> str:
        """The ``TrainingArguments.optim`` name to train with."""
        return "adamw_torch"

    def optimizer_parameter_groups(self, model, learning_rate: float, weight_decay: float) -> list[dict] | None:
        """Parameter groups with their own learning rates (LoRA+); None: one group, the Trainer's default."""
        return None

    def training_callbacks(self, model) -> list:
        """``transformers.TrainerCallback`` objects the method needs while training (AdaLoRA's rank updates).

        Called after ``apply``; ``self.total_steps`` is known by then."""
        return []

    # ---- what the server asks ------------------------------------------------------------------
    def serving_facts(self) -> ServingFacts:
        """How ``peftlab serve`` hosts an adapter of this method (see :class:`ServingFacts`)."""
        if self.trains_all_weights:
            return ServingFacts(mode="own-copy", private="all",
                                note="full fine-tune: its own copy of every weight (nothing shared with the base).")
        if self.peft_type is not None:
            return ServingFacts(mode="peft", group=self.peft_type)
        return ServingFacts(mode="module-tree")

    # ---- what merge and export say -------------------------------------------------------------
    def merge_note(self) -> str:
        """What a user should know when this method's adapter is merged or exported ("" for nothing)."""
        return ""

    # ---- what recommend asks --------------------------------------------------------------------
    def guide_row(self, task_type: str) -> tuple[float, str]:
        """(points, reason) of the selection guide for a task type; a neutral row when the method has none."""
        if task_type in self.guide:
            return self.guide[task_type]
        return 1.0, f"no selection-guide entry for {task_type} yet: judged by its measured cost alone"

    def guide_adjustments(self, situation: GuideSituation) -> list[tuple[float, str]]:
        """(points, reason) that the model size or the data move this method by (most methods: none)."""
        return []

    # ---- what the memory estimator asks --------------------------------------------------------
    def apply_for_estimate(self, model, kind: str) -> tuple[Any, dict[str, Any]]:
        """Apply to a model on the ``meta`` device for ``peftlab.memory``: (applied model, facts).

        The facts are :class:`peftlab.memory.Footprint` fields that differ from what the applied model's
        modules show (QLoRA: the 4-bit weights that the meta model cannot hold)."""
        self.check_supported(model, kind)
        return self.apply(model, kind), {}

    def memory_facts(self, applied) -> dict[str, Any]:
        """Footprint fields only the method knows: virtual tokens, prefix length, saved-parameter count..."""
        return {}

    # ---- lifecycle -------------------------------------------------------------------------
    def check_supported(self, model, kind: str) -> None:
        if kind not in self.kinds:
            raise PeftlabError(
                f"Method '{self.name}' cannot run {kind} on {type(model).__name__} ({model_family(model)}): "
                f"it supports only {', '.join(self.kinds)} tasks."
            )

    def model_load_kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` keyword arguments for the base model (qlora: quantization)."""
        return {}

    def apply(self, model, kind: str):  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, model, directory: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, base_model, directory: Path, kind: str):  # pragma: no cover
        raise NotImplementedError

    def merge(self, model):
        raise PeftlabError(
            f"Method '{self.name}' cannot be merged into the base weights: {self.why_not_mergeable()} "
            "Serve it unmerged (peftlab serve) or export it (peftlab export)."
        )

    def why_not_mergeable(self) -> str:
        return "it adds computation that is not a change to existing weights."

    def trainable_parameters_formula(self, model, kind: str) -> int:  # pragma: no cover
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

def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


class PeftMethod(Method):
    """A method that peft implements: subclasses return the ``PeftConfig`` (and declare ``peft_type``).

    ``prepare_base`` and ``finish_loaded`` are the two places a method adjusts the model around peft's own
    loading (transformers-5 shims); the server loads through :meth:`load` with its own adapter name, so
    the same steps run there as in training and ``peftlab eval``.
    """

    def peft_config(self, model, kind: str):  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare_base(self, model, kind: str):
        """The base model before peft wraps it (default: unchanged)."""
        return model

    def finish_loaded(self, peft_model, kind: str):
        """The PeftModel after peft built or loaded it (default: unchanged)."""
        return peft_model

    def apply(self, model, kind):
        from peft import get_peft_model

        from peftlab.methods.compat import add_qa_token_type_compat

        self.check_supported(model, kind)
        peft_model = get_peft_model(self.prepare_base(model, kind), self.peft_config(model, kind))
        return add_qa_token_type_compat(self.finish_loaded(peft_model, kind))

    def save(self, model, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(directory), safe_serialization=True)

    def load(self, base_model, directory, kind, *, adapter_name: str = "default"):
        from peft import PeftModel

        from peftlab.methods.compat import add_qa_token_type_compat

        self.check_supported(base_model, kind)
        peft_model = PeftModel.from_pretrained(self.prepare_base(base_model, kind), str(directory),
                                               adapter_name=adapter_name, is_trainable=False)
        return add_qa_token_type_compat(self.finish_loaded(peft_model, kind))

    def merge(self, model):
        if not self.mergeable:
            return super().merge(model)
        from peftlab.methods.compat import remove_qa_token_type_compat

        return remove_qa_token_type_compat(model.merge_and_unload())


def trainable_state_dict(model) -> dict[str, Any]:
    """Only the tensors that train (for methods peftlab implements itself)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
