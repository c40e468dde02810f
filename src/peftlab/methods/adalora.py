"""AdaLoRA: LoRA whose rank budget moves to the layers that matter (Zhang et al. 2023).

Each adapted layer learns an SVD-shaped update P·diag(E)·Q (peft: lora_B, lora_E, lora_A) that starts
at rank ``init_r``. After ``tinit`` warm-up steps the singular values of low importance (a smoothed
|weight x gradient| score) are pruned on a cubic schedule until the average rank is ``target_r`` at step
T - ``tfinal``; the last ``tfinal`` steps train at that final allocation. An orthogonality penalty keeps
P and Q near-orthogonal. The schedule needs the run's total step count T, which the trainer sets as
``method.total_steps`` before ``apply``; the pruning runs in ``training_callbacks`` after every optimizer
step (peft's ``update_and_allocate``), while the gradients are still there.

Mergeable like LoRA. The saved adapter keeps only the ranks each layer was given (peft's
``rank_pattern``), so it is smaller than at the start of training.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.errors import PeftlabError
from peftlab.methods.base import BaseOptions, option
from peftlab.methods.tuner import LayerTuner

# Step count used where no training follows (the memory estimate): shapes do not depend on it.
ESTIMATE_STEPS = 1000


@dataclass
class AdaLoRAOptions(BaseOptions):
    # Measured (minilm + SST-2, 2,000 examples x 3 epochs, seed 42, full dev set, `peftlab compare --lr X`):
    # 0.598 (2e-3, LoRA's rate, below the majority-class bar of 0.659), 0.805 (5e-3), 0.812 (1e-2), 0.801 (2e-2).
    # E starts at zero and P, Q at std 0.02, so the update grows slowly: the paper's 8e-4 ran 24 epochs of SST-2.
    learning_rate: float = option(1e-2, "Peak learning rate (measured: see docs/methods/defaults.md).")
    init_r: int = option(12, "Rank every adapted layer starts with (peft's default: 1.5x target_r, as in the paper).", min=1)
    target_r: int = option(8, "Average rank left after pruning (peft's default; LoRA's r for a like-for-like budget).", min=1)
    alpha: int = option(16, "Scaling numerator: the update is multiplied by alpha / rank (the paper's GLUE scripts: 16).", min=1)
    dropout: float = option(0.1, "Dropout on the adapter input (peftlab's LoRA default).", min=0, below=1)
    # The paper's SST-2 script (DeBERTaV3-base, 24 epochs of 2,105 steps = 50,520): init_warmup 6,000 and
    # final_warmup 22,000 steps, i.e. 12% and 44% of the run.
    tinit_fraction: float = option(0.12, "Share of the steps trained at init_r before pruning starts (the paper's SST-2 "
                                         "run: 6,000 of 50,520).")
    tfinal_fraction: float = option(0.44, "Share of the steps at the end trained at the final ranks (the paper's SST-2 "
                                          "run: 22,000 of 50,520).")
    delta_t: int = option(1, "Prune every this many steps during the budget phase (peft's default; the paper: 100 of "
                             "50,520 steps, far more than a short run has).")
    beta1: float = option(0.85, "Smoothing of the importance score (the paper: 0.85).")
    beta2: float = option(0.85, "Smoothing of the importance uncertainty (the paper: 0.85).")
    orth_reg_weight: float = option(0.1, "Weight of the orthogonality penalty on P and Q (the paper's GLUE scripts: "
                                         "0.1; peft's default 0.5).")
    target_modules: list = option(
        [], "Module names to adapt. Empty: peft's AdaLoRA default for the architecture (attention query/value).")


class AdaLoRA(LayerTuner):
    name = "adalora"
    category = "reparameterization"
    paper = ("Zhang et al. 2023, AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning "
             "(ICLR 2023, arXiv:2303.10512)")
    summary = "SVD-shaped LoRA whose ranks are pruned to the layers that matter during training"
    Options = AdaLoRAOptions
    peft_type = "ADALORA"
    target_mapping = "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING"
    guide = {
        "classification": (2.0, "matches or beats LoRA on GLUE at the same parameter budget, most at small budgets "
                                "(Zhang et al. 2023)"),
        "ner": (1.5, "no token-classification results in the paper; LoRA with an adaptive rank budget"),
        "qa": (2.0, "beats LoRA on SQuAD v1.1/v2.0 at small budgets (Zhang et al. 2023)"),
        "generation": (1.5, "evaluated on summarisation, not instruction tuning; per-step importance scoring adds "
                            "training cost"),
        "seq2seq": (2.0, "beats LoRA on XSum and CNN/DailyMail summarisation with BART (Zhang et al. 2023)"),
    }

    def __init__(self, options=None, **overrides):
        super().__init__(options, **overrides)
        options = self.options
        if not (0 <= options.tinit_fraction < 1 and 0 <= options.tfinal_fraction < 1
                and options.tinit_fraction + options.tfinal_fraction < 1):
            raise PeftlabError(
                f"Options 'tinit_fraction' and 'tfinal_fraction' of method '{self.name}' must each be in [0, 1) and "
                f"sum to less than 1, leaving steps for the budget phase; got {options.tinit_fraction:g} and "
                f"{options.tfinal_fraction:g}.")
        if not 1 <= int(options.target_r) <= int(options.init_r):
            raise PeftlabError(f"Option 'target_r' of method '{self.name}' must be between 1 and init_r "
                               f"({options.init_r}); got {options.target_r}.")

    def peft_config(self, model, kind):
        from peft import AdaLoraConfig

        total = self.total_steps
        if total is None:
            raise PeftlabError(
                f"AdaLoRA needs the total step count of the run to schedule its rank budget: method '{self.name}' "
                "was applied without one (set method.total_steps before apply(); peftlab train does).")
        total = max(1, int(total))
        return AdaLoraConfig(
            task_type=self.task_type(kind),
            init_r=int(self.options.init_r),
            target_r=int(self.options.target_r),
            lora_alpha=self.options.alpha,
            lora_dropout=self.options.dropout,
            total_step=total,
            tinit=int(self.options.tinit_fraction * total),
            tfinal=int(self.options.tfinal_fraction * total),
            deltaT=max(1, int(self.options.delta_t)),
            beta1=self.options.beta1,
            beta2=self.options.beta2,
            orth_reg_weight=self.options.orth_reg_weight,
            target_modules=self.targets(model),
        )

    def finish_loaded(self, peft_model, kind):
        # peft 0.21.2's AdaLoraModel.forward adds the orthogonality penalty to any loss it sees and looks up
        # `trainable_adapter_name` for it, which only a trainable adapter sets: a reloaded adapter evaluated with
        # labels fails with AttributeError. Name the loaded adapter, so its loss is the one training reported.
        tuner = peft_model.base_model
        if "trainable_adapter_name" not in vars(tuner):
            tuner.trainable_adapter_name = peft_model.active_adapter
        return peft_model

    def apply_for_estimate(self, model, kind):
        steps, self.total_steps = self.total_steps, self.total_steps or ESTIMATE_STEPS  # shapes do not depend on it
        try:
            applied, facts = super().apply_for_estimate(model, kind)
        finally:
            self.total_steps = steps
        for name, parameter in applied.named_parameters():
            if name.rsplit(".", 2)[-2] == "ranknum":  # moved to meta as a fresh Parameter, which requires grad
                parameter.requires_grad_(False)
        return applied, facts

    def training_callbacks(self, model):
        return [rank_budget_callback(model)]

    def layer_parameters(self, fan_in, fan_out):
        """init_r·(in + out) for P and Q, plus init_r singular values (E)."""
        return int(self.options.init_r) * (fan_in + fan_out + 1)

    def inference_cost(self):
        return "none once merged (unmerged: one extra low-rank matmul per adapted layer)"


def rank_budget_callback(model):
    """A ``TrainerCallback`` that runs AdaLoRA's importance scoring and pruning after each optimizer step.

    ``on_optimizer_step`` comes after ``optimizer.step()`` and before ``zero_grad()``, where peft's
    ``update_and_allocate`` needs it (it reads the gradients); ``state.global_step`` is then the index of the
    step just taken, counted from 0, as in peft's example loop.
    """
    from transformers import TrainerCallback

    peft_model = getattr(model, "module", model)  # DDP wraps the model the trainer steps

    class AdaLoRARankBudget(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            peft_model.base_model.update_and_allocate(state.global_step)

    return AdaLoRARankBudget()
