"""BitFit: train only the bias terms (Ben Zaken et al. 2022), implemented in peftlab.

Every parameter named ``bias`` trains (attention/FFN linear biases, layer-norm biases, the pooler's
bias) plus, for classification, the newly initialised task head; all weights stay frozen. Nothing is
injected, so the trained model *is* the base model with new biases: merging is trivially exact.

Llama-family (and T5) models have no bias terms, so BitFit refuses them up front.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.adapter import TensorFileMethod, model_label, train_head
from peftlab.kinds import TaskKind
from peftlab.methods.base import BaseOptions, ServingFacts, option
from peftlab.modelinfo import head_modules, model_family

LLAMA_FAMILY = ("llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "gemma3_text", "smollm3", "olmo",
                "olmo2", "phi3", "granite", "cohere", "deepseek_v3", "ministral")
T5_FAMILY = ("t5", "mt5", "umt5", "longt5")


def is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


def _head_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for module in head_modules(model).values() for p in module.parameters()}


def backbone_biases(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The bias parameters outside the task head."""
    head = _head_parameter_ids(model)
    return [(name, p) for name, p in model.named_parameters() if is_bias(name) and id(p) not in head]


@dataclass
class BitFitOptions(BaseOptions):
    learning_rate: float = option(
        5e-3, "Peak learning rate. Bias-only training needs large rates for short runs: measured on minilm + "
              "SST-2 (2,000 examples x 3 epochs) 1e-3 0.749, 3e-3 0.773, 5e-3 0.783, 6e-3 collapses on one seed of "
              "three; Ben Zaken et al. searched 1e-4..1e-3 over far longer runs.")


class BitFit(TensorFileMethod):
    name = "bitfit"
    category = "selective"
    mergeable = True
    paper = ("Ben Zaken, Ravfogel & Goldberg 2022, BitFit: Simple Parameter-efficient Fine-tuning for "
             "Transformer-based Masked Language-models (ACL 2022, arXiv:2106.10199)")
    summary = "only the bias terms (and the task head) train"
    Options = BitFitOptions
    # Selection guide rows (peftlab recommend): task type -> (points, reason).
    guide = {
        "classification": (2.0, "bias-only training is competitive on small and medium classification sets (Ben Zaken et al. 2022)"),
        "ner": (1.5, "bias-only training trails on token-level tasks"),
        "qa": (1.5, "bias-only training trails on span extraction"),
        "generation": (0.5, "biases alone move generation little"),
        "seq2seq": (0.5, "biases alone move generation little"),
    }
    # 10% warm-up (BERT's): at lr 5e-3 it lifted the 3-seed mean on minilm + SST-2 from 0.773 to 0.784 (seeds
    # 42/1/2: 0.783/0.774/0.761 -> 0.795/0.774/0.783); high bias-only rates destabilise the first steps.
    warmup_ratio = 0.1

    def check_supported(self, model, kind):
        super().check_supported(model, kind)
        if backbone_biases(model):
            return
        family = model_family(model)
        label = model_label(model)
        if family in LLAMA_FAMILY:
            raise PeftlabError(
                f"Llama-family models have no bias terms in their linear layers, so BitFit has nothing to train on {label}."
            )
        if family in T5_FAMILY:
            raise PeftlabError(
                f"T5 models have no bias terms in their linear layers or layer norms, so BitFit has nothing to train on {label}."
            )
        raise PeftlabError(f"{label} ({family}) has no bias terms outside its task head, so BitFit has nothing to train.")

    def apply(self, model, kind):
        self.check_supported(model, kind)
        model.requires_grad_(False)
        for name, parameter in model.named_parameters():
            if is_bias(name):
                parameter.requires_grad_(True)
        train_head(model, kind)
        model._peftlab_kind = kind
        return model

    def merge(self, model):
        """The model is already a plain transformers model whose biases are the trained ones."""
        if "_peftlab_kind" in model.__dict__:
            del model.__dict__["_peftlab_kind"]
        return model

    def trainable_parameters_formula(self, model, kind):
        """All bias entries of the model (task head included) + the task head's weight entries."""
        seen: set[int] = set()
        biases = 0
        for name, parameter in model.named_parameters():
            if is_bias(name) and id(parameter) not in seen:
                seen.add(id(parameter))
                biases += parameter.numel()
        head_weights = 0
        if TaskKind(kind).has_new_head:
            head_weights = sum(p.numel() for module in head_modules(model).values()
                               for name, p in module.named_parameters() if not is_bias(name))
        return biases + head_weights

    def serving_facts(self):
        return ServingFacts(mode="module-tree", private="biases+head",
                            note="bitfit: its own copy of the bias vectors; all other weights shared with the base.")

    def guide_adjustments(self, situation):
        if situation.domain_specific:
            return [(2.0, "domain-specific data favours BitFit: bias-only updates adapt to a domain from little data")]
        return []

    def inference_cost(self):
        return "none (the trained biases replace the base ones)"
