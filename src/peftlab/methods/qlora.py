"""QLoRA: LoRA on a base model quantised to 4-bit NormalFloat (Dettmers et al. 2023).

The frozen base is loaded in 4-bit NF4 with double quantisation (``model_load_kwargs``); LoRA
adapters in the compute dtype are trained on top of every linear layer, as in the paper. The task
head of a classification model is kept out of quantisation (``llm_int8_skip_modules``) and trained in
full. On CUDA the paper pages optimizer states to CPU memory: the trainer reads :attr:`QLoRA.optimizer`
(``paged_adamw_8bit`` on CUDA, ``adamw_torch`` on CPU, where bitsandbytes has no paged optimizers).

Merging: folding B·A back into the 4-bit weights would re-quantise W + B·A and lose most of the
update, so :meth:`QLoRA.merge` never does that. It builds a float32 copy of the base and merges there:

* ``merge_base="dequantized"`` (default): the copy is the 4-bit weights dequantised, i.e. exactly the
  weights the adapter was trained against, so the merged model reproduces the trained model
  (measured: max |difference| around 1e-6 on logits). No base model files are needed.
* ``merge_base="original"``: the copy is the original full-precision checkpoint reloaded from
  ``base_model_name_or_path`` (the folder or Hub id the base was loaded from, which peft also records
  in adapter_config.json). Higher-precision base weights, but outputs differ from the trained model
  by the quantisation error of the base, because the adapter was trained against the 4-bit weights.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.methods.base import SMALL, BaseOptions, PeftMethod, ServingFacts, option
from peftlab.modelinfo import OUTPUT_HEAD_NAMES, head_modules, linear_shape
from peftlab.methods.compat import (add_qa_token_type_compat, describe_model, head_parameter_count, is_linear,
                                    iter_layers, unwrap)

# Modules kept in full precision: task heads (newly initialised, trained in full; quantising them fails
# with "only Tensors of floating point dtype can require gradients") and the LM output layer.
SKIP_QUANTIZATION = list(OUTPUT_HEAD_NAMES)


@dataclass
class QLoRAOptions(BaseOptions):
    learning_rate: float = option(2e-4, "Peak learning rate (QLoRA paper: 2e-4 for 7B/13B models, 1e-4 above).")
    r: int = option(64, "LoRA rank (QLoRA paper: 64 on all linear layers).", min=1)
    alpha: int = option(16, "LoRA scaling numerator: the update is multiplied by alpha / r (QLoRA paper: 16).", min=1)
    dropout: float = option(0.1, "Dropout on the LoRA branch input (QLoRA paper: 0.1 up to 13B, 0.05 above).", min=0, below=1)
    target_modules: list = option(
        [], "Module names to adapt. Empty: every linear layer except the task head and the LM output layer "
            "(the QLoRA paper finds adapting all linear layers necessary to match full fine-tuning).")
    quant_type: str = option("nf4", "4-bit data type: 'nf4' (NormalFloat, the paper's) or 'fp4'.", choices=("nf4", "fp4"))
    double_quant: bool = option(True, "Quantise the quantisation constants too (the paper's double quantisation).")
    gradient_checkpointing: bool = option(
        True, "Recompute activations in the backward pass to save memory (the paper trains with it).")
    optimizer: str = option(
        "paged_adamw_8bit", "Optimizer (a transformers TrainingArguments.optim name) used on CUDA; the paper's "
                            "paged optimizer. On CPU the trainer uses adamw_torch.")
    merge_base: str = option(
        "dequantized", "What merge() folds the adapter into: 'dequantized' (the 4-bit weights dequantised to "
                       "float32: reproduces the trained model) or 'original' (the full-precision checkpoint "
                       "reloaded from base_model_name_or_path).", choices=("dequantized", "original"))


class QLoRA(PeftMethod):
    name = "qlora"
    category = "reparameterization"
    mergeable = True
    paper = "Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs (NeurIPS 2023, arXiv:2305.14314)"
    summary = "LoRA on a frozen 4-bit NF4-quantised base"
    Options = QLoRAOptions
    peft_type = "LORA"  # what it saves is a LoRA adapter; the 4-bit base is how it trains
    quantized_base = True
    # Selection guide rows (peftlab recommend): task type -> (points, reason).
    guide = {
        "classification": (1.0, "LoRA on a 4-bit base: for bases too big to train in 16/32 bits"),
        "ner": (1.0, "LoRA on a 4-bit base: for bases too big to train in 16/32 bits"),
        "qa": (1.0, "LoRA on a 4-bit base: for bases too big to train in 16/32 bits"),
        "generation": (2.5, "LoRA quality on a 4-bit base at a fraction of the memory (Dettmers et al. 2023)"),
        "seq2seq": (2.5, "LoRA quality on a 4-bit base at a fraction of the memory (Dettmers et al. 2023)"),
    }

    def __init__(self, options=None, **overrides):
        super().__init__(options, **overrides)
        self.base_model_name_or_path: str = ""

    # ---- loading -----------------------------------------------------------------------------
    @staticmethod
    def compute_dtype() -> torch.dtype:
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32

    def model_load_kwargs(self):
        from transformers import BitsAndBytesConfig

        quant_type = str(self.options.quant_type).lower()
        if quant_type not in ("nf4", "fp4"):
            raise PeftlabError(f"Option 'quant_type' of method '{self.name}' must be nf4 or fp4; got {quant_type!r}.")
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=bool(self.options.double_quant),
            bnb_4bit_compute_dtype=self.compute_dtype(),
            llm_int8_skip_modules=list(SKIP_QUANTIZATION),
        )
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
        return {"quantization_config": config, "device_map": device_map}

    @property
    def optimizer(self) -> str:
        """The TrainingArguments ``optim`` to train with: the paged 8-bit AdamW on CUDA, plain AdamW on CPU."""
        return str(self.options.optimizer) if torch.cuda.is_available() else "adamw_torch"

    # ---- lifecycle ---------------------------------------------------------------------------
    def check_supported(self, model, kind):
        if kind not in self.kinds:
            raise PeftlabError(f"Method '{self.name}' cannot run {kind} on {describe_model(model)}: "
                               f"it supports only {', '.join(self.kinds)} tasks.")
        base = unwrap(model)
        if not (getattr(base, "is_loaded_in_4bit", False) or any(
                type(m).__name__ == "Linear4bit" for m in base.modules())):
            raise PeftlabError(
                f"Method '{self.name}' needs {describe_model(model)} loaded in 4-bit: load the base with the "
                "method's model_load_kwargs() (peftlab.models.load_model(name, kind, **method.model_load_kwargs())).")

    def _targets(self, model) -> list[str]:
        if self.options.target_modules:
            return list(self.options.target_modules)
        base = unwrap(model)
        excluded = set(head_modules(base))
        output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        names = []
        for name, module in iter_layers(base):
            if name.split(".")[0] in excluded or (output is not None and module is output):
                continue
            if is_linear(module):
                names.append(name)
        if not names:
            raise PeftlabError(f"Method '{self.name}' found no linear layers to adapt in {describe_model(model)}.")
        return names

    def peft_config(self, model, kind):
        from peft import LoraConfig

        return LoraConfig(
            task_type=TaskKind(kind).peft_task_type,
            r=int(self.options.r),
            lora_alpha=int(self.options.alpha),
            lora_dropout=float(self.options.dropout),
            target_modules=self._targets(model),
        )

    def apply(self, model, kind):
        from peft import get_peft_model, prepare_model_for_kbit_training

        self.check_supported(model, kind)
        self.base_model_name_or_path = _name_or_path(model)
        keep_cpu_compute_in_float32(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(self.options.gradient_checkpointing),
            gradient_checkpointing_kwargs={"use_reentrant": False})
        return add_qa_token_type_compat(get_peft_model(model, self.peft_config(model, kind)))

    def load(self, base_model, directory, kind, *, adapter_name: str = "default"):
        from peft import PeftModel, prepare_model_for_kbit_training

        self.check_supported(base_model, kind)
        self.base_model_name_or_path = _name_or_path(base_model)
        keep_cpu_compute_in_float32(base_model)
        # the same dtype casts as in training (non-quantised half-precision weights -> float32), frozen
        base_model = prepare_model_for_kbit_training(base_model, use_gradient_checkpointing=False)
        return add_qa_token_type_compat(PeftModel.from_pretrained(base_model, str(directory), adapter_name=adapter_name,
                                                                   is_trainable=False))

    def merge(self, model):
        """A float32 transformers model with B·A folded in (see the module docstring). Consumes ``model``."""
        import peft
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        if not isinstance(model, peft.PeftModel):
            raise PeftlabError(f"Method '{self.name}' merges the model returned by apply() or load().")
        mode = str(self.options.merge_base).lower()
        if mode not in ("dequantized", "original"):
            raise PeftlabError(f"Option 'merge_base' of method '{self.name}' must be dequantized or original; got {mode!r}.")
        adapter = model.active_adapter
        config = copy.deepcopy(model.peft_config[adapter])
        config.inference_mode = True
        path = getattr(config, "base_model_name_or_path", None) or self.base_model_name_or_path or _name_or_path(model)
        state = get_peft_model_state_dict(model, adapter_name=adapter)
        quantized = model.unload()  # the 4-bit base, LoRA layers removed (the adapter is in `state`)
        if mode == "dequantized":
            plain = dequantized_copy(quantized)
        else:
            plain = original_copy(quantized, path)
            warnings.warn(
                "qlora merge_base='original': the adapter was trained against the 4-bit weights; merged into the "
                "original float32 weights its outputs differ from the trained model by the base's quantisation "
                "error. Evaluate the merged model before deploying it.", stacklevel=2)
        del quantized
        wrapped = peft.get_peft_model(plain, config)
        result = set_peft_model_state_dict(wrapped, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"qlora merge: adapter weights did not fit the float32 copy "
                               f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")
        merged = wrapped.merge_and_unload()
        merged.eval()
        return merged

    def trainable_parameters_formula(self, model, kind):
        """r·(in + out) per adapted linear layer (as LoRA), plus the task head (trained in full)."""
        targets = self._targets(model)
        total = 0
        for name, module in iter_layers(unwrap(model)):
            if is_linear(module) and (name in targets or any(name.endswith("." + t) for t in targets)):
                fan_in, fan_out = linear_shape(module)
                total += int(self.options.r) * (fan_in + fan_out)
        return total + head_parameter_count(model, kind)

    # ---- declared facts -----------------------------------------------------------------------
    def serving_facts(self):
        return ServingFacts(mode="peft", group=self.peft_type, mixed_batch=True,
                            note="qlora adapter served on the full-precision base: outputs differ from the 4-bit "
                                 "trained model by the base's quantisation error.")

    def merge_note(self):
        return ("qlora: merging into the 4-bit base would re-quantise W + B·A and lose most of the update (lossy), so "
                "peftlab merges into a float32 copy of the base "
                f"(merge_base={self.options.merge_base}); the output is a full-precision model (4x the size of the "
                "4-bit base).")

    def guide_adjustments(self, situation):
        if situation.base_params < SMALL:
            return [(-1.0, "on a model this small a 4-bit base saves little and slows training: use LoRA")]
        return []

    def apply_for_estimate(self, model, kind):
        """LoRA with QLoRA's rank and targets on the unquantised meta model, plus what 4-bit storage holds."""
        from peftlab.methods.lora import LoRA
        from peftlab.modelinfo import is_linear as plain_linear

        if kind not in self.kinds:
            raise PeftlabError(f"Method '{self.name}' supports only {', '.join(self.kinds)} tasks.")
        quantized = inputs = 0
        for name, module in model.named_modules():
            if plain_linear(module) and not any(part in SKIP_QUANTIZATION for part in name.split(".")):
                quantized += sum(p.numel() for p in module.parameters(recurse=False) if p.dim() > 1)
                inputs += linear_shape(module)[0]
        lora = LoRA(r=int(self.options.r), alpha=int(self.options.alpha), dropout=float(self.options.dropout),
                    target_modules=self._targets(model))
        facts = {"quantized": quantized, "quantized_inputs": inputs,
                 "gradient_checkpointing": bool(self.options.gradient_checkpointing),
                 "optimizer": "adamw_8bit"}  # the paged 8-bit AdamW on CUDA; adamw on CPU (see memory.estimate)
        return lora.apply(model, kind), facts

    def inference_cost(self):
        return ("none once merged into a float32 copy of the base (unmerged: 4-bit weights dequantised on the fly "
                "plus one low-rank matmul per adapted layer)")


