"""What each method trains and adds on a model, counted on its meta-device copy (no memory, no weights).

Trainable parameter counts are not formulas: each registered method is applied to the model built on
PyTorch's ``meta`` device and its trainable parameters are counted, exactly as ``peftlab train`` would.
What the modules cannot show, the method declares: ``Method.apply_for_estimate`` (QLoRA: LoRA with QLoRA's
rank and targets, since 4-bit layers cannot be built on ``meta``, plus the 4-bit facts) and
``Method.memory_facts`` (virtual tokens, prefix length, what a saved adapter holds).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.memory.model import declares_separate_output_embeddings, load_config, meta_model
from peftlab.modelinfo import OUTPUT_HEAD_NAMES, count_parameters, is_linear, linear_shape

# Parameters whose training needs the activations below the first layer (embedding norm, dropout)
INPUT_SIDE_NAMES = ("embeddings", "embed_tokens", "wte", "wpe", "shared", "prompt_encoder")


@dataclass
class Footprint:
    """One method applied to the model on the ``meta`` device: counts only, no memory."""

    method: str
    kind: str
    supported: bool
    reason: str | None = None
    trainable: int = 0
    total: int = 0  # parameters after apply (base + what the method adds)
    base_total: int = 0
    quantized: int = 0  # parameters stored in 4-bit (qlora)
    linear_params: int = 0  # weights of the linear layers autocast casts (all, frozen or not)
    trainable_linear_params: int = 0
    head_linear_params: int = 0  # task head / LM head weights (kept outside gradient checkpointing)
    block_linear_trainable: bool = False  # the transformer blocks' own linear weights train (full fine-tuning)
    gated_ffn: bool = False
    embedding_norm: bool = False
    final_norm: bool = False
    fused_attention: bool = True
    lora_inputs: int = 0  # Σ in_features over LoRA-adapted layers (per token, whole model)
    lora_rank_sum: int = 0
    lora_dropout: float = 0.0
    ia3_elements: int = 0  # Σ over (IA)3 layers: out_features (keys/values) per token, bf16
    ia3_ff_elements: int = 0  # Σ over (IA)3 feed-forward layers: in_features per token, fp32
    adapter_elements: int = 0  # Σ over bottlenecks: hidden + 2·bottleneck per token
    quantized_inputs: int = 0  # Σ in_features over 4-bit layers (bitsandbytes saves their input)
    virtual_tokens: int = 0  # prompt tuning / P-Tuning: prepended to the input
    prefix_tokens: int = 0  # prefix tuning / P-Tuning v2: extra keys/values in every layer
    prefix_projection: int = 0
    trains_input_side: bool = True  # the embeddings or an input prompt train: their activations are needed
    first_attention_frozen: bool = False  # adapters: nothing in or below layer 1's attention trains
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    inference_params: int = 0  # what a saved adapter holds (the prefix MLP and prompt encoder are dropped)


_FIELDS = {f.name for f in dataclasses.fields(Footprint)}


@functools.lru_cache(maxsize=64)
def footprints(model: str, kind: str, num_labels: int = 2) -> dict[str, Footprint]:
    """Every registered method applied to ``model`` (meta device) for ``kind``: what it trains and adds."""
    from peftlab.methods import get_method, method_names

    config, _ = load_config(model)
    base = meta_model(config, kind, num_labels,
                      separate_output_embeddings=declares_separate_output_embeddings(model))
    _, base_total = count_parameters(base)
    structure = _structure(base)
    result = {}
    for name in method_names():
        method = get_method(name)
        footprint = Footprint(method=name, kind=kind, supported=True, base_total=base_total, **structure)
        model_copy = copy.deepcopy(base)
        base_parameters = {id(p) for p in model_copy.parameters()}
        try:
            applied, facts = method.apply_for_estimate(model_copy, kind)
        except PeftlabError as error:
            footprint.supported, footprint.reason = False, str(error)
            result[name] = footprint
            continue
        footprint.trainable, footprint.total = count_parameters(applied)
        footprint.inference_params = footprint.trainable
        _inspect_applied(applied, method, footprint, base_parameters)
        _set_facts(footprint, {**facts, **method.memory_facts(applied)}, name)
        result[name] = footprint
        del applied, model_copy
    del base
    return result


def _set_facts(footprint: Footprint, facts: dict[str, Any], method: str) -> None:
    unknown = sorted(set(facts) - _FIELDS)
    if unknown:
        raise TypeError(f"Method '{method}' declares memory facts that Footprint has no field for: {unknown}")
    for key, value in facts.items():
        setattr(footprint, key, value)


def _structure(model) -> dict[str, Any]:
    names = [name for name, _ in model.named_modules()]
    attention = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    return dict(
        gated_ffn=any(n.endswith(("gate_proj", "wi_0", "w1", "gate_up_proj")) for n in names),
        embedding_norm=any(n.endswith("embeddings.LayerNorm") or n.endswith("emb_ln") for n in names),
        final_norm=any(n.endswith(("ln_f", ".norm", "final_layer_norm")) for n in names),
        # T5's relative position bias keeps it on eager attention, which materialises the probabilities
        fused_attention=attention in ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
        and getattr(model.config, "model_type", "") not in ("t5", "mt5", "umt5", "longt5"),
    )


def _is_bottleneck(module) -> bool:
    """A bottleneck adapter block: x + up(act(down(x))) (``peftlab.methods.adapter.Bottleneck``)."""
    from peftlab.methods.adapter import Bottleneck

    return isinstance(module, Bottleneck)


def _inspect_applied(model, method, footprint: Footprint, base_parameters: set[int]) -> None:
    """What the applied model's modules show: linear layers, LoRA ranks, (IA)3 vectors, bottlenecks."""
    linear = trainable_linear = head = 0
    block_linear_trainable = False
    lora_inputs = rank_sum = ia3 = ia3_ff = adapter = 0
    for name, module in model.named_modules():
        if is_linear(module) and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
            count = module.weight.numel()
            linear += count
            is_head = any(part in OUTPUT_HEAD_NAMES for part in name.split("."))
            if module.weight.requires_grad:
                trainable_linear += count
                # a base weight that trains, not one the method added (LoRA's A/B, a prompt encoder, a bottleneck)
                if not is_head and id(module.weight) in base_parameters:
                    block_linear_trainable = True
            if is_head:
                head += count
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer") and len(module.lora_A):
            lora_inputs += linear_shape(module.get_base_layer())[0]
            # A: a Linear (r x in) for LoRA and DoRA, a bare (r x in) Parameter for AdaLoRA's SVD form
            rank_sum += sum(int(getattr(a, "out_features", 0) or a.shape[0]) for a in module.lora_A.values())
        if hasattr(module, "ia3_l") and hasattr(module, "is_feedforward") and len(module.ia3_l):
            vector = next(iter(module.ia3_l.values()))
            if module.is_feedforward:
                ia3_ff += vector.numel()
            else:
                ia3 += vector.numel()
        if _is_bottleneck(module):
            adapter += module.down.in_features + 2 * module.down.out_features
    footprint.trains_input_side = any(
        p.requires_grad and any(key in n for key in INPUT_SIDE_NAMES) for n, p in model.named_parameters())
    footprint.linear_params = linear
    footprint.trainable_linear_params = trainable_linear
    footprint.head_linear_params = head
    footprint.block_linear_trainable = block_linear_trainable
    footprint.lora_inputs, footprint.lora_rank_sum = lora_inputs, rank_sum
    footprint.lora_dropout = float(getattr(method.options, "dropout", 0.0) or 0.0) if lora_inputs else 0.0
    footprint.ia3_elements, footprint.ia3_ff_elements = ia3, ia3_ff
    footprint.adapter_elements = adapter
