"""Facts read off a model object: task heads, parameter counts, linear layers, family.

A leaf module (imports torch only inside functions): methods, memory estimation, serving, merging and
compare all ask the same questions of a model, and the answers live here once.
"""

from __future__ import annotations

from typing import Any

# Task heads that are newly initialised for classification and QA and so always trained.
HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs")
# Output projections, counted apart from the transformer blocks by the memory estimator.
OUTPUT_HEAD_NAMES = (*HEAD_NAMES, "lm_head")


def head_modules(model) -> dict[str, Any]:
    """The task head(s) a classification model adds on top of the backbone, by attribute name."""
    from torch import nn

    return {name: getattr(model, name) for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)}


def is_head_parameter(name: str) -> bool:
    """Whether a parameter or tensor name belongs to a task head (any dotted part is a head name)."""
    return any(part in HEAD_NAMES for part in name.split("."))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights counted as their logical size."""
    trainable = total = 0
    for parameter in model.parameters():
        count = int(getattr(parameter, "ds_numel", 0) or parameter.numel())  # ZeRO-3: the whole, not the slice
        if parameter.__class__.__name__ == "Params4bit":
            quant_state = getattr(parameter, "quant_state", None)
            count = int(quant_state.shape.numel()) if quant_state is not None else count * 2
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def is_linear(module) -> bool:
    """A torch Linear (bitsandbytes' 4-bit one included) or GPT-2's Conv1D."""
    from torch import nn

    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_shape(module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, GPT-2 Conv1D or bitsandbytes 4-bit linear."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if module.__class__.__name__ == "Conv1D":  # GPT-2 stores weight as (in, out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def model_family(model) -> str:
    """The model's ``model_type`` (bert, llama, t5...), or its class name when it has no config."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", type(model).__name__)


def config_value(config, *names, default=None):
    """The first of ``names`` that the config sets (architectures name the same number differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def hidden_size(config) -> int:
    return int(config_value(config, "hidden_size", "d_model", "n_embd", "dim"))


def num_layers(config) -> int:
    return int(config_value(config, "num_hidden_layers", "num_layers", "n_layer", "n_layers"))


def num_heads(config) -> int:
    return int(config_value(config, "num_attention_heads", "num_heads", "n_head", "n_heads"))


def parent_module(model, name: str):
    """The module that holds submodule ``name`` (the model itself for a top-level name)."""
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


__all__ = ["HEAD_NAMES", "OUTPUT_HEAD_NAMES", "head_modules", "is_head_parameter", "count_parameters", "is_linear",
           "linear_shape", "model_family", "config_value", "hidden_size", "num_layers", "num_heads", "parent_module"]
