"""OFT: orthogonal fine-tuning (Qiu et al. 2023), as peft 0.21 implements it (OFT v2, Qiu et al. 2025).

Each adapted layer's input is rotated by a trained block-diagonal orthogonal matrix R before the frozen
weight: W' = W·R. An orthogonal R keeps the angles between the layer's neurons (the paper's "hyperspherical
energy"), which the authors argue preserves the pretrained knowledge better than an additive update. Each
block of size b is the Cayley transform of a skew-symmetric matrix, so it trains b·(b-1)/2 numbers; peft
approximates the transform's inverse by a Neumann series (``use_cayley_neumann``, OFT v2), which makes it
cheap. A layer with in features trains (in / b)·b·(b-1)/2.

Mergeable (W·R is a weight). Unmerged, every adapted layer runs one block-diagonal matmul on its input. peft's
OFT wraps torch Linear and convolution layers, not transformers' Conv1D: it refuses GPT-2.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.errors import PeftlabError
from peftlab.methods.base import BaseOptions, option
from peftlab.methods.compat import describe_model, targeted_layers
from peftlab.methods.tuner import LayerTuner
from peftlab.modelinfo import linear_shape


@dataclass
class OFTOptions(BaseOptions):
    # Measured 0.820 at 2e-3 on minilm + SST-2 (2,000 examples x 3 epochs, seed 42; docs/methods/defaults.md): above
    # the majority-class bar (0.659), so not swept.
    learning_rate: float = option(2e-3, "Peak learning rate (peftlab's measured LoRA rate as the first default).")
    block_size: int = option(32, "Size b of each orthogonal block; it must divide every adapted layer's input width "
                                 "(peft's default: 32).", min=1)
    use_cayley_neumann: bool = option(True, "Approximate the Cayley transform by a Neumann series (OFT v2, peft's "
                                            "default): much faster, slightly less exactly orthogonal.")
    module_dropout: float = option(0.0, "Probability of dropping a block's rotation during training (peft's default).", min=0, below=1)
    target_modules: list = option(
        [], "Module names to adapt. Empty: peft's OFT default for the architecture (attention query/value).")


class OFT(LayerTuner):
    name = "oft"
    category = "reparameterization"
    paper = ("Qiu et al. 2023, Controlling Text-to-Image Diffusion by Orthogonal Finetuning (NeurIPS 2023, "
             "arXiv:2306.07280); peft implements OFT v2 (Qiu et al. 2025, Orthogonal Finetuning Made Scalable)")
    summary = "a trained block-diagonal orthogonal rotation of each adapted layer's input"
    Options = OFTOptions
    peft_type = "OFT"
    target_mapping = "TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING"
    wraps_conv1d = False
    guide = {
        "classification": (2.0, "rotations that keep the pretrained neurons' angles: 0.820 against LoRA's 0.814 on "
                                "minilm + SST-2 here (one seed); papers on diffusion and LLMs (Qiu et al. 2023, 2025)"),
        "ner": (1.0, "no token-level results in its papers"),
        "qa": (1.0, "no span-extraction results in its papers"),
        "generation": (1.5, "OFT v2 fine-tunes LLMs at LoRA-like cost (Qiu et al. 2025)"),
        "seq2seq": (1.0, "no encoder-decoder results in its papers"),
    }

    def check_supported(self, model, kind):
        super().check_supported(model, kind)
        size = int(self.options.block_size)
        widths = sorted({linear_shape(layer)[0] for _, layer in targeted_layers(model, self.targets(model))})
        bad = [width for width in widths if size < 1 or width % size]
        if bad:
            raise PeftlabError(
                f"Option 'block_size' of method '{self.name}' is {size}, which does not divide the input width "
                f"{bad[0]} of the adapted layers of {describe_model(model)}: choose a divisor of {bad[0]}.")

    def peft_config(self, model, kind):
        from peft import OFTConfig

        return OFTConfig(
            task_type=self.task_type(kind),
            r=0,
            oft_block_size=int(self.options.block_size),
            use_cayley_neumann=bool(self.options.use_cayley_neumann),
            module_dropout=float(self.options.module_dropout),
            target_modules=self.targets(model),
        )

    def layer_parameters(self, fan_in, fan_out):
        """in / b blocks, each the b·(b-1)/2 entries of a skew-symmetric matrix."""
        size = int(self.options.block_size)
        return fan_in // size * (size * (size - 1) // 2)

    def inference_cost(self):
        return "none once merged (unmerged: one block-diagonal matmul on each adapted layer's input)"
