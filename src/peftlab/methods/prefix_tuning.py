"""Prefix tuning: trainable key/value prefixes in every attention layer (Li & Liang 2021).

Each layer's attention sees n extra key/value pairs in front of the sequence's own. The prefix is
reparameterised through an MLP during training (P = MLP(P'), more stable, as in the paper); peft
saves the resulting per-layer prefix, so the reloaded model carries no MLP. Without the projection
this is P-Tuning v2 (``p_tuning_v2.py``). Implemented by peft (``PrefixTuningConfig``), with a
transformers-5 shim for classification models (``compat.py``).

peft applies the prefix to decoder self-attention only on encoder-decoder models (peft's docs say so;
the paper also prefixes the encoder).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.errors import PeftlabError
from peftlab.methods.base import ALL_KINDS, BaseOptions, option
from peftlab.methods.compat import (add_prefix_compat, describe_model, head_parameter_count, needs_prefix_compat,
                                    prefix_cache_reachable, prompt_learning_dims)
from peftlab.methods.prompt_tuning import PromptLearningMethod

CLASSIFICATION_KINDS = ("seq-cls", "token-cls", "qa")  # peft checks the forward signature (see compat.py)


@dataclass
class PrefixTuningOptions(BaseOptions):
    learning_rate: float = option(
        3e-4, "Peak learning rate. Measured (minilm + SST-2, 2,000 examples x 3 epochs): peft's guide's 1e-2 and "
              "3e-3 collapse to the majority class, 1e-3 does on one seed of three, 3e-4 reaches 0.71-0.73 on every "
              "seed tried (Li & Liang used 5e-5 for GPT-2 Medium over 10 epochs).")
    num_virtual_tokens: int = option(
        20, "Prefix length: key/value pairs added to every layer (peft's guide; the paper used 10 for "
            "table-to-text and 200 for summarisation).")
    projection_size: int = option(
        512, "Hidden size of the MLP that reparameterises the prefix during training (the paper's 512 for "
             "table-to-text).")


class PrefixTuning(PromptLearningMethod):
    name = "prefix-tuning"
    paper = ("Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation "
             "(ACL 2021, arXiv:2101.00190)")
    summary = "trainable key/value prefixes in every attention layer, reparameterised by an MLP"
    kinds = ALL_KINDS
    Options = PrefixTuningOptions
    prefix_projection = True

    def why_not_mergeable(self) -> str:
        return ("its prefix is extra keys and values every attention layer attends to, not a change to any "
                "existing weight, so there is nothing to add it into.")

    def check_supported(self, model, kind):
        super().check_supported(model, kind)
        if kind in CLASSIFICATION_KINDS and not prefix_cache_reachable(model):
            raise PeftlabError(
                f"Method '{self.name}' cannot run {kind} on {describe_model(model)}: its forward takes no "
                "key/value cache, so there is no way to hand the prefix to its attention layers.")

    def _prepare(self, model, kind):
        """The transformers-5 signature shim (see compat.py), for classification models that need it."""
        if kind in CLASSIFICATION_KINDS and needs_prefix_compat(model):
            add_prefix_compat(model)
        return model

    def peft_config(self, model, kind):
        from peft import PrefixTuningConfig

        extra = {}
        if self.prefix_projection:
            extra = {"prefix_projection": True, "encoder_hidden_size": int(self.options.projection_size)}
        return PrefixTuningConfig(**self._common_config(kind), **extra)

    def apply(self, model, kind):
        self.check_supported(model, kind)  # before touching the model
        return super().apply(self._prepare(model, kind), kind)

    def load(self, base_model, directory, kind):
        return super().load(self._prepare(base_model, kind), directory, kind)

    def trainable_parameters_formula(self, model, kind):
        """Per peft's PrefixEncoder, with n tokens, L layers, d = hidden (key/value width on GQA models), p:

        with projection: n·d (embedding) + (d·p + p) + (p·2Ld + 2Ld); without: n·2Ld. Plus the task head.
        """
        dims = prompt_learning_dims(model, kind, prefix=True)
        n, d, layers = self.options.num_virtual_tokens, dims["token_dim"], dims["layers"]
        if self.prefix_projection:
            p = int(self.options.projection_size)
            total = n * d + (d * p + p) + (p * 2 * layers * d + 2 * layers * d)
        else:
            total = n * 2 * layers * d
        return total + head_parameter_count(model, kind)

    def inference_cost(self):
        n = self.options.num_virtual_tokens
        return f"+{n} prefix key/values per layer (every layer attends over {n} more positions)"
