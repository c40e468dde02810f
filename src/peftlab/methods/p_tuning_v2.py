"""P-Tuning v2: deep prompt tuning, a trainable key/value prefix in every layer (Liu et al. 2022).

Prefix tuning without the reparameterisation MLP: the per-layer prefixes (n x 2·layers·hidden) are
the trained weights themselves. Aimed at natural-language understanding, sequence labelling included:
unlike input prompts it leaves the sequence length unchanged, so token classification works.
Implemented by peft (``PrefixTuningConfig(prefix_projection=False)``), with the transformers-5 shim for
classification models in ``compat.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.methods.base import BaseOptions, option
from peftlab.methods.prefix_tuning import PrefixTuning


@dataclass
class PTuningV2Options(BaseOptions):
    learning_rate: float = option(
        5e-3, "Peak learning rate (the paper's runs use 5e-3 to 1e-2 for prefixes on BERT/RoBERTa).")
    num_virtual_tokens: int = option(
        20, "Prefix length per layer. The paper: simple classification prefers short prefixes (about 20), "
            "hard sequence labelling longer ones (about 100).", min=1)


class PTuningV2(PrefixTuning):
    name = "p-tuning-v2"
    paper = ("Liu et al. 2022, P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across "
             "Scales and Tasks (ACL 2022, arXiv:2110.07602)")
    summary = "trainable key/value prefix in every layer, no reparameterisation (deep prompt tuning)"
    Options = PTuningV2Options
    # Selection guide rows (peftlab recommend): task type -> (points, reason).
    guide = {
        "classification": (2.0, "deep prompts match fine-tuning on classification across model sizes (Liu et al. 2022)"),
        "ner": (2.5, "deep prompts were designed to handle sequence labelling (Liu et al. 2022)"),
        "qa": (2.5, "deep prompts match fine-tuning on SQuAD-style QA (Liu et al. 2022)"),
        "generation": (1.5, "deep prompts; less studied for open-ended generation"),
        "seq2seq": (1.5, "deep prompts; less studied for seq2seq"),
    }
    few_shot_guide = (2.0, "few-shot favours prompt methods: few trainable values")
    prefix_projection = False
