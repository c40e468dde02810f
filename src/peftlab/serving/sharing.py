"""Module trees that share one copy of the base weights.

A hosted adapter gets its own *module tree* (so peft or peftlab can inject layers into it) whose
parameters are the base model's very tensors, except the few the adapter owns (``ServingFacts.private``:
the task head, BitFit's bias vectors). ``copy.deepcopy`` with every shared tensor pre-seeded in its memo
does that in one call; torch has no API for "copy the modules, keep the tensors".
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from peftlab.modelinfo import HEAD_NAMES, head_modules


def clone_sharing(model, private: Callable[[str], bool] = lambda name: False):
    """A deep copy of ``model``'s module tree whose parameters and buffers ARE ``model``'s tensors,
    except parameters for which ``private(name)`` is true (those are copied)."""
    memo: dict[int, Any] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if not private(name):
            memo[id(parameter)] = parameter
    for _, buffer in model.named_buffers(remove_duplicate=False):
        memo[id(buffer)] = buffer
    return copy.deepcopy(model, memo)


def share_parameters(donor, model, *, skip_prefixes: tuple[str, ...] = ()) -> int:
    """Point ``model``'s parameters at ``donor``'s where name, shape and dtype agree; returns how many.

    Tied parameters (one tensor under two names) stay tied: the mapping is by tensor identity.
    """
    donor_named = dict(donor.named_parameters(remove_duplicate=False))
    mapping: dict[int, Any] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name.split(".")[0] in skip_prefixes:
            continue
        source = donor_named.get(name)
        if source is not None and source.shape == parameter.shape and source.dtype == parameter.dtype:
            mapping[id(parameter)] = source
    for module in model.modules():
        for key, parameter in list(module._parameters.items()):
            if parameter is not None and id(parameter) in mapping:
                module._parameters[key] = mapping[id(parameter)]
    return len(mapping)


def is_head(name: str) -> bool:
    """A parameter of the task head (its first dotted part is a head module)."""
    return name.split(".")[0] in HEAD_NAMES


def is_bias_or_head(name: str) -> bool:
    return is_head(name) or name.rsplit(".", 1)[-1] == "bias"


# ServingFacts.private -> which parameters a hosted adapter gets its own copy of.
PRIVATE = {"head": is_head, "biases+head": is_bias_or_head, "all": lambda name: True}


def private_parameters(private: str) -> Callable[[str], bool]:
    """The predicate for a method's declared ``ServingFacts.private``."""
    try:
        return PRIVATE[private]
    except KeyError:
        raise ValueError(f"ServingFacts.private must be one of {', '.join(PRIVATE)}, not {private!r}") from None


def resize_head(model, n_outputs: int) -> bool:
    """Give a classification model a fresh head with ``n_outputs`` outputs (in place); False if unknown."""
    import torch
    from torch import nn

    old = int(getattr(model.config, "num_labels", 0))
    replaced = False
    for attribute, head in head_modules(model).items():
        for path, module in list(head.named_modules()):  # ("", head) first
            if isinstance(module, nn.Linear) and module.out_features == old:
                new = nn.Linear(module.in_features, n_outputs, bias=module.bias is not None,
                                dtype=module.weight.dtype)
                with torch.no_grad():
                    new.weight.normal_(0.0, 0.02)
                    if new.bias is not None:
                        new.bias.zero_()
                if path == "":
                    setattr(model, attribute, new)
                else:
                    parent_path, _, leaf = path.rpartition(".")
                    parent = head.get_submodule(parent_path) if parent_path else head
                    setattr(parent, leaf, new)
                replaced = True
                break
    if replaced:
        model.config.num_labels = n_outputs
    return replaced


def freeze_for_inference(model, device) -> Any:
    """``model`` on ``device``, in eval mode, with no parameter requiring a gradient."""
    model.to(device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
