"""LoKr: a Kronecker-product update (KronA, Edalati et al. 2022; LyCORIS).

ΔW = (alpha / r) · W1 ⊗ W2, with out = a·c and in = b·d factored near their square roots (peft's
``factorization``): W1 is a x b, W2 is c x d, and W2 is itself a rank-r product when r is small next to its
sides. A Kronecker product is full-rank with very few parameters (on MiniLM's 384 x 384 projections: 640
per layer at r = 8, against LoRA's 6,144). peft follows the LyCORIS implementation (Yeh et al. 2024).

Mergeable. Unmerged, every forward pass rebuilds the full out x in update of each adapted layer. peft's LoKr
wraps torch Linear and convolution layers, not transformers' Conv1D: it refuses GPT-2.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.methods.base import BaseOptions, option
from peftlab.methods.tuner import LayerTuner


@dataclass
class LoKrOptions(BaseOptions):
    # Measured 0.771 at 2e-3 on minilm + SST-2 (2,000 examples x 3 epochs, seed 42; docs/methods/defaults.md): above
    # the majority-class bar (0.659), so not swept.
    learning_rate: float = option(2e-3, "Peak learning rate (peftlab's measured LoRA rate as the first default).")
    r: int = option(8, "Rank of the second Kronecker factor when it is decomposed (peft's default).", min=1)
    alpha: int = option(8, "Scaling numerator: the update is multiplied by alpha / r (peft's default).", min=1)
    decompose_both: bool = option(False, "Also decompose the first Kronecker factor into a rank-r product (peft's default: no).")
    decompose_factor: int = option(-1, "Split in/out features near this factor; -1: near the square root (peft's default).")
    rank_dropout: float = option(0.0, "Dropout on the rank dimension during training (peft's default).", min=0, below=1)
    module_dropout: float = option(0.0, "Probability of skipping the whole adapter for a layer in a step (peft's default).", min=0, below=1)
    target_modules: list = option(
        [], "Module names to adapt. Empty: peft's LoKr default for the architecture (attention query/value).")


class LoKr(LayerTuner):
    name = "lokr"
    category = "reparameterization"
    paper = ("Edalati et al. 2022, KronA: Parameter Efficient Tuning with Kronecker Adapter (arXiv:2212.10650); "
             "LyCORIS, Yeh et al. 2024 (ICLR 2024, arXiv:2309.14859)")
    summary = "update = Kronecker product of two small factors (full rank, few parameters)"
    Options = LoKrOptions
    peft_type = "LOKR"
    target_mapping = "TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING"
    wraps_conv1d = False
    guide = {
        "classification": (1.0, "KronA reports GLUE results near LoRA's with T5 (Edalati et al. 2022); "
                                "judge it by the table measured here"),
        "ner": (1.0, "no token-level results in its papers"),
        "qa": (1.0, "no span-extraction results in its papers"),
        "generation": (1.0, "no language-generation results in its papers (LyCORIS targets diffusion models)"),
        "seq2seq": (1.5, "KronA was evaluated on the T5 encoder-decoder (Edalati et al. 2022)"),
    }

    def peft_config(self, model, kind):
        from peft import LoKrConfig

        return LoKrConfig(
            task_type=self.task_type(kind),
            r=int(self.options.r),
            alpha=self.options.alpha,
            decompose_both=bool(self.options.decompose_both),
            decompose_factor=int(self.options.decompose_factor),
            rank_dropout=float(self.options.rank_dropout),
            module_dropout=float(self.options.module_dropout),
            target_modules=self.targets(model),
        )

    def layer_parameters(self, fan_in, fan_out):
        """W1 (a x b, or a rank-r product with decompose_both) + W2 (c x d, or a rank-r product), shaped as peft's
        ``LoKrLayer.update_layer`` decides for a Linear layer."""
        from peft.tuners.lokr.layer import factorization

        r, factor = int(self.options.r), int(self.options.decompose_factor)
        in_m, in_n = factorization(fan_in, factor)
        out_l, out_k = factorization(fan_out, factor)
        if self.options.decompose_both and r < max(out_l, in_m) / 2:
            first = r * (out_l + in_m)
        else:
            first = out_l * in_m
        second = out_k * in_n if r >= max(out_k, in_n) / 2 else r * (out_k + in_n)
        return first + second

    def inference_cost(self):
        return "none once merged (unmerged: rebuilds each adapted layer's full out x in update in every forward pass)"
