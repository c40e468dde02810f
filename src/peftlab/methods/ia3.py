"""(IA)3: learned vectors that rescale inner activations (Liu et al. 2022, T-Few).

Three kinds of vectors: l_k and l_v rescale attention keys and values (a vector of out_features on
the key/value projections), l_ff rescales the input of the feed-forward output projection (a vector
of in_features). They start at one, so training starts from the pretrained function.

Category: additive. (IA)3 adds new trainable vectors and leaves every pretrained weight frozen and
unreparameterised, which is how the survey taxonomy (Lialin et al. 2023, "Scaling Down to Scale Up")
files it, beside adapters and soft prompts; peft likewise implements it as an injected layer. It is
nevertheless mergeable, because an elementwise rescaling of a linear layer's input or output is the
same as rescaling that layer's weight columns or rows: W' = diag(l)·W (keys/values), W' = W·diag(l)
(feed-forward). Implemented by peft (``IA3Config``).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.methods.base import VERY_LARGE, BaseOptions, PeftMethod, option
from peftlab.modelinfo import linear_shape
from peftlab.methods.compat import describe_model, head_parameter_count, iter_layers, unwrap


@dataclass
class IA3Options(BaseOptions):
    learning_rate: float = option(3e-3, "Peak learning rate (T-Few: 3e-3).")
    target_modules: list = option(
        [], "Modules whose activations are rescaled. Empty: peft's default for the architecture (attention "
            "keys and values plus the feed-forward output projection, for example key,value,output.dense on BERT).")
    feedforward_modules: list = option(
        [], "Which of target_modules are feed-forward layers (their input is rescaled, not their output). "
            "Empty: peft's default for the architecture.")


class IA3(PeftMethod):
    name = "ia3"
    category = "additive"
    mergeable = True
    paper = ("Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context "
             "Learning (NeurIPS 2022, arXiv:2205.05638)")
    summary = "learned vectors rescaling attention keys/values and feed-forward activations"
    Options = IA3Options
    peft_type = "IA3"
    # Selection guide rows (peftlab recommend): task type -> (points, reason).
    guide = {
        "classification": (1.5, "a few rescaling vectors; strongest on large models (Liu et al. 2022)"),
        "ner": (1.0, "a few rescaling vectors; weaker on token-level tasks on small models"),
        "qa": (1.0, "a few rescaling vectors; weaker on token-level tasks on small models"),
        "generation": (1.5, "a few rescaling vectors; best on large models (Liu et al. 2022)"),
        "seq2seq": (2.0, "(IA)3 was built on the T0 encoder-decoder (Liu et al. 2022)"),
    }
    few_shot_guide = (1.0, "(IA)3 was designed for few-shot learning (T-Few)")

    def _targets(self, model) -> tuple[list[str], list[str]]:
        from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
                                          TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)

        model_type = getattr(unwrap(model).config, "model_type", "")
        targets = list(self.options.target_modules) or TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)
        feedforward = (list(self.options.feedforward_modules)
                       or TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, []))
        if not targets:
            raise PeftlabError(
                f"Method '{self.name}' has no default target modules for {describe_model(model)}: set target_modules "
                "(the key and value projections and the feed-forward output projection) and feedforward_modules.")
        return list(targets), list(feedforward)

    def check_supported(self, model, kind):
        super().check_supported(model, kind)
        self._targets(model)

    def peft_config(self, model, kind):
        from peft import IA3Config

        targets, feedforward = self._targets(model)
        return IA3Config(task_type=TaskKind(kind).peft_task_type, target_modules=targets, feedforward_modules=feedforward)

    def trainable_parameters_formula(self, model, kind):
        """Per targeted layer: out_features (keys, values) or in_features (feed-forward), plus the task head.

        Matches target names as peft does: the full module name, or ``.name`` as its suffix; a target is
        feed-forward when its name ends with one of feedforward_modules.
        """
        targets, feedforward = self._targets(model)
        total = 0
        for name, layer in iter_layers(unwrap(model)):
            if not (name in targets or any(name.endswith("." + t) for t in targets)):
                continue
            fan_in, fan_out = linear_shape(layer)
            total += fan_in if any(name.endswith(f) for f in feedforward) else fan_out
        return total + head_parameter_count(model, kind)

    def guide_adjustments(self, situation):
        if situation.base_params >= VERY_LARGE:
            return [(2.0, "very large model: (IA)3's few vectors shine at billions of parameters (T-Few, 3B-11B)")]
        return []

    def inference_cost(self):
        return "none once merged (unmerged: one elementwise rescale per adapted layer)"

