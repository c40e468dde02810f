"""What the peft methods that wrap chosen layers share (AdaLoRA, VeRA, LoHa, LoKr, OFT).

Each of them adapts the layers named by ``target_modules`` (default: peft's per-architecture list for
the method, ``peft.utils.constants.TRANSFORMERS_MODELS_TO_<METHOD>_TARGET_MODULES_MAPPING``, which for
these methods is LoRA's: the attention query/value projections), trains the task head in full (peft's
``modules_to_save``) and merges with peft's ``merge_and_unload``. A subclass declares which peft mapping
holds its defaults, whether peft can wrap transformers' ``Conv1D`` (GPT-2's projections), how many
parameters it trains per adapted layer, and its ``PeftConfig``.
"""

from __future__ import annotations

from typing import ClassVar

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.methods.base import PeftMethod
from peftlab.methods.compat import describe_model, head_parameter_count, targeted_layers, unwrap
from peftlab.modelinfo import linear_shape


class LayerTuner(PeftMethod):
    """A peft method that wraps the layers named by ``target_modules``; subclasses declare the rest."""

    mergeable = True
    # The name of peft's per-architecture default targets (a dict in peft.utils.constants).
    target_mapping: ClassVar[str] = "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"
    # peft's layer for the method wraps transformers' Conv1D (GPT-2's attention and MLP projections).
    wraps_conv1d: ClassVar[bool] = True

    def targets(self, model) -> list[str]:
        """The module names to adapt: the option, else peft's default for the architecture."""
        import peft.utils.constants as constants

        given = list(getattr(self.options, "target_modules", []) or [])
        if given:
            return given
        model_type = getattr(getattr(unwrap(model), "config", None), "model_type", "")
        defaults = getattr(constants, self.target_mapping).get(model_type)
        if not defaults:
            raise PeftlabError(
                f"Method '{self.name}' has no default target modules for {describe_model(model)}: set target_modules "
                "to the attention projections to adapt (for example q_proj,v_proj).")
        return list(defaults)

    def check_supported(self, model, kind):
        super().check_supported(model, kind)
        layers = targeted_layers(model, self.targets(model))
        if not layers:
            raise PeftlabError(
                f"Method '{self.name}' finds none of the target modules {', '.join(self.targets(model))} in "
                f"{describe_model(model)}: set target_modules to names of its linear layers.")
        if not self.wraps_conv1d:
            conv1d = sorted({name.rsplit(".", 1)[-1] for name, layer in layers if type(layer).__name__ == "Conv1D"})
            if conv1d:
                raise PeftlabError(
                    f"Method '{self.name}' cannot adapt {describe_model(model)}, because peft's {self.name} wraps "
                    f"only torch Linear and convolution layers and this model's {', '.join(conv1d)} are transformers "
                    "Conv1D layers; use lora, dora, adalora or vera on this architecture.")

    def task_type(self, kind) -> str:
        return TaskKind(kind).peft_task_type

    def layer_parameters(self, fan_in: int, fan_out: int) -> int:  # pragma: no cover - abstract
        """Trainable parameters the method adds to one adapted layer of this shape."""
        raise NotImplementedError

    def trainable_parameters_formula(self, model, kind):
        """Σ over adapted layers of ``layer_parameters(in, out)``, plus the task head (trained in full)."""
        total = sum(self.layer_parameters(*linear_shape(layer)) for _, layer in targeted_layers(model, self.targets(model)))
        return total + head_parameter_count(model, kind)
