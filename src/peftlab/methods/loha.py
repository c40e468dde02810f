"""LoHa: a low-rank Hadamard product update (Hyeon-Woo et al. 2022, FedPara; LyCORIS).

ΔW = (alpha / r) · (B1·A1) ⊙ (B2·A2): the elementwise product of two rank-r products reaches rank up to r²
with the parameters of two rank-r LoRAs, 2·r·(in + out) per layer. Popular for text-to-image diffusion
through the LyCORIS project (Yeh et al. 2024), whose implementation peft follows.

Mergeable. Unmerged, every forward pass rebuilds the full out x in update of each adapted layer. peft's LoHa
wraps torch Linear and convolution layers, not transformers' Conv1D: it refuses GPT-2.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.methods.base import BaseOptions, option
from peftlab.methods.tuner import LayerTuner


@dataclass
class LoHaOptions(BaseOptions):
    # Measured 0.792 at 2e-3 on minilm + SST-2 (2,000 examples x 3 epochs, seed 42; docs/methods/defaults.md): above
    # the majority-class bar (0.659), so not swept.
    learning_rate: float = option(2e-3, "Peak learning rate (peftlab's measured LoRA rate as the first default).")
    r: int = option(8, "Rank of each of the two factors (peft's default).", min=1)
    alpha: int = option(8, "Scaling numerator: the update is multiplied by alpha / r (peft's default).", min=1)
    rank_dropout: float = option(0.0, "Dropout on the rank dimension during training (peft's default).", min=0, below=1)
    module_dropout: float = option(0.0, "Probability of skipping the whole adapter for a layer in a step (peft's default).", min=0, below=1)
    target_modules: list = option(
        [], "Module names to adapt. Empty: peft's LoHa default for the architecture (attention query/value).")


class LoHa(LayerTuner):
    name = "loha"
    category = "reparameterization"
    paper = ("Hyeon-Woo et al. 2022, FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated "
             "Learning (ICLR 2022, arXiv:2108.06098); LyCORIS, Yeh et al. 2024 (ICLR 2024, arXiv:2309.14859)")
    summary = "update = Hadamard product of two low-rank products (rank up to r²)"
    Options = LoHaOptions
    peft_type = "LOHA"
    target_mapping = "TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING"
    wraps_conv1d = False
    guide = {
        "classification": (1.0, "built for diffusion models (LyCORIS, Yeh et al. 2024); no NLP benchmark in its papers: "
                                "judge it by the table measured here"),
        "ner": (1.0, "no NLP benchmark in its papers (LyCORIS targets diffusion models)"),
        "qa": (1.0, "no NLP benchmark in its papers (LyCORIS targets diffusion models)"),
        "generation": (1.0, "no language-generation results in its papers (LyCORIS targets diffusion models)"),
        "seq2seq": (1.0, "no encoder-decoder results in its papers (LyCORIS targets diffusion models)"),
    }

    def peft_config(self, model, kind):
        from peft import LoHaConfig

        return LoHaConfig(
            task_type=self.task_type(kind),
            r=int(self.options.r),
            alpha=self.options.alpha,
            rank_dropout=float(self.options.rank_dropout),
            module_dropout=float(self.options.module_dropout),
            target_modules=self.targets(model),
        )

    def layer_parameters(self, fan_in, fan_out):
        """Two rank-r products: 2·r·(in + out)."""
        return 2 * int(self.options.r) * (fan_in + fan_out)

    def inference_cost(self):
        return "none once merged (unmerged: rebuilds each adapted layer's full out x in update in every forward pass)"
