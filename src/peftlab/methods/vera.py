"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024).

One pair of frozen random matrices A (r x in) and B (out x r) is shared by every adapted layer; each layer
trains only two vectors that scale them: ΔW = diag(b)·B·diag(d)·A, with b (out) starting at zero and d (r)
at ``d_initial``. So a layer trains r + out numbers, whatever r is: about ten times fewer parameters than
LoRA at similar GLUE scores in the paper. The random matrices come from a fixed seed
(``projection_prng_key``) and are also stored in the adapter file (peft's ``save_projection``), so a saved
adapter reloads exactly on any machine.

Mergeable. Unmerged, every adapted layer runs the two shared projections and two elementwise scalings.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.methods.base import VERY_LARGE, BaseOptions, option
from peftlab.methods.tuner import LayerTuner


@dataclass
class VeRAOptions(BaseOptions):
    # Measured 0.784 at 1e-2 on minilm + SST-2 (2,000 examples x 3 epochs, seed 42; docs/methods/defaults.md): above
    # the majority-class bar (0.659), so not swept.
    learning_rate: float = option(1e-2, "Peak learning rate (the scaling vectors are few and need a high rate).")
    r: int = option(256, "Rank of the shared random matrices (peft's default; the paper uses 1024 on RoBERTa-base). "
                         "Costs r + out trained numbers per layer.", min=1)
    d_initial: float = option(0.1, "Initial value of the vector d that scales the rank dimension (the paper: 0.1).")
    dropout: float = option(0.0, "Dropout on the adapter input (peft's default).", min=0, below=1)
    projection_prng_key: int = option(0, "Seed of the shared random matrices (peft's default).")
    target_modules: list = option(
        [], "Module names to adapt. Empty: peft's VeRA default for the architecture (attention query/value).")


class VeRA(LayerTuner):
    name = "vera"
    category = "reparameterization"
    paper = "Kopiczko, Blankevoort & Asano 2024, VeRA: Vector-based Random Matrix Adaptation (ICLR 2024, arXiv:2310.11454)"
    summary = "shared frozen random low-rank matrices, scaled by two trained vectors per layer"
    Options = VeRAOptions
    peft_type = "VERA"
    target_mapping = "TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING"
    guide = {
        "classification": (1.5, "about 10x fewer trained parameters than LoRA at similar GLUE scores "
                                "(Kopiczko et al. 2024)"),
        "ner": (1.0, "no token-level results in the paper; two scaling vectors per layer"),
        "qa": (1.0, "no span-extraction results in the paper; two scaling vectors per layer"),
        "generation": (1.5, "E2E with GPT-2 and instruction tuning of Llama 2 at a fraction of LoRA's parameters "
                            "(Kopiczko et al. 2024)"),
        "seq2seq": (1.0, "no encoder-decoder results in the paper"),
    }

    def peft_config(self, model, kind):
        from peft import VeraConfig

        return VeraConfig(
            task_type=self.task_type(kind),
            r=int(self.options.r),
            d_initial=float(self.options.d_initial),
            vera_dropout=float(self.options.dropout),
            projection_prng_key=int(self.options.projection_prng_key),
            save_projection=True,  # the adapter file carries A and B: reload never depends on the RNG
            target_modules=self.targets(model),
        )

    def layer_parameters(self, fan_in, fan_out):
        """r (the vector d) + out (the vector b); the shared A and B are frozen buffers."""
        return int(self.options.r) + fan_out

    def guide_adjustments(self, situation):
        if situation.base_params >= VERY_LARGE:
            return [(1.0, "billion-parameter model: VeRA's adapters stay tiny where the paper instruction-tunes "
                          "Llama 2 7B/13B")]
        return []

    def inference_cost(self):
        return "none once merged (unmerged: two shared random projections and two elementwise scalings per adapted layer)"
