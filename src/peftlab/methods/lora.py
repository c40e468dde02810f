"""LoRA: a trainable low-rank update B·A beside frozen linear layers (Hu et al. 2021), and its variants.

W' = W + (alpha / r) · B·A with A (r x in) and B (out x r); B starts at zero so training starts
from the pretrained function. Implemented by peft. The variants are options, as in peft's ``LoraConfig``:

* ``use_dora`` (DoRA, Liu et al. 2024): W' = m · (W + s·B·A) / ||W + s·B·A||, a trained magnitude m per
  output column beside LoRA's direction update. peft cannot run DoRA adapters in a mixed batch, so the
  server keeps them in a group of their own (``serving_facts``).
* ``use_rslora`` (rsLoRA, Kalajdzievski 2023): scale by alpha / sqrt(r) instead of alpha / r.
* ``init`` (PiSSA, Meng et al. 2024; OLoRA, Büyükakyüz 2024): start B·A from the principal singular
  directions (PiSSA) or a QR factor (OLoRA) of W and train on the residual W - s·B0·A0. These change the
  base weights at ``apply``; :meth:`LoRA.save` therefore converts the trained adapter into a plain LoRA
  of rank 2r (B·A - B0·A0, peft's ``path_initial_model_for_weight_conversion``) that loads on the
  ORIGINAL base, so a saved run is served, merged and reloaded like any LoRA run.
* ``loraplus_lr_ratio`` (LoRA+, Hayou et al. 2024): B trains at ratio x the learning rate of A
  (``optimizer_parameter_groups``, built by peft's ``create_loraplus_optimizer``).
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.methods.base import BaseOptions, PeftMethod, ServingFacts, option
from peftlab.methods.compat import describe_model, targeted_layers, unwrap
from peftlab.modelinfo import head_modules, linear_shape

# peftlab's name for each initialisation -> peft's ``init_lora_weights``.
INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
# Initialisations that move part of W into the adapter (they rewrite the base weights at apply time).
BASE_CHANGING_INITS = ("pissa", "olora")


@dataclass
class LoRAOptions(BaseOptions):
    # The LoRA paper used 4e-4..5e-4 on RoBERTa-base over 30-80 epochs; for the short budgets peftlab
    # defaults to, 2e-3 is what converged: minilm + SST-2, 2,000 examples x 3 epochs, full dev set,
    # measured 0.784 (5e-4), 0.802 (1e-3), 0.814 (2e-3). See docs/methods/defaults.md.
    learning_rate: float = option(2e-3, "Peak learning rate. LoRA tolerates much higher rates than full fine-tuning.")
    r: int = option(8, "Rank of the update B·A.", min=1)
    alpha: int = option(16, "Scaling numerator: the update is multiplied by alpha / r.", min=1)
    dropout: float = option(0.1, "Dropout on the LoRA branch input.", min=0, below=1)
    target_modules: list = option(
        [], "Module names to adapt (for example query,value). Empty: peft's default for the architecture "
            "(attention query/value projections)."
    )
    # Off by default: the LoRA paper's method. Liu et al. 2024 report DoRA above LoRA at the same rank on
    # LLaMA commonsense reasoning; the method 'dora' turns it on (measured in docs/methods/defaults.md).
    use_dora: bool = option(
        False, "DoRA (Liu et al. 2024): split each adapted weight into a trained magnitude per output column and a "
               "direction that LoRA updates. Slower to train; no mixed-adapter batches when served.")
    # Off by default (Hu et al.'s alpha/r). Kalajdzievski 2023: alpha/r shrinks the update as r grows, so
    # ranks above ~16 learn no better; alpha/sqrt(r) keeps it stable across ranks.
    use_rslora: bool = option(
        False, "rsLoRA (Kalajdzievski 2023): scale the update by alpha/sqrt(r) instead of alpha/r, which keeps "
               "higher ranks learning.")
    # "default" is Hu et al.'s (A Kaiming-uniform, B zero), peft's default.
    init: str = option(
        "default", "How A and B start: 'default' (B = 0, Hu et al.), 'gaussian' (A Gaussian with std 1/r), 'pissa' "
                   "(principal singular vectors of W, Meng et al. 2024) or 'olora' (QR of W, Büyükakyüz 2024). "
                   "pissa/olora train on the residual of W; the saved adapter is converted to a plain LoRA of "
                   "rank 2r that loads on the original base.", choices=tuple(INITS))
    # 0 = off (plain LoRA). Hayou et al. 2024 recommend 2^4 = 16 for language models when it is on, with a lower base
    # rate: measured at 16 on minilm + SST-2 (2,000 x 3 epochs): 0.752 (lr 2e-3), 0.814 (1e-3), 0.797 (5e-4).
    loraplus_lr_ratio: float = option(
        0.0, "LoRA+ (Hayou et al. 2024): train B at this many times A's learning rate (the paper: 16); 0 = off.")


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

    def __init__(self, options=None, **overrides):
        super().__init__(options, **overrides)
        self.check_options()
        # The adapter's tensors right after a PiSSA/OLoRA apply(), before any training: save() subtracts them
        # to turn the trained adapter into a plain LoRA for the original base.
        self.initial_adapter_state: dict | None = None

    # ---- options ---------------------------------------------------------------------------------
    def check_options(self) -> None:
        """One sentence naming the option when a value or a combination cannot work (before any training)."""
        options = self.options
        if options.init not in INITS:
            raise PeftlabError(f"Option 'init' of method '{self.name}' must be one of {', '.join(INITS)}; "
                               f"got {options.init!r}.")
        ratio = float(options.loraplus_lr_ratio)
        if ratio != 0 and ratio < 1:
            raise PeftlabError(f"Option 'loraplus_lr_ratio' of method '{self.name}' must be 0 (off) or at least 1 "
                               f"(B learns faster than A; the LoRA+ paper uses 16); got {ratio:g}.")
        if int(options.r) < 1:
            raise PeftlabError(f"Option 'r' of method '{self.name}' must be a positive rank; got {options.r}.")

    def check_supported(self, model, kind):
        super().check_supported(model, kind)
        if self.options.init == "olora":
            # peft 0.21.2's olora_init ignores fan_in_fan_out, so Conv1D layers (stored in x out) fail with a
            # shape error on the first forward pass.
            targets = list(self.options.target_modules) or _default_targets(model)
            conv1d = sorted({name.rsplit(".", 1)[-1] for name, layer in targeted_layers(model, targets)
                             if type(layer).__name__ == "Conv1D"})
            if conv1d:
                raise PeftlabError(
                    f"Option 'init=olora' of method '{self.name}' cannot initialise {describe_model(model)}, because "
                    f"peft's OLoRA does not handle transformers Conv1D layers ({', '.join(conv1d)}); use init=pissa "
                    "or init=default on this architecture.")

    # ---- peft ------------------------------------------------------------------------------------
    def peft_config(self, model, kind):
        from peft import LoraConfig

        return LoraConfig(
            task_type=TaskKind(kind).peft_task_type,
            r=self.options.r,
            lora_alpha=self.options.alpha,
            lora_dropout=self.options.dropout,
            target_modules=list(self.options.target_modules) or None,
            use_dora=bool(self.options.use_dora),
            use_rslora=bool(self.options.use_rslora),
            init_lora_weights=INITS[self.options.init],
        )

    def apply(self, model, kind):
        peft_model = super().apply(model, kind)
        self.initial_adapter_state = None
        if self.options.init in BASE_CHANGING_INITS:
            from peft import get_peft_model_state_dict

            self.initial_adapter_state = {name: tensor.detach().cpu().clone()
                                          for name, tensor in get_peft_model_state_dict(peft_model).items()}
        return peft_model

    def load(self, base_model, directory, kind, *, adapter_name: str = "default"):
        self.initial_adapter_state = None  # a saved adapter is always a plain LoRA on the original base
        return super().load(base_model, directory, kind, adapter_name=adapter_name)

    def save(self, model, directory):
        if self.initial_adapter_state is None:
            return super().save(model, directory)
        save_as_plain_lora(model, Path(directory), self.initial_adapter_state)

    def apply_for_estimate(self, model, kind):
        if self.options.init in BASE_CHANGING_INITS:  # same shapes; PiSSA's SVD has nothing to read on meta tensors
            plain = type(self)(dataclasses.replace(self.options, init="default"))
            return plain.apply_for_estimate(model, kind)
        return super().apply_for_estimate(model, kind)

    # ---- what the trainer asks ---------------------------------------------------------------------
    def optimizer_parameter_groups(self, model, learning_rate, weight_decay):
        """LoRA+'s groups (B at ratio x the learning rate), as peft's ``create_loraplus_optimizer`` builds them."""
        ratio = float(self.options.loraplus_lr_ratio)
        if not ratio:
            return None
        import torch
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(getattr(model, "module", model), torch.optim.AdamW, lr=learning_rate,
                                              loraplus_lr_ratio=ratio, loraplus_weight_decay=weight_decay)
        return [{"params": group["params"], "lr": group["lr"], "weight_decay": group["weight_decay"]}
                for group in optimizer.param_groups if group["params"]]

    # ---- facts -----------------------------------------------------------------------------------
    def trainable_parameters_formula(self, model, kind):
        """r·(in + out) per adapted layer (+ out for DoRA's magnitude), plus the task head (trained in full)."""
        import peft

        peft_model = model if isinstance(model, peft.PeftModel) else None
        if peft_model is None:
            raise ValueError("pass the model returned by apply()")
        from peft.tuners.lora import LoraLayer

        total = 0
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                fan_in, fan_out = linear_shape(module.get_base_layer())
                total += self.options.r * (fan_in + fan_out) + (fan_out if self.options.use_dora else 0)
        return total + _head_parameters(peft_model, kind)

    @classmethod
    def options_from_peft_config(cls, config):
        # the variants that change how the adapter is served or scaled; r for the parameter formula
        stated = {"use_dora": config.get("use_dora"), "use_rslora": config.get("use_rslora"), "r": config.get("r")}
        return {key: value for key, value in stated.items() if isinstance(value, (bool, int)) and value is not None}

    def serving_facts(self):
        if self.options.use_dora:
            # peft refuses adapter_names ("Cannot pass `adapter_names` when DoRA is enabled"): one adapter per pass
            return ServingFacts(mode="peft", group=f"{self.peft_type}+DORA", mixed_batch=False,
                                note="DoRA adapter: served one adapter per forward pass (peft cannot mix DoRA "
                                     "adapters in a batch).")
        # peft runs a batch that mixes LoRA adapters (adapter_names) in one forward pass
        return ServingFacts(mode="peft", group=self.peft_type, mixed_batch=True)

    def inference_cost(self):
        if self.options.use_dora:
            return ("none once merged (unmerged: one extra low-rank matmul plus the norm of W + B·A per adapted "
                    "layer, in every forward pass)")
        return "none once merged (unmerged: one extra low-rank matmul per adapted layer)"


def _default_targets(model) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(getattr(unwrap(model), "config", None), "model_type", "")
    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, []))


