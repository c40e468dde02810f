"""A PEFT method defined outside peftlab: LayerNorm tuning (Zhao et al. 2023), as a plugin would add it.

One file and one ``register_method`` call, no edit in ``src/``: the architecture test
(tests/test_plugin_method.py) checks that train, reload, ``peftlab methods``, ``compare``,
``recommend``, the memory estimate and ``serve`` all accept it. Separate processes (compare's
workers, the CLI) find it through ``PEFTLAB_PLUGINS=plugin_ln_tuning`` with this folder on PYTHONPATH.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.kinds import TaskKind
from peftlab.methods import register_method
from peftlab.methods.base import BaseOptions, PeftMethod, option


@dataclass
class LNTuningOptions(BaseOptions):
    learning_rate: float = option(5e-3, "Peak learning rate (LayerNorm gains and biases tolerate high rates).")


@register_method
class LNTuning(PeftMethod):
    name = "ln-tuning"
    category = "selective"
    paper = "Zhao et al. 2023, Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning"
    summary = "trains a copy of every LayerNorm (gain and bias) and the task head"
    Options = LNTuningOptions
    peft_type = "LN_TUNING"
    kinds = (TaskKind.SEQ_CLS, TaskKind.TOKEN_CLS, TaskKind.CAUSAL_LM)

    def peft_config(self, model, kind):
        from peft import LNTuningConfig

        # peft has no default LayerNorm names for most architectures: name them by the module's type
        names = sorted({name.rpartition(".")[2] for name, module in model.named_modules() if _is_norm(module)})
        return LNTuningConfig(task_type=TaskKind(kind).peft_task_type, target_modules=names)

    def trainable_parameters_formula(self, model, kind):
        """Every norm's gain and bias once (peft trains a copy beside the frozen original), plus the head."""
        from peftlab.methods.compat import head_parameter_count, unwrap

        norms = sum(p.numel() for name, module in unwrap(model).named_modules()
                    if _is_norm(module) and name.endswith(".base_layer") for p in module.parameters(recurse=False))
        return norms + head_parameter_count(model, kind)


def _is_norm(module) -> bool:
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
