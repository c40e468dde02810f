"""LoRA: a trainable low-rank update B·A beside frozen linear layers (Hu et al. 2021).

W' = W + (alpha / r) · B·A with A (r x in) and B (out x r); B starts at zero so training starts
from the pretrained function. Implemented by peft.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.kinds import TaskKind
from peftlab.methods.base import BaseOptions, PeftMethod, ServingFacts, option
from peftlab.modelinfo import head_modules, linear_shape


@dataclass
class LoRAOptions(BaseOptions):
    # The LoRA paper used 4e-4..5e-4 on RoBERTa-base over 30-80 epochs; for the short budgets peftlab
    # defaults to, 2e-3 is what converged: minilm + SST-2, 2,000 examples x 3 epochs, full dev set,
    # measured 0.784 (5e-4), 0.802 (1e-3), 0.814 (2e-3). See docs/methods/defaults.md.
    learning_rate: float = option(2e-3, "Peak learning rate. LoRA tolerates much higher rates than full fine-tuning.")
    r: int = option(8, "Rank of the update B·A.")
    alpha: int = option(16, "Scaling numerator: the update is multiplied by alpha / r.")
    dropout: float = option(0.1, "Dropout on the LoRA branch input.")
    target_modules: list = option(
        [], "Module names to adapt (for example query,value). Empty: peft's default for the architecture "
            "(attention query/value projections)."
    )


class LoRA(PeftMethod):
    name = "lora"
    category = "reparameterization"
    mergeable = True
    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)"
    summary = "low-rank update B·A on chosen linear layers"
    Options = LoRAOptions
    peft_type = "LORA"
    # Selection guide rows (peftlab recommend): task type -> (points, reason).
    guide = {
        "classification": (2.5, "matches full fine-tuning on GLUE classification (Hu et al. 2021)"),
        "ner": (2.5, "low-rank updates in every layer; strong on token classification"),
        "qa": (2.5, "low-rank updates in every layer; strong on span extraction"),
        "generation": (3.0, "generation favours LoRA: the standard for instruction and generative tuning (Hu et al. 2021)"),
        "seq2seq": (3.0, "LoRA is the default for encoder-decoder and seq2seq tuning (Hu et al. 2021)"),
    }

    def peft_config(self, model, kind):
        from peft import LoraConfig

        return LoraConfig(
            task_type=TaskKind(kind).peft_task_type,
            r=self.options.r,
            lora_alpha=self.options.alpha,
            lora_dropout=self.options.dropout,
            target_modules=list(self.options.target_modules) or None,
        )

    def trainable_parameters_formula(self, model, kind):
        """r·(in + out) per adapted layer, plus the task head (trained in full)."""
        import peft

        peft_model = model if isinstance(model, peft.PeftModel) else None
        if peft_model is None:
            raise ValueError("pass the model returned by apply()")
        from peft.tuners.lora import LoraLayer

        total = 0
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                fan_in, fan_out = linear_shape(module.get_base_layer())
                total += self.options.r * (fan_in + fan_out)
        return total + _head_parameters(peft_model, kind)

    def serving_facts(self):
        # peft runs a batch that mixes LoRA adapters (adapter_names) in one forward pass
        return ServingFacts(mode="peft", group=self.peft_type, mixed_batch=True)

    def inference_cost(self):
        return "none once merged (unmerged: one extra low-rank matmul per adapted layer)"


def _head_parameters(peft_model, kind) -> int:
    """Parameters of the trained copy of the task head (peft's modules_to_save)."""
    if not TaskKind(kind).has_new_head:
        return 0
    base = peft_model.get_base_model()
    return sum(p.numel() for module in head_modules(base).values() for p in module.parameters()
               if p.requires_grad)
