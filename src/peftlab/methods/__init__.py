"""The method registry: a ``--method`` name -> the module whose ``Method`` subclass implements it.

Adding a method is one new module under ``peftlab/methods/`` plus one line here; a method defined
outside the package (a plugin, a test) joins with ``register_method``. So that separate processes (the
CLI, ``compare``'s isolated workers, ``torchrun`` ranks) see it too, the registry imports the modules of
the ``peftlab.methods`` entry-point group (a plugin package's ``pyproject.toml``) and those named in
``$PEFTLAB_PLUGINS`` (comma-separated module names) the first time it is asked. Everything else (train, eval,
methods, compare, recommend, the memory estimate, serve) finds it through this registry and reads
the facts it declares (``peftlab.methods.base.Method``).
"""

from __future__ import annotations

import importlib
import os

from peftlab.errors import PeftlabError, did_you_mean
from peftlab.methods.base import CATEGORIES, Method

_REGISTRY: dict[str, tuple[str, str] | type[Method]] = {
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
    "dora": ("peftlab.methods.dora", "DoRA"),
    "adalora": ("peftlab.methods.adalora", "AdaLoRA"),
    "vera": ("peftlab.methods.vera", "VeRA"),
    "loha": ("peftlab.methods.loha", "LoHa"),
    "lokr": ("peftlab.methods.lokr", "LoKr"),
    "oft": ("peftlab.methods.oft", "OFT"),
}


PLUGINS_ENV = "PEFTLAB_PLUGINS"
ENTRY_POINT_GROUP = "peftlab.methods"
_plugins_loaded = False


def load_plugins() -> None:
    """Import the plugin modules once: entry points of ``peftlab.methods`` and ``$PEFTLAB_PLUGINS``."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # before importing: a plugin's own register_method call must not recurse
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
    for module_name in filter(None, (part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module_name)
        except ImportError as error:
            raise PeftlabError(f"${PLUGINS_ENV} names module '{module_name}', which cannot be imported ({error}). "
                               "Fix the name or its PYTHONPATH, or unset the variable.") from None


def method_names() -> list[str]:
    load_plugins()
    return list(_REGISTRY)


def register_method(method_class: type[Method], name: str | None = None) -> type[Method]:
    """Make a ``Method`` subclass available by its ``name`` (or ``name``) to every command and API.

    Usable as a class decorator. A method registered under an existing name replaces it."""
    if not (isinstance(method_class, type) and issubclass(method_class, Method)):
        raise TypeError(f"register_method takes a Method subclass, not {method_class!r}")
    name = name or method_class.name
    if method_class.category not in CATEGORIES:
        raise PeftlabError(f"Method '{name}' declares category {method_class.category!r}; "
                           f"use one of {', '.join(CATEGORIES)}.")
    _REGISTRY[name] = method_class
    return method_class


def unregister_method(name: str) -> None:
    """Remove a method registered with ``register_method`` (tests clean up with it)."""
    _REGISTRY.pop(name, None)


def get_method_class(name: str) -> type[Method]:
    load_plugins()
    if name not in _REGISTRY:
        raise PeftlabError(f"Unknown method '{name}'. {did_you_mean(name, method_names())}")
    entry = _REGISTRY[name]
    if isinstance(entry, type):
        return entry
    module_name, class_name = entry
    return getattr(importlib.import_module(module_name), class_name)


def method_for_peft_type(peft_type: str) -> str | None:
    """The method that loads a plain peft adapter folder of this ``peft_type`` (the first registered one that
    saves it: LORA -> lora, PREFIX_TUNING -> prefix-tuning); None when no method does."""
    wanted = str(peft_type).upper()
    for name in method_names():
        cls = get_method_class(name)
        if cls.peft_type == wanted and not cls.quantized_base:
            return name
    return None


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
    known = method_names()
    for name in names:
        if name not in known:
            raise PeftlabError(f"Unknown method '{name}'. {did_you_mean(name, method_names())}")
    return names


__all__ = ["Method", "CATEGORIES", "get_method", "get_method_class", "method_names", "parse_methods",
           "register_method", "unregister_method", "method_for_peft_type", "load_plugins"]
