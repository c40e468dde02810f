"""The method registry: a ``--method`` name -> the module whose ``Method`` subclass implements it.

Adding a method is one new module under ``peftlab/methods/`` plus one line here.
"""

from __future__ import annotations

import importlib

from peftlab.errors import PeftlabError, did_you_mean
from peftlab.methods.base import CATEGORIES, Method

_REGISTRY: dict[str, tuple[str, str]] = {
    "lora": ("peftlab.methods.lora", "LoRA"),
    "qlora": ("peftlab.methods.qlora", "QLoRA"),
    "adapter": ("peftlab.methods.adapter", "BottleneckAdapter"),
    "prompt-tuning": ("peftlab.methods.prompt_tuning", "PromptTuning"),
    "prefix-tuning": ("peftlab.methods.prefix_tuning", "PrefixTuning"),
    "p-tuning": ("peftlab.methods.p_tuning", "PTuning"),
    "p-tuning-v2": ("peftlab.methods.p_tuning_v2", "PTuningV2"),
    "ia3": ("peftlab.methods.ia3", "IA3"),
    "bitfit": ("peftlab.methods.bitfit", "BitFit"),
    "full": ("peftlab.methods.full", "FullFineTuning"),
}


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise PeftlabError(f"Unknown method '{name}'. {did_you_mean(name, method_names())}")
    module_name, class_name = _REGISTRY[name]
    return getattr(importlib.import_module(module_name), class_name)


def get_method(name: str, **overrides) -> Method:
    """A configured method: its paper defaults with ``overrides`` applied."""
    return get_method_class(name)(**overrides)


def parse_methods(spec: str | list[str]) -> list[str]:
    """'all' or 'lora,bitfit' -> validated names, in registry order for 'all'."""
    names = spec if isinstance(spec, list) else [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return method_names()
    if not names:
        raise PeftlabError(f"No methods given. Use 'all' or a comma list of: {', '.join(method_names())}.")
    for name in names:
        if name not in _REGISTRY:
            raise PeftlabError(f"Unknown method '{name}'. {did_you_mean(name, method_names())}")
    return names


__all__ = ["Method", "CATEGORIES", "get_method", "get_method_class", "method_names", "parse_methods"]
