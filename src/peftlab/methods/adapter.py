"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), implemented in peftlab.

An adapter is a small residual MLP, ``h + up(act(down(h)))`` with ``down: d -> m`` and ``up: m -> d``
(``m = d // reduction_factor``), applied to the output ``h`` of a transformer sub-layer's output
projection, before that sub-layer's dropout, residual addition and layer norm. ``up`` starts at zero,
so the adapted model computes exactly the base function at step 0 (Houlsby's near-identity start).

* ``houlsby``: one adapter after the attention-output projection and one after the FFN-output
  projection of every layer (2 per layer);
* ``pfeiffer``: one adapter after the FFN-output projection only (1 per layer).

peft has no bottleneck adapter and its registry cannot take new types, so the adapter is injected
by replacing each output projection with :class:`AdapterLayer`, which wraps the original layer
(still reachable as ``.base_layer`` and still exposing ``.weight``, which T5's FFN reads).

Only the adapters (and, for classification, the newly initialised task head) train; layer norms
stay frozen so the count is exactly ``2·(2·d·m + d + m)`` per layer. See docs/methods/native.md.

This module also holds the save/load format shared with BitFit (:class:`TensorFileMethod`):
``peftlab_adapter_config.json`` plus ``adapter_model.safetensors`` with only the trained tensors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.kinds import HEAD_KINDS
from peftlab.methods.base import BaseOptions, Method, ServingFacts, option, trainable_state_dict, write_json
from peftlab.modelinfo import head_modules, linear_shape, model_family
from peftlab.version import __version__

CONFIG_NAME = "peftlab_adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


# ---- the save format shared by the methods peftlab implements itself -------------------------------

def model_label(model: nn.Module) -> str:
    """How messages name a model: its Hub id / folder if it has one, else its class."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or ""
    return f"'{name}'" if name else type(model).__name__


def train_head(model: nn.Module, kind: str) -> None:
    """The task head of a classification model is newly initialised: it always trains."""
    if kind in HEAD_KINDS:
        for module in head_modules(model).values():
            module.requires_grad_(True)


def head_parameter_count(model: nn.Module, kind: str) -> int:
    if kind not in HEAD_KINDS:
        return 0
    seen: set[int] = set()
    total = 0
    for module in head_modules(model).values():
        for parameter in module.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel()
    return total


class TensorFileMethod(Method):
    """save/load for methods peftlab implements: a JSON config plus only the trained tensors.

    ``load`` re-applies the method (with the saved options) to a freshly loaded base model and
    copies the tensors in strictly: any missing, unexpected or mis-shaped tensor is refused.
    """

    def injected_modules(self, model: nn.Module) -> list[str]:
        """Names of the modules the method put into the model (none for purely selective methods)."""
        return []

    def _kind_of(self, model: nn.Module) -> str | None:
        return getattr(model, "_peftlab_kind", None)

    def save(self, model, directory):
        from safetensors.torch import save_file

        directory = Path(directory)
        kind = self._kind_of(model)
        if kind is None:
            raise PeftlabError(
                f"This model has not been prepared by the '{self.name}' method: call apply() before save()."
            )
        tensors = trainable_state_dict(model)
        if not tensors:
            raise PeftlabError(f"The '{self.name}' model has no trainable tensors to save.")
        directory.mkdir(parents=True, exist_ok=True)
        config = getattr(model, "config", None)
        write_json(directory / CONFIG_NAME, {
            "format_version": FORMAT_VERSION,
            "method": self.name,
            "options": self.options_dict(),
            "kind": kind,
            "base_model": {
                "model_type": getattr(config, "model_type", None),
                "name_or_path": getattr(config, "_name_or_path", None),
                "class": type(model).__name__,
            },
            "peftlab_version": __version__,
            "injected_modules": self.injected_modules(model),
            "tensors": {name: list(t.shape) for name, t in sorted(tensors.items())},
        })
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "method": self.name})

    def load(self, base_model, directory, kind):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file():
            raise PeftlabError(f"'{directory}' has no {CONFIG_NAME}: it is not a saved peftlab '{self.name}' adapter.")
        if not weights_path.is_file():
            raise PeftlabError(f"'{directory}' has no {WEIGHTS_NAME}: the '{self.name}' adapter is incomplete.")
        try:
            saved = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise PeftlabError(f"'{config_path}' is not valid JSON ({error.msg}, line {error.lineno}).") from None
        if saved.get("method") != self.name:
            raise PeftlabError(
                f"'{directory}' holds a '{saved.get('method')}' adapter, not a '{self.name}' one."
            )
        if saved.get("kind") not in (None, kind):
            raise PeftlabError(
                f"'{directory}' was trained for {saved['kind']} tasks; it cannot be loaded for a {kind} task."
            )
        saved_type = (saved.get("base_model") or {}).get("model_type")
        base_type = getattr(getattr(base_model, "config", None), "model_type", None)
        if saved_type and base_type and saved_type != base_type:
            raise PeftlabError(
                f"'{directory}' was trained on a {saved_type} model; the base model given is a {base_type} model."
            )
        self.options = self.make_options(saved.get("options") or {})
        model = self.apply(base_model, kind)

        expected_modules = saved.get("injected_modules")
        if expected_modules is not None and sorted(expected_modules) != sorted(self.injected_modules(model)):
            raise PeftlabError(
                f"'{directory}' does not fit this base model: it adapts {len(expected_modules)} modules, "
                f"the base model offers {len(self.injected_modules(model))} (different architecture or size)."
            )
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as error:
            raise PeftlabError(f"'{weights_path}' is not a readable safetensors file ({error}).") from None
        parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        missing = sorted(set(parameters) - set(tensors))
        unexpected = sorted(set(tensors) - set(parameters))
        wrong_shape = sorted(
            f"{name} (file {tuple(tensors[name].shape)}, model {tuple(parameters[name].shape)})"
            for name in set(parameters) & set(tensors) if tensors[name].shape != parameters[name].shape
        )
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing tensor(s): {_few(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensor(s): {_few(unexpected)}")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} tensor(s) with the wrong shape: {_few(wrong_shape)}")
        if problems:
            raise PeftlabError(
                f"Refusing '{weights_path}': it does not match the '{self.name}' model built on this base "
                f"({'; '.join(problems)}). The file is damaged or belongs to another model."
            )
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(tensors[name].to(dtype=parameter.dtype, device=parameter.device))
        return model


def _few(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---- the bottleneck adapter ---------------------------------------------------------------------------

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}
VARIANTS = ("houlsby", "pfeiffer")

# Where each architecture family's sub-layers end: (family, attention-output projection, FFN-output
# projection), as regular expressions on module names. T5's cross-attention output (EncDecAttention.o)
# gets no adapter, as in AdapterHub's defaults: one adapter per sub-layer kind keeps the per-layer
# count identical for encoder and decoder layers.
INJECTION_SITES = (
    ("BERT-style encoder", r"(^|\.)layer\.\d+\.attention\.output\.dense$", r"(^|\.)layer\.\d+\.output\.dense$"),
    ("DistilBERT", r"(^|\.)layer\.\d+\.attention\.out_lin$", r"(^|\.)layer\.\d+\.ffn\.lin2$"),
    ("GPT-2", r"(^|\.)h\.\d+\.attn\.c_proj$", r"(^|\.)h\.\d+\.mlp\.c_proj$"),
    ("Llama-style decoder", r"(^|\.)layers\.\d+\.self_attn\.o_proj$", r"(^|\.)layers\.\d+\.mlp\.down_proj$"),
    ("T5", r"(^|\.)block\.\d+\.layer\.0\.SelfAttention\.o$", r"(^|\.)block\.\d+\.layer\.\d+\.DenseReluDense\.wo$"),
)


class Bottleneck(nn.Module):
    """x -> up(act(down(x))); up is zero at start, down ~ N(0, 1e-2) (Houlsby's near-identity init)."""

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str, *, dtype=None, device=None):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=1e-2)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(self.act(self.down(x)))


class AdapterLayer(nn.Module):
    """An output projection followed by its adapter: h = base(x); h + adapter(h).

    It stands in for the wrapped layer: ``.weight``/``.bias`` and any other attribute resolve to the
    original layer (T5 reads ``wo.weight.dtype``; GPT-2's Conv1D has ``nf``).
    """

    def __init__(self, base_layer: nn.Module, bottleneck: int, non_linearity: str):
        super().__init__()
        self.base_layer = base_layer
        hidden = linear_shape(base_layer)[1]
        weight = base_layer.weight
        self.adapter = Bottleneck(hidden, bottleneck, non_linearity, dtype=weight.dtype, device=weight.device)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if name != "base_layer" and "base_layer" in modules:
                return getattr(modules["base_layer"], name)
            raise

    def forward(self, x):
        hidden = self.base_layer(x)
        return hidden + self.adapter(hidden)


@dataclass
class AdapterOptions(BaseOptions):
    learning_rate: float = option(
        1e-3, "Peak learning rate. Adapters want rates far above full fine-tuning: Houlsby et al. swept "
              "3e-5..3e-3; 1e-3 is a robust choice for short runs (AdapterHub suggests 1e-4 for long ones).")
    reduction_factor: int = option(
        16, "Bottleneck size m = hidden_size // reduction_factor (AdapterHub's default 16; Houlsby "
            "swept m in 8, 64, 256 for BERT-large, i.e. factors 128..4).", min=1)
    non_linearity: str = option(
        "relu", "Activation inside the bottleneck: relu, gelu, silu (= swish) or tanh. ReLU is "
                "AdapterHub's Pfeiffer-configuration default.")
    variant: str = option(
        "houlsby", "Where adapters go: 'houlsby' = after the attention-output and the FFN-output "
                   "projection of every layer; 'pfeiffer' = after the FFN-output projection only.")


class BottleneckAdapter(TensorFileMethod):
    name = "adapter"
    category = "additive"
    mergeable = False
    paper = ("Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP (arXiv:1902.00751); "
             "Pfeiffer et al. 2021, AdapterFusion (arXiv:2005.00247)")
    summary = "bottleneck MLP h + up(act(down(h))) after each layer's attention and FFN outputs"
    Options = AdapterOptions
    # Selection guide rows (peftlab recommend): task type -> (points, reason).
    guide = {
        "classification": (3.0, "classification favours adapters: within ~0.4% of full fine-tuning on GLUE with ~3% of the parameters (Houlsby et al. 2019)"),
        "ner": (3.0, "adapters hold up on sequence labelling, close to full fine-tuning"),
        "qa": (3.0, "adapters reach full fine-tuning on extractive QA (SQuAD, Houlsby et al. 2019)"),
        "generation": (1.5, "works, but adds sequential latency to every generated token"),
        "seq2seq": (1.5, "works, but adds sequential latency to every generated token"),
    }

    # ---- options ---------------------------------------------------------------------------------
    def _check_options(self) -> None:
        options = self.options
        if options.variant not in VARIANTS:
            raise PeftlabError(f"Option 'variant' of method 'adapter' must be one of {', '.join(VARIANTS)}; "
                               f"got {options.variant!r}.")
        if options.non_linearity not in ACTIVATIONS:
            raise PeftlabError(f"Option 'non_linearity' of method 'adapter' must be one of "
                               f"{', '.join(ACTIVATIONS)}; got {options.non_linearity!r}.")
        if int(options.reduction_factor) < 1:
            raise PeftlabError(f"Option 'reduction_factor' of method 'adapter' must be a positive integer; "
                               f"got {options.reduction_factor!r}.")

    def bottleneck_size(self, model: nn.Module) -> int:
        return _hidden_size(model) // int(self.options.reduction_factor)

    # ---- where adapters go -----------------------------------------------------------------------
    def sites(self, model: nn.Module) -> list[str]:
        """Names of the output projections that get an adapter, in model order."""
        names = [name for name, _ in model.named_modules()]
        layers = _layer_count(model)
        for family, attention, ffn in INJECTION_SITES:
            attention_names = [n for n in names if re.search(attention, n)]
            ffn_names = [n for n in names if re.search(ffn, n)]
            if not attention_names and not ffn_names:
                continue
            if len(attention_names) != layers or len(ffn_names) != layers:
                raise PeftlabError(
                    f"Cannot place adapters in {model_label(model)}: it looks like a {family} but has "
                    f"{len(attention_names)} attention-output and {len(ffn_names)} FFN-output projections "
                    f"for {layers} layers."
                )
            wanted = set(ffn_names) | (set(attention_names) if self.options.variant == "houlsby" else set())
            return [n for n in names if n in wanted]
        raise PeftlabError(
            f"Method 'adapter' does not know where the layers of {model_label(model)} "
            f"({model_family(model)}) end; it supports BERT-style encoders, DistilBERT, GPT-2, "
            "Llama-style decoders and T5."
        )

    def injected_modules(self, model):
        return [name for name, module in model.named_modules() if isinstance(module, AdapterLayer)]

    # ---- lifecycle -------------------------------------------------------------------------------
    def check_supported(self, model, kind):
        super().check_supported(model, kind)
        self._check_options()
        if any(isinstance(module, AdapterLayer) for module in model.modules()):
            raise PeftlabError(f"{model_label(model)} already has bottleneck adapters; load a fresh base model.")
        if self.bottleneck_size(model) < 1:
            raise PeftlabError(
                f"Option 'reduction_factor' ({self.options.reduction_factor}) is larger than the hidden size "
                f"({_hidden_size(model)}) of {model_label(model)}: the bottleneck would be empty."
            )
        for name in self.sites(model):
            try:
                linear_shape(model.get_submodule(name))
            except TypeError:
                raise PeftlabError(
                    f"Method 'adapter' cannot wrap '{name}' ({type(model.get_submodule(name)).__name__}): "
                    "it is not a linear layer."
                ) from None

    def apply(self, model, kind):
        self.check_supported(model, kind)
        bottleneck = self.bottleneck_size(model)
        sites = self.sites(model)
        model.requires_grad_(False)
        for name in sites:
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapped = AdapterLayer(getattr(parent, attribute), bottleneck, self.options.non_linearity)
            wrapped.train(parent.training)
            setattr(parent, attribute, wrapped)
        train_head(model, kind)
        model._peftlab_kind = kind
        return model

    def why_not_mergeable(self) -> str:
        return "the adapter's non-linearity cannot be folded into a linear weight."

    def trainable_parameters_formula(self, model, kind):
        """Per adapter down (d·m + m) + up (m·d + d); Houlsby: 2 adapters per layer, Pfeiffer: 1; + head."""
        d = _hidden_size(model)
        m = d // int(self.options.reduction_factor)
        per_layer = 2 if self.options.variant == "houlsby" else 1
        return _layer_count(model) * per_layer * (2 * d * m + d + m) + head_parameter_count(model, kind)

    def serving_facts(self):
        return ServingFacts(mode="module-tree", note="bottleneck adapter: served on its own module tree over the "
                                                     "shared base weights (no batching with other adapters).")

    def memory_facts(self, applied):
        # the adapters sit after each block's attention output: the first block's attention input needs no grad
        return {"first_attention_frozen": True}

    def inference_cost(self):
        per_layer = "2 bottleneck MLPs" if self.options.variant == "houlsby" else "1 bottleneck MLP"
        return f"+{per_layer} per layer (not mergeable; adds sequential latency)"


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    for attribute in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            return value
    raise PeftlabError(f"Cannot tell the hidden size of {model_label(model)} from its config.")


def _layer_count(model: nn.Module) -> int:
    """Transformer layers with an adapter site: encoder + decoder layers for encoder-decoders."""
    config = model.config
    layers = None
    for attribute in ("num_hidden_layers", "num_layers", "n_layer", "n_layers"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            layers = value
            break
    if layers is None:
        raise PeftlabError(f"Cannot tell the number of layers of {model_label(model)} from its config.")
    if getattr(config, "is_encoder_decoder", False):
        decoder = getattr(config, "num_decoder_layers", None)
        layers += decoder if isinstance(decoder, int) else layers
    return layers
