"""How much memory training a method on a model takes: a first-principles estimate, and a way to measure it.

* ``peftlab.memory.model``: the model's architecture numbers (``ModelSpec``, ``load_config``, the built-in
  configs that work offline) and its shapes-only copy on the ``meta`` device (``meta_model``);
* ``peftlab.memory.footprint``: what each method trains and adds on that copy (``footprints``);
* ``peftlab.memory.estimate``: the analytical estimate (``estimate`` -> ``MemoryEstimate``; its module
  docstring explains every term);
* ``peftlab.memory.measure``: measuring real runs on this machine to check the estimate
  (``measure``, ``warm_up``, ``saved_activation_bytes``, ``validate``; ``python -m peftlab.memory``).

Every public name is importable from ``peftlab.memory`` itself.
"""

from peftlab.memory.estimate import (CPU_RUNTIME_BYTES, CUDA_RUNTIME_BYTES, DEVICES, GENERATIVE_KINDS, PRECISIONS,
                                     WEIGHT_DTYPES, GiB, MemoryEstimate, MiB, estimate)
from peftlab.memory.footprint import INPUT_SIDE_NAMES, Footprint, footprints
from peftlab.memory.measure import main, measure, saved_activation_bytes, validate, warm_up
from peftlab.memory.model import (BUILTIN_ALIASES, BUILTIN_CONFIGS, ModelSpec, architecture, builtin_name,
                                  declares_separate_output_embeddings, load_config, meta_model, model_spec)

__all__ = [
    "BUILTIN_ALIASES", "BUILTIN_CONFIGS", "CPU_RUNTIME_BYTES", "CUDA_RUNTIME_BYTES", "DEVICES", "GENERATIVE_KINDS",
    "GiB", "INPUT_SIDE_NAMES", "MiB", "PRECISIONS", "WEIGHT_DTYPES", "Footprint", "MemoryEstimate", "ModelSpec",
    "architecture", "builtin_name", "declares_separate_output_embeddings", "estimate", "footprints", "load_config",
    "main", "measure", "meta_model", "model_spec", "saved_activation_bytes", "validate", "warm_up",
]
