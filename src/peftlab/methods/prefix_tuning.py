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
from peftlab.kinds import ALL_KINDS, HEAD_KINDS
from peftlab.methods.base import BaseOptions, option
from peftlab.methods.compat import (add_prefix_compat, describe_model, head_parameter_count, needs_prefix_compat,
                                    prefix_cache_reachable, prompt_learning_dims)
from peftlab.methods.prompt_tuning import PromptLearningMethod

# Kinds whose peft forward checks the model signature for past_key_values (see compat.py).
SIGNATURE_CHECKED_KINDS = HEAD_KINDS


@dataclass
class PrefixTuningOptions(BaseOptions):
    learning_rate: float = option(
        3e-4, "Peak learning rate. Measured (minilm + SST-2, 2,000 examples x 3 epochs): peft's guide's 1e-2 and "
              "3e-3 collapse to the majority class, 1e-3 does on one seed of three, 3e-4 reaches 0.71-0.73 on every "
              "seed tried (Li & Liang used 5e-5 for GPT-2 Medium over 10 epochs).")
    num_virtual_tokens: int = option(
        20, "Prefix length: key/value pairs added to every layer (peft's guide; the paper used 10 for "
            "table-to-text and 200 for summarisation).", min=1)
    projection_size: int = option(
        512, "Hidden size of the MLP that reparameterises the prefix during training (the paper's 512 for "
             "table-to-text).", min=1)


class PrefixTuning(PromptLearningMethod):
    name = "prefix-tuning"
    paper = ("Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation "
             "(ACL 2021, arXiv:2101.00190)")
    summary = "trainable key/value prefixes in every attention layer, reparameterised by an MLP"
    kinds = ALL_KINDS
    Options = PrefixTuningOptions
    # Selection guide rows (peftlab recommend): task type -> (points, reason).
    guide = {
        "classification": (1.0, "made for generation; below deep prompts on classification"),
        "ner": (1.0, "made for generation; P-Tuning v2 is its sequence-labelling form"),
        "qa": (1.0, "made for generation; P-Tuning v2 is its token-level form"),
        "generation": (2.0, "made for generation: table-to-text and summarisation (Li & Liang 2021)"),
        "seq2seq": (2.5, "made for conditional generation: summarisation on BART (Li & Liang 2021)"),
    }
    few_shot_guide = (2.0, "few-shot favours prefix methods (Li & Liang: best in low-data settings)")
    prefix_projection = True

    def why_not_mergeable(self) -> str:
        return ("its prefix is extra keys and values every attention layer attends to, not a change to any "
                "existing weight, so there is nothing to add it into.")

    def check_supported(self, model, kind):
        super().check_supported(model, kind)
        if kind in SIGNATURE_CHECKED_KINDS and not prefix_cache_reachable(model):
            raise PeftlabError(
                f"Method '{self.name}' cannot run {kind} on {describe_model(model)}: its forward takes no "
                "key/value cache, so there is no way to hand the prefix to its attention layers.")

    peft_type = "PREFIX_TUNING"
    input_prompt = False

    @property
    def saves_encoder_output(self) -> bool:
        return bool(self.prefix_projection)

    def prepare_base(self, model, kind):
        """The transformers-5 signature shim (see compat.py), for classification models that need it."""
        if kind in SIGNATURE_CHECKED_KINDS and needs_prefix_compat(model):
            add_prefix_compat(model)
        return model

    def peft_config(self, model, kind):
        from peft import PrefixTuningConfig

        extra = {}
        if self.prefix_projection:
            extra = {"prefix_projection": True, "encoder_hidden_size": int(self.options.projection_size)}
        return PrefixTuningConfig(**self._common_config(kind), **extra)

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
