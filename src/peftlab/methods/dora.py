"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024).

Each adapted weight is split into a magnitude (one trained scalar per output column, initialised to the
column norms of W) and a direction that LoRA updates: W' = m · (W + s·B·A) / ||W + s·B·A||. It is LoRA
with peft's ``use_dora`` on (``peftlab train --method lora --use-dora true`` is the same run); registered
under its own name so that ``peftlab compare`` and ``recommend`` show it beside LoRA.

Mergeable like LoRA (the merged weight is m · (W + s·B·A) / ||W + s·B·A||). Unmerged, every forward pass
computes the norm of W + s·B·A, which makes training slower than LoRA's. peft refuses mixed-adapter batches
with DoRA, so the server keeps DoRA adapters in a group of their own (``LoRA.serving_facts``).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.errors import PeftlabError
from peftlab.methods.base import option
from peftlab.methods.lora import LoRA, LoRAOptions


@dataclass
class DoRAOptions(LoRAOptions):
    # Liu et al. 2024 train DoRA at LoRA's settings (same rank, alpha and learning rate as the LoRA runs they
    # compare with), so the defaults are peftlab's LoRA ones. Measured at 2e-3 on minilm + SST-2 (2,000 examples x 3
    # epochs, seed 42): 0.820 (docs/methods/defaults.md).
    use_dora: bool = option(True, "Always on for this method (method 'lora' is the same without the magnitude).")


class DoRA(LoRA):
    name = "dora"
    paper = "Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation (ICML 2024, arXiv:2402.09353)"
    summary = "LoRA on the direction of each weight plus a trained magnitude per output column"
    Options = DoRAOptions
    guide = {
        "classification": (2.0, "LoRA plus a trained magnitude: 0.820 against LoRA's 0.814 on minilm + SST-2 here "
                                "(one seed), training slower; its paper's gains are on LLaMA (Liu et al. 2024)"),
        "ner": (2.0, "low-rank direction updates in every layer like LoRA, at a higher training cost"),
        "qa": (2.0, "low-rank direction updates in every layer like LoRA, at a higher training cost"),
        "generation": (3.0, "beats LoRA at the same rank on LLaMA commonsense reasoning and instruction tuning "
                            "(Liu et al. 2024)"),
        "seq2seq": (2.5, "LoRA's encoder-decoder strengths with a learned magnitude (Liu et al. 2024)"),
    }

    def check_options(self):
        super().check_options()
        if not self.options.use_dora:
            raise PeftlabError(f"Option 'use_dora' of method '{self.name}' cannot be turned off: use method 'lora' "
                               "for LoRA without DoRA's magnitude.")