def save_as_plain_lora(peft_model, directory: Path, initial_state: dict) -> None:
    """Save a PiSSA/OLoRA-initialised adapter as a plain LoRA of rank 2r for the original base weights.

    peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes B·A - B0·A0 as
    [B | -B0]·[A ; A0] (``LoraModel.subtract_mutated_init``), reading the initial adapter from a folder:
    ``initial_state`` is written to a scratch folder for it. That conversion keeps only the lora_A/lora_B
    tensors (peft 0.21.2), so the other trained tensors (the task head, DoRA's magnitudes) are added back.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    directory.mkdir(parents=True, exist_ok=True)
    trained = get_peft_model_state_dict(peft_model)
    with tempfile.TemporaryDirectory() as scratch:
        initial = Path(scratch) / "initial"
        initial.mkdir()
        save_file({name: tensor.contiguous() for name, tensor in initial_state.items()},
                  str(initial / "adapter_model.safetensors"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes about the conversion itself
            peft_model.save_pretrained(str(directory), safe_serialization=True,
                                       path_initial_model_for_weight_conversion=str(initial))
    weights = directory / "adapter_model.safetensors"
    converted = load_file(str(weights))
    dropped = {name: tensor.detach().cpu().contiguous() for name, tensor in trained.items() if name not in converted}
    if dropped:
        save_file({**converted, **dropped}, str(weights), metadata={"format": "pt"})


def _head_parameters(peft_model, kind) -> int:
    """Parameters of the trained copy of the task head (peft's modules_to_save)."""
    if not TaskKind(kind).has_new_head:
        return 0
    base = peft_model.get_base_model()
    return sum(p.numel() for module in head_modules(base).values() for p in module.parameters()
               if p.requires_grad)