# ---- bitsandbytes on CPU ---------------------------------------------------------------------

def keep_cpu_compute_in_float32(model) -> None:
    """Turn off bitsandbytes' AVX512-BF16 CPU inference path on every 4-bit layer (in place).

    bitsandbytes 0.50 on CPUs with AVX512-BF16, in eval mode without gradients, repacks a Linear4bit's
    weight *in place* into a CPU layout, converting its scales (absmax) to bfloat16 for good, and from
    then on computes that layer in bfloat16 whatever bnb_4bit_compute_dtype says. Consequences: eval
    outputs differ from the float32 training computation by ~1e-2, an evaluation in the middle of
    training permanently coarsens the frozen base, and layers narrower than the 64-wide quantisation
    block crash ("shape '[32, 0]' is invalid"). With the flag off, evaluation dequantises and multiplies
    in the compute dtype, exactly as training does.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _dequantize(weight) -> torch.Tensor:
    from peft.utils.integrations import dequantize_bnb_weight

    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # repacked by bnb's CPU bf16 path (see above)
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return dequantize_bnb_weight(weight, weight.quant_state)


# ---- full-precision copies of a 4-bit base ----------------------------------------------------

def _plain_config(model):
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    return config


def dequantized_copy(quantized) -> torch.nn.Module:
    """A float32 model of the same class whose weights are the 4-bit weights dequantised (on CPU).

    bitsandbytes stores GPT-2's Conv1D weights transposed, as a Linear4bit; the copy is a standard model
    again (Conv1D layers, (in, out) weights), so it saves and reloads like any checkpoint of its class.
    """
    plain = type(quantized)(_plain_config(quantized)).to(torch.float32)
    sources = dict(quantized.named_modules())
    targets = dict(plain.named_modules())
    state = {}
    for key in plain.state_dict():
        module_name, _, attr = key.rpartition(".")
        tensor = getattr(sources[module_name], attr)
        if type(tensor).__name__ == "Params4bit":
            tensor = _dequantize(tensor)
            if type(targets[module_name]).__name__ == "Conv1D":
                tensor = tensor.t()
        tensor = tensor.detach().cpu()
        state[key] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    plain.load_state_dict(state, strict=True)
    plain.eval()
    return plain


def original_copy(quantized, path: str) -> torch.nn.Module:
    """The full-precision checkpoint the 4-bit base was loaded from, with the same head configuration."""
    if not path:
        raise PeftlabError(
            "qlora merge_base='original' needs the base model's name or folder, and this model records none: "
            "use merge_base='dequantized'.")
    plain = type(quantized).from_pretrained(path, config=_plain_config(quantized), dtype=torch.float32)
    plain.eval()
    return plain


def _name_or_path(model) -> str:
    config = getattr(unwrap(model), "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or "")
