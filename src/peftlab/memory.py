"""How much memory training a method on a model takes: a first-principles estimate, and a way to measure it.

``estimate(model, method, kind, batch_size=, seq_length=)`` adds up what a training step keeps alive:

* **weights**: every parameter at its storage precision. peftlab loads bases in float32 (4 bytes) and
  trains with bf16 autocast, so there is no separate fp32 master copy. QLoRA stores the frozen linear
  layers in 4-bit NF4: 0.5 byte per parameter, plus one 8-bit absmax per 64-weight block and one fp32
  constant per 256 blocks with double quantisation (1/64 + 4/16384 ≈ 0.016 byte per parameter;
  4/64 without); the rest (embeddings, norms, task head, LM head, LoRA weights) stays float32.
  ``weights="bf16"`` models the other common set-up: bf16 weights plus an fp32 master copy of every
  trainable parameter (counted with the optimizer).
* **gradients**: 4 bytes per *trainable* parameter (2 with bf16 weights).
* **optimizer states**: AdamW keeps two fp32 moments per trainable parameter (8 bytes; the 8-bit paged
  AdamW QLoRA uses on CUDA keeps 2), and its foreach update needs one fp32 temporary per trainable
  parameter while it runs.
* **activations**: what autograd saves for the backward pass. Per transformer layer, with b = batch,
  s = sequence (plus n virtual tokens for prompt tuning / P-Tuning), s_kv = key/value length (s, plus
  n for the prefix methods), h = hidden, h_q/h_kv = query and key/value widths, f = FFN width, a = heads::

      2·s·b·h·e_res                      the two norm inputs (the fp32 residual stream)
    + s·b·(h_q + 2·h_kv)·e_att           Q, K, V saved for attention's backward
    + s·b·h_q·e_att                      the attention output (fused SDPA kernels save it)
    + a·b·s·s_kv·k_s                     attention probabilities, only where they are materialised
    + g·s·b·f·e_lin                      the FFN non-linearity (g = 1 for GELU/ReLU, 3 for SwiGLU)
    + 2·s·b·h·e_mask                     hidden-dropout masks (models with dropout)
    + s·b·(2h + h_q + f)·e_lin           inputs of the block's linear layers, only if their weights train
    + method terms                       LoRA's dropped-out inputs, (IA)3's scaled tensors, adapters

  With 16-bit activations everywhere, 1-byte masks and materialised attention with dropout (k_s = 5),
  f = 4h and no fused attention, this is Korthikanti et al. 2022's s·b·h·(34 + 5·a·s/h) bytes per layer
  ("Reducing Activation Recomputation in Large Transformer Models", eq. 1): 34 = 4 (norms) + 10 (Q, K,
  V and two linear inputs at 2 bytes) + 1 + 1 (masks) + 18 (FFN input and GELU in/out at f = 4h). Here
  the bytes follow what PyTorch actually keeps: e_lin = 2 under bf16 autocast (linear outputs), e_res = 4
  (fp32 weights keep the residual stream and norms in fp32), frozen linear layers do not save their input
  (only trainable weights need it), and fused attention (SDPA flash / memory-efficient) saves no a·s²
  matrix. On CPU, autocast runs attention in fp32 (e_att = 4), dropout masks take their input's dtype,
  and SDPA with attention dropout falls back to the math kernel, which keeps three fp32 s × s_kv tensors
  per head (softmax output, dropout mask, dropout output: k_s = 12). Every layer of every method here
  carries trainable parameters or sits above some (prompt tuning trains the input), so no layer's
  activations can be dropped. With gradient checkpointing (QLoRA's default) only each layer's input
  (s·b·h·e_res) is kept, plus one layer's full activations while it is recomputed.
* **autocast weight copies**: under bf16 autocast every fp32 linear weight is cast to bf16 for its matmul,
  and that copy is saved for the backward pass (frozen weights included, because the gradient still
  flows through to the layers below): 2 bytes per linear-layer parameter.
* **logits and loss** (generation): the LM head's logits b·s·V, their fp32 log-softmax (saved), and
  two fp32 gradients of that size at the start of the backward pass: 12 bytes per logit (+2 for the
  bf16 logits under autocast).

Peak = weights + optimizer states + max(activations + autocast copies + logits, gradients + optimizer
temporary): during the backward pass gradients appear as activations are freed, and the optimizer step
runs after both. On CUDA add the runtime (context, cuBLAS workspace; ``CUDA_RUNTIME_BYTES``), which
``torch.cuda.max_memory_allocated`` does not see. On CPU a process's resident set also holds the
Python/torch runtime, tokenizer and data and the kernel code pages the first step touches (about
0.6 GB here): ``measure()`` records that baseline in the same process before the model is loaded.

Architecture numbers come from the model's ``config.json`` (``transformers.AutoConfig``); a few
well-known Hub models are built in (``BUILTIN_CONFIGS``) so that they work offline. Trainable
parameter counts are not formulas: each method is applied to the model instantiated on PyTorch's
``meta`` device (shapes only, no memory) and its trainable parameters are counted, exactly as
``peftlab train`` would (QLoRA: LoRA with QLoRA's rank and targets, since 4-bit layers cannot be built
on ``meta``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.models import AUTO_CLASSES

MiB = 2**20
GiB = 2**30

# What CUDA itself takes on the device besides the tensors (context, cuBLAS/cuDNN workspaces), and
# which torch.cuda.max_memory_allocated() does not count: ~300-500 MB on recent GPUs.
CUDA_RUNTIME_BYTES = 512 * MiB
# A CPU training process's resident set before the model: Python, torch, transformers, peft, the Trainer,
# tokenizer, data and kernel code pages (measured here: 576 MB for minilm + IMDB, see docs/recommend.md).
CPU_RUNTIME_BYTES = 600 * MiB

DEVICES = ("cuda", "cpu")
PRECISIONS = ("bf16", "fp32")
WEIGHT_DTYPES = ("fp32", "bf16")

# peftlab task kinds whose loss runs over a vocabulary-sized output layer
GENERATIVE_KINDS = ("causal-lm", "seq2seq")

# Well-known models, so that ``recommend``/``estimate`` work offline for them. The numbers are those
# models' config.json values; the parameter counts (checked by the tests against the meta-device model)
# are for the bare language model.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        _params=6_738_415_616),
    "bert-base-uncased": dict(
        model_type="bert", architectures=["BertForMaskedLM"], hidden_size=768, intermediate_size=3072,
        num_hidden_layers=12, num_attention_heads=12, vocab_size=30522, max_position_embeddings=512,
        type_vocab_size=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        _params=109_482_240),
    "t5-small": dict(
        model_type="t5", architectures=["T5ForConditionalGeneration"], d_model=512, d_ff=2048, d_kv=64,
        num_layers=6, num_decoder_layers=6, num_heads=8, vocab_size=32128, feed_forward_proj="relu",
        dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=True,
        _params=60_506_624),
    "gpt2": dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=768, n_layer=12, n_head=12,
        vocab_size=50257, n_positions=1024, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
        bos_token_id=50256, eos_token_id=50256, _params=124_439_808),
}
BUILTIN_ALIASES = {"llama-2-7b": "meta-llama/Llama-2-7b-hf", "meta-llama/llama-2-7b-hf": "meta-llama/Llama-2-7b-hf",
                   "google-bert/bert-base-uncased": "bert-base-uncased", "google-t5/t5-small": "t5-small",
                   "openai-community/gpt2": "gpt2"}

# Parameters whose training needs the activations below the first layer (embedding norm, dropout)
_INPUT_SIDE = ("embeddings", "embed_tokens", "wte", "wpe", "shared", "prompt_encoder")
_HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs", "lm_head")


# ---- the model ------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    """The architecture numbers the estimate needs, read from a transformers config."""

    name: str
    source: str  # "built in" | the folder or Hub id the config came from
    model_type: str
    architecture: str  # "encoder" | "decoder" | "encoder-decoder"
    hidden: int
    layers: int
    decoder_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    hidden_dropout: float
    attention_dropout: float
    config: Any = field(repr=False, default=None)

    @property
    def query_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def total_layers(self) -> int:
        return self.layers + self.decoder_layers


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _architecture(config) -> str:
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    architectures = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in architectures or "LMHeadModel" in architectures:
        return "decoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "decoder"
    return "encoder"


def builtin_name(name: str) -> str | None:
    """The built-in table's key for ``name`` (case-insensitive, a few aliases), or None."""
    if name in BUILTIN_CONFIGS:
        return name
    lowered = name.lower()
    for key in BUILTIN_CONFIGS:
        if key.lower() == lowered:
            return key
    return BUILTIN_ALIASES.get(lowered)


@functools.lru_cache(maxsize=32)
def load_config(name: str):
    """(transformers config, source) for a bundled alias, folder, built-in name or Hub id."""
    import transformers

    key = builtin_name(name)
    if key is not None:
        values = {k: v for k, v in BUILTIN_CONFIGS[key].items() if not k.startswith("_")}
        model_type = values.pop("model_type")
        return transformers.AutoConfig.for_model(model_type, **values), "built in"
    from peftlab.models import BUNDLED, resolve_model

    path = resolve_model(name)
    try:
        return transformers.AutoConfig.from_pretrained(path), path
    except (OSError, ValueError) as error:
        known = ", ".join([*BUNDLED, *BUILTIN_CONFIGS])
        first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise PeftlabError(
            f"Could not read the configuration of model '{name}' ({first_line}). It is not a local folder, and the "
            "Hugging Face Hub did not answer for it (no network, or no such model). Use a local model folder, or "
            f"one of the models that work offline: {known}."
        ) from None


def model_spec(name: str) -> ModelSpec:
    config, source = load_config(name)
    hidden = int(_first(config, "hidden_size", "d_model", "n_embd", "dim"))
    heads = int(_first(config, "num_attention_heads", "num_heads", "n_head", "n_heads"))
    layers = int(_first(config, "num_hidden_layers", "num_layers", "n_layer", "n_layers"))
    architecture = _architecture(config)
    decoder_layers = int(_first(config, "num_decoder_layers", default=layers)) if architecture == "encoder-decoder" else 0
    head_dim = int(_first(config, "head_dim", "d_kv", default=hidden // heads))
    intermediate = int(_first(config, "intermediate_size", "d_ff", "n_inner", "ffn_dim", default=4 * hidden))
    return ModelSpec(
        name=name, source=source, model_type=str(getattr(config, "model_type", "")), architecture=architecture,
        hidden=hidden, layers=layers, decoder_layers=decoder_layers, heads=heads,
        kv_heads=int(_first(config, "num_key_value_heads", default=heads)), head_dim=head_dim,
        intermediate=intermediate, vocab=int(_first(config, "vocab_size", default=0)),
        hidden_dropout=float(_first(config, "hidden_dropout_prob", "resid_pdrop", "dropout_rate", "hidden_dropout",
                                    "dropout", default=0.0)),
        attention_dropout=float(_first(config, "attention_probs_dropout_prob", "attn_pdrop", "attention_dropout",
                                       "dropout_rate", default=0.0)),
        config=config,
    )


# ---- what each method trains, counted on a meta-device model ----------------------------------------

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


def _meta_model(config, kind: str, num_labels: int):
    import transformers
    from accelerate import init_empty_weights

    config = copy.deepcopy(config)
    if kind in ("seq-cls", "token-cls"):
        config.num_labels = num_labels
        if getattr(config, "pad_token_id", None) is None:  # decoder classification needs a pad token
            eos = getattr(config, "eos_token_id", None)
            config.pad_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    auto_class = getattr(transformers, AUTO_CLASSES[kind])
    try:
        with init_empty_weights():
            model = auto_class.from_config(config)
        model.tie_weights()  # transformers 5 skips tying on empty weights; a tied LM head is one tensor
        return model
    except ValueError as error:
        raise PeftlabError(
            f"A {getattr(config, 'model_type', '?')} model has no {kind} form in transformers "
            f"({str(error).splitlines()[0][:160]})."
        ) from None


def _is_linear(module) -> bool:
    from torch import nn

    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _linear_in(module) -> int:
    from peftlab.methods.base import linear_shape

    return linear_shape(module)[0]


@functools.lru_cache(maxsize=64)
def footprints(model: str, kind: str, num_labels: int = 2) -> dict[str, Footprint]:
    """Every registered method applied to ``model`` (meta device) for ``kind``: what it trains and adds."""
    from peftlab.methods import get_method, method_names
    from peftlab.methods.base import count_parameters

    config, _ = load_config(model)
    base = _meta_model(config, kind, num_labels)
    _, base_total = count_parameters(base)
    structure = _structure(base)
    result = {}
    for name in method_names():
        method = get_method(name)
        footprint = Footprint(method=name, kind=kind, supported=True, base_total=base_total, **structure)
        model_copy = copy.deepcopy(base)
        try:
            if name == "qlora":
                applied = _apply_qlora(method, model_copy, kind, footprint)
            else:
                method.check_supported(model_copy, kind)
                applied = method.apply(model_copy, kind)
        except PeftlabError as error:
            footprint.supported, footprint.reason = False, str(error)
            result[name] = footprint
            continue
        footprint.trainable, footprint.total = count_parameters(applied)
        _inspect_applied(applied, method, footprint)
        result[name] = footprint
        del applied, model_copy
    del base
    return result


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


def _apply_qlora(method, model, kind, footprint: Footprint):
    """QLoRA's trainable parameters: LoRA with QLoRA's rank and targets on the unquantised meta model."""
    from peftlab.methods import get_method
    from peftlab.methods.qlora import SKIP_QUANTIZATION

    if kind not in method.kinds:
        raise PeftlabError(f"Method 'qlora' supports only {', '.join(method.kinds)} tasks.")
    quantized = inputs = 0
    for name, module in model.named_modules():
        if _is_linear(module) and not any(part in SKIP_QUANTIZATION for part in name.split(".")):
            quantized += sum(p.numel() for p in module.parameters(recurse=False) if p.dim() > 1)
            inputs += _linear_in(module)
    footprint.quantized, footprint.quantized_inputs = quantized, inputs
    footprint.gradient_checkpointing = bool(method.options.gradient_checkpointing)
    footprint.optimizer = "adamw_8bit"  # the paged 8-bit AdamW on CUDA; adamw on CPU (see estimate)
    lora = get_method("lora", r=int(method.options.r), alpha=int(method.options.alpha),
                      dropout=float(method.options.dropout), target_modules=method._targets(model))
    return lora.apply(model, kind)


def _inspect_applied(model, method, footprint: Footprint) -> None:
    from peftlab.methods.adapter import Bottleneck

    linear = trainable_linear = head = 0
    block_linear_trainable = False
    lora_inputs = rank_sum = ia3 = ia3_ff = adapter = 0
    for name, module in model.named_modules():
        if _is_linear(module) and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
            count = module.weight.numel()
            linear += count
            is_head = any(part in _HEAD_NAMES for part in name.split("."))
            if module.weight.requires_grad:
                trainable_linear += count
                added = "lora_" in name or "prompt_encoder" in name or isinstance(_parent_of(model, name), Bottleneck)
                if not is_head and not added:
                    block_linear_trainable = True
            if is_head:
                head += count
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer") and len(module.lora_A):
            lora_inputs += _linear_in(module.get_base_layer())
            rank_sum += sum(int(m.out_features) for m in module.lora_A.values())
        if hasattr(module, "ia3_l") and hasattr(module, "is_feedforward") and len(module.ia3_l):
            vector = next(iter(module.ia3_l.values()))
            if module.is_feedforward:
                ia3_ff += vector.numel()
            else:
                ia3 += vector.numel()
        if isinstance(module, Bottleneck):
            adapter += module.down.in_features + 2 * module.down.out_features
    footprint.trains_input_side = any(
        p.requires_grad and any(key in n for key in _INPUT_SIDE) for n, p in model.named_parameters())
    footprint.first_attention_frozen = method.name == "adapter"
    options = method.options
    footprint.linear_params = linear
    footprint.trainable_linear_params = trainable_linear
    footprint.head_linear_params = head
    footprint.block_linear_trainable = block_linear_trainable
    footprint.lora_inputs, footprint.lora_rank_sum = lora_inputs, rank_sum
    footprint.lora_dropout = float(getattr(options, "dropout", 0.0) or 0.0) if lora_inputs else 0.0
    footprint.ia3_elements, footprint.ia3_ff_elements = ia3, ia3_ff
    footprint.adapter_elements = adapter
    n = int(getattr(options, "num_virtual_tokens", 0) or 0)
    if method.name in ("prompt-tuning", "p-tuning"):
        footprint.virtual_tokens = n
    elif method.name in ("prefix-tuning", "p-tuning-v2"):
        footprint.prefix_tokens = n
        footprint.prefix_projection = int(getattr(options, "projection_size", 0) or 0) if getattr(
            method, "prefix_projection", False) else 0
    footprint.inference_params = _inference_params(model, method, footprint)


def _parent_of(model, name: str):
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


def _inference_params(model, method, footprint: Footprint) -> int:
    """Parameters a saved adapter holds: peft keeps the prefix / virtual tokens, not the MLP or encoder.

    What peft writes is ``get_prompt_embedding_to_save``: the encoder's output for the virtual tokens. That
    method copies to the CPU, which a meta tensor refuses, so its first lines are repeated here for the shape.
    """
    if method.name not in ("prefix-tuning", "p-tuning"):
        return footprint.trainable
    adapter = model.active_adapter
    encoder = model.prompt_encoder[adapter]
    tokens = model.prompt_tokens[adapter].unsqueeze(0).to(encoder.embedding.weight.device)
    tokens = tokens[:, : model.peft_config[adapter].num_virtual_tokens]
    kept = encoder(tokens)[0].numel()
    return footprint.trainable - sum(p.numel() for p in encoder.parameters()) + kept


# ---- the estimate ---------------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    model: str
    method: str
    kind: str
    device: str
    precision: str
    weights_dtype: str
    batch_size: int
    seq_length: int
    gradient_checkpointing: bool
    optimizer: str
    trainable_params: int
    total_params: int
    components: dict[str, int]  # bytes
    peak_bytes: int
    runtime_bytes: int  # CUDA context and workspaces (0 on CPU: measured separately there)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / MiB

    @property
    def required_bytes(self) -> int:
        """What the device must hold: the tensors at their peak plus the runtime."""
        return self.peak_bytes + self.runtime_bytes

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["components_mb"] = {k: round(v / MiB, 1) for k, v in self.components.items()}
        data["peak_mb"] = round(self.peak_mb, 1)
        data["required_mb"] = round(self.required_bytes / MiB, 1)
        del data["components"]
        return data


@dataclass(frozen=True)
class _Bytes:
    """Bytes per element of each kind of saved tensor, for a device and precision (see module docstring)."""

    lin: int  # outputs of linear layers and what follows them (FFN activations)
    res: int  # residual stream, norm inputs
    att: int  # Q, K, V, attention output and probabilities
    mask_lin: int  # dropout mask on a linear output
    mask_res: int  # dropout mask on an fp32 tensor (residual stream, LoRA's input)
    scores: int  # per materialised attention probability (softmax output [+ dropout mask and output])


def _bytes_per_element(device: str, precision: str, dropout: bool) -> _Bytes:
    lin = 2 if precision == "bf16" else 4
    if device == "cuda":
        att = lin
        mask_lin = mask_res = 1  # CUDA dropout keeps a bool mask
        scores = att + (1 + att if dropout else 0)
    else:
        att = 4  # CPU autocast leaves scaled_dot_product_attention in fp32
        mask_lin, mask_res = lin, 4  # CPU dropout masks have their input's dtype
        scores = att + (2 * att if dropout else 0)
    return _Bytes(lin=lin, res=4, att=att, mask_lin=mask_lin, mask_res=mask_res, scores=scores)


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise PeftlabError(f"Unknown {what} '{value}'. Use one of: {', '.join(choices)}.")
    return value


def estimate(model: str, method: str, kind: str, *, batch_size: int = 8, seq_length: int = 512,
             device: str = "cuda", precision: str = "bf16", weights: str = "fp32",
             gradient_checkpointing: bool | None = None, num_labels: int = 2) -> MemoryEstimate:
    """Training memory of ``method`` on ``model`` for task kind ``kind`` (see the module docstring).

    ``gradient_checkpointing=None`` uses the method's own default (on for QLoRA, off otherwise).
    """
    from peftlab.methods import get_method_class

    _check_choice(device, DEVICES, "device")
    _check_choice(precision, PRECISIONS, "precision")
    _check_choice(weights, WEIGHT_DTYPES, "weight dtype")
    if kind not in AUTO_CLASSES:
        raise PeftlabError(f"Unknown task kind '{kind}'. Use one of: {', '.join(AUTO_CLASSES)}.")
    if int(batch_size) < 1 or int(seq_length) < 1:
        raise PeftlabError(f"Batch size and sequence length must be positive; got {batch_size} and {seq_length}.")
    get_method_class(method)  # unknown method -> PeftlabError with the valid names
    spec = model_spec(model)
    footprint = footprints(model, kind, num_labels)[method]
    if not footprint.supported:
        raise PeftlabError(footprint.reason or f"Method '{method}' cannot run {kind} on '{model}'.")
    if weights == "bf16":
        precision = "bf16"
    checkpointing = footprint.gradient_checkpointing if gradient_checkpointing is None else bool(gradient_checkpointing)
    optimizer = footprint.optimizer if device == "cuda" else "adamw"
    b, s = int(batch_size), int(seq_length)
    components = _components(spec, footprint, b, s, device, precision, weights, checkpointing, optimizer)
    transient = components["activations"] + components["autocast_weight_copies"] + components["logits_and_loss"]
    update = components["gradients"] + components["optimizer_step_temporary"]
    peak = components["weights"] + components["optimizer_states"] + max(transient, update)
    return MemoryEstimate(
        model=model, method=method, kind=kind, device=device, precision=precision, weights_dtype=weights,
        batch_size=b, seq_length=s, gradient_checkpointing=checkpointing, optimizer=optimizer,
        trainable_params=footprint.trainable, total_params=footprint.total,
        components={k: int(v) for k, v in components.items()}, peak_bytes=int(peak),
        runtime_bytes=CUDA_RUNTIME_BYTES if device == "cuda" else 0,
    )


def _components(spec: ModelSpec, fp: Footprint, b: int, s: int, device: str, precision: str, weights: str,
                checkpointing: bool, optimizer: str) -> dict[str, float]:
    trainable = fp.trainable
    # -- weights, gradients, optimizer
    if fp.quantized:
        per_block = 1 / 64 + 4 / (64 * 256)  # double quantisation: 8-bit absmax per 64, fp32 per 256 blocks
        weight_bytes = fp.quantized * (0.5 + per_block) + 4 * (fp.total - fp.quantized)
    elif weights == "bf16":
        weight_bytes = 2 * fp.total
    else:
        weight_bytes = 4 * fp.total
    gradient_bytes = (2 if weights == "bf16" and not fp.quantized else 4) * trainable
    state_bytes = (2 if optimizer == "adamw_8bit" else 8) * trainable
    if weights == "bf16" and not fp.quantized:
        state_bytes += 4 * trainable  # fp32 master copy of each trainable parameter
    step_temporary = 4 * trainable if optimizer == "adamw" else 0

    # -- activations
    dropout = spec.hidden_dropout > 0
    e = _bytes_per_element(device, precision, spec.attention_dropout > 0)
    tokens = s + fp.virtual_tokens  # prompt tuning / P-Tuning lengthen the input
    kv_tokens = tokens + fp.prefix_tokens
    h, hq, hkv, f, a = spec.hidden, spec.query_width, spec.kv_width, spec.intermediate, spec.heads

    materialised = (not fp.fused_attention) or (device == "cpu" and spec.attention_dropout > 0)

    def attention_core(q_len: int, k_len: int) -> float:
        """Q, K, V, the output and the probabilities: what attention saves for its own backward pass."""
        total = (q_len * b * hq + k_len * b * 2 * hkv) * e.att
        if fp.fused_attention:
            total += q_len * b * hq * e.att  # the fused kernel saves its output
        if materialised:
            total += a * b * q_len * k_len * e.scores
        return total

    def layer(queries: int, keys: int, cross: int = 0) -> float:
        """Saved bytes of one transformer layer (``cross``: encoder length for a decoder's cross-attention)."""
        blocks = [(queries, keys)] + ([(queries, cross)] if cross else [])
        total = 0.0
        for q_len, k_len in blocks:  # self-attention, then cross-attention
            total += q_len * b * h * e.res  # norm input
            total += attention_core(q_len, k_len)
            if dropout:
                total += q_len * b * h * e.mask_lin
            if fp.block_linear_trainable:
                total += q_len * b * (h + hq) * e.lin  # inputs of the QKV and output projections
        total += queries * b * h * e.res  # FFN norm input
        total += (3 if fp.gated_ffn else 1) * queries * b * f * e.lin
        if dropout:
            total += queries * b * h * e.mask_lin
        if fp.block_linear_trainable:
            total += queries * b * (h + f) * e.lin  # inputs of the FFN's two projections
        return total

    layers = spec.total_layers
    if spec.architecture == "encoder-decoder":  # peft prefixes the decoder's self-attention only
        per_layer = [layer(tokens, tokens)] * spec.layers + [layer(s, s + fp.prefix_tokens, cross=tokens)] * spec.decoder_layers
    else:
        per_layer = [layer(tokens, kv_tokens)] * layers
    # method-specific saved tensors, summed over the whole model (each layer is adapted alike)
    method_bytes = 0.0
    if fp.lora_inputs:
        mask = e.mask_res if fp.lora_dropout > 0 else 0
        method_bytes += tokens * b * (fp.lora_inputs * (mask + e.lin) + fp.lora_rank_sum * e.lin)
    method_bytes += tokens * b * (fp.ia3_elements * e.lin + fp.ia3_ff_elements * 4)
    method_bytes += tokens * b * fp.adapter_elements * e.lin
    if fp.quantized_inputs:
        method_bytes += tokens * b * fp.quantized_inputs * (e.lin if device == "cuda" else 4)
    if fp.prefix_tokens:  # the per-layer key/value prefix for the batch, and the MLP that makes it
        method_bytes += b * fp.prefix_tokens * (2 * layers * hkv + hkv + 2 * fp.prefix_projection) * 4
    # Below the lowest trainable parameter nothing needs saving: the embedding norm and dropout only
    # when the embeddings (or an input prompt) train, the first layer's attention not for adapters.
    edges = 0.0
    if fp.trains_input_side:
        if fp.embedding_norm:
            edges += tokens * b * h * e.res
        if dropout:
            edges += tokens * b * h * e.mask_res
    if fp.first_attention_frozen:
        edges -= attention_core(tokens, kv_tokens)
    if fp.final_norm:
        edges += s * b * h * e.res
    if checkpointing:
        # each layer keeps only its input; one layer at a time is recomputed with everything it saves
        activations = layers * tokens * b * h * e.res + max(per_layer) + method_bytes / max(layers, 1) + edges
    else:
        activations = sum(per_layer) + method_bytes + edges

    # -- autocast's bf16 copies of fp32 linear weights (saved for the backward pass)
    autocast = 0.0
    if precision == "bf16" and weights == "fp32":
        castable = fp.linear_params - fp.quantized
        if checkpointing:
            castable = fp.trainable_linear_params + fp.head_linear_params + (castable - fp.head_linear_params) / max(layers, 1)
        autocast = 2 * castable

    # -- logits: bf16/fp32 logits, the saved fp32 log-softmax and the two fp32 gradients of that size
    logits = 0.0
    if fp.kind in GENERATIVE_KINDS:
        out_tokens = s if spec.architecture == "encoder-decoder" else tokens
        logits = b * out_tokens * spec.vocab * (12 + (2 if e.lin == 2 else 0))
    return {
        "weights": weight_bytes,
        "gradients": gradient_bytes,
        "optimizer_states": state_bytes,
        "optimizer_step_temporary": step_temporary,
        "activations": activations,
        "autocast_weight_copies": autocast,
        "logits_and_loss": logits,
    }


# ---- measuring a real run on this machine ------------------------------------------------------------

def measure(method: str, *, model: str = "minilm", task: str = "imdb", batch_size: int = 8, max_length: int = 128,
            max_train_samples: int = 64, precision: str = "fp32", data_dir: str | None = None,
            fixed_mmap_threshold: bool = False, timeout: float = 900) -> dict[str, Any]:
    """Train with ``peftlab.training.train`` in a fresh process and report its memory (CPU).

    The child first loads everything except the model (torch, transformers, peft, the Trainer, the
    tokenizer and the task data) and runs one training step of a tiny random model of the same
    architecture and method, so that the kernel code pages a step touches are resident too; its peak
    RSS then is the *baseline*. It then trains the real model; ``peak_memory_mb`` from ``metrics.json``
    minus the baseline is what the model, method, batch and sequence cost, the quantity ``estimate()``
    predicts. ``fixed_mmap_threshold`` sets glibc's ``MALLOC_MMAP_THRESHOLD_`` to 64 KiB so that freed
    tensors go back to the system at once (no heap fragmentation): the measured peak is then the peak of
    live tensors, as a GPU allocator reports it.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    request = dict(method=method, model=model, task=task, batch_size=batch_size, max_length=max_length,
                   max_train_samples=max_train_samples, precision=precision, data_dir=data_dir)
    completed = subprocess.run([sys.executable, "-m", "peftlab.memory", "_child", json.dumps(request)],
                               capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{\"measured\"")]
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"measuring {method} on {model} failed (exit {completed.returncode}): " + " | ".join(tail))
    result = json.loads(lines[-1])["measured"]
    result["fixed_mmap_threshold"] = fixed_mmap_threshold
    return result


def _tiny_config(config):
    """The same architecture at a negligible size (for paging in the kernels a training step uses)."""
    values = config.to_dict()
    for key in ("head_dim",):
        values.pop(key, None)
    sizes = dict(hidden_size=64, d_model=64, n_embd=64, intermediate_size=128, d_ff=128, n_inner=None,
                 num_hidden_layers=1, num_layers=1, n_layer=1, num_decoder_layers=1, d_kv=16,
                 num_attention_heads=4, num_heads=4, n_head=4)
    for key, value in sizes.items():
        if key in values:
            values[key] = value
    if "num_key_value_heads" in values:
        kv = values.get("num_key_value_heads") or 4
        values["num_key_value_heads"] = 2 if kv < (config.num_attention_heads or kv) else 4
    return type(config).from_dict(values)


def warm_up(method: str, model: str, task: str, *, max_length: int, max_train_samples: int, precision: str,
            data_dir: str | None = None) -> list[int]:
    """Everything a training run loads except the model, so that what comes after is the model's cost.

    Imports what ``train()`` imports (transformers' Trainer, peft, datasets, matplotlib), loads the
    tokenizer and the task data, and trains one step of a tiny random model of the same architecture
    with the same method and precision (which pages in the kernels and allocates the libraries' lazy
    state). Returns the tokenized training lengths.
    """
    import torch
    import transformers
    from transformers import Trainer  # noqa: F401  (the runtime the baseline must include)

    from peftlab import hardware, training
    from peftlab.methods import get_method
    from peftlab.models import load_tokenizer, resolve_model
    from peftlab.plots import plot_training  # noqa: F401  (train() imports matplotlib at the end)
    from peftlab.preprocess import tokenize
    from peftlab.tasks import get_task
    from peftlab.tasks.base import select

    task_object = get_task(task)
    raw = select(task_object.load("train", data_dir), max_train_samples, 42)
    tokenizer = load_tokenizer(model)
    labels = task_object.labels_from(raw)
    data = tokenize(raw, task_object.kind, tokenizer, max_length=max_length, label_names=labels,
                    is_regression=task_object.is_regression)
    method_object = get_method(method)
    if not method_object.model_load_kwargs():  # a 4-bit base cannot be built from a config
        tiny = _tiny_config(transformers.AutoConfig.from_pretrained(resolve_model(model)))
        if task_object.kind in ("seq-cls", "token-cls"):
            tiny.num_labels = len(labels or [0, 1])
        tiny_model = method_object.apply(getattr(transformers, AUTO_CLASSES[task_object.kind]).from_config(tiny),
                                         task_object.kind)
        tiny_model.train()
        ids = torch.tensor([data[0]["input_ids"][:16]] * 2)
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        batch["labels"] = torch.zeros(2, dtype=torch.long) if task_object.kind == "seq-cls" else ids.clone()
        optimizer = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad])
        with hardware.autocast(hardware.resolve_precision(precision)):
            loss = tiny_model(**batch).loss
        loss.backward()
        optimizer.step()
        del tiny_model, optimizer, loss, batch
    return list(data["length"])


def _child(request: dict[str, Any]) -> None:
    import resource
    import tempfile

    import torch

    from peftlab import training
    from peftlab.tasks import get_task

    torch.set_num_threads(1)
    lengths = warm_up(request["method"], request["model"], request["task"], max_length=request["max_length"],
                      max_train_samples=request["max_train_samples"], precision=request["precision"],
                      data_dir=request["data_dir"])
    task = get_task(request["task"])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as folder:
        metrics = training.train(
            method=request["method"], model=request["model"], task=request["task"], output=f"{folder}/run",
            data_dir=request["data_dir"], max_train_samples=request["max_train_samples"], max_eval_samples=8,
            epochs=1, batch_size=request["batch_size"], eval_batch_size=request["batch_size"],
            max_length=request["max_length"], precision=request["precision"], progress=False,
            eval_each_epoch=False, seed=42)
    print(json.dumps({"measured": {
        "method": request["method"], "model": request["model"], "task": request["task"], "kind": task.kind,
        "precision": metrics["precision"], "batch_size": request["batch_size"], "max_length": request["max_length"],
        "max_tokens_in_batch": max(lengths), "baseline_mb": round(baseline, 1),
        "peak_memory_mb": round(metrics["peak_memory_mb"], 1),
        "model_mb": round(metrics["peak_memory_mb"] - baseline, 1),
        "trainable_params": metrics["trainable_params"], "train_seconds": round(metrics["train_seconds"], 1),
    }}), flush=True)


def saved_activation_bytes(model: str, method: str, kind: str, *, batch_size: int = 8, seq_length: int = 128,
                           precision: str = "fp32", num_labels: int = 2) -> dict[str, float]:
    """The activation terms alone, checked exactly: what autograd saves in one forward pass, on CPU.

    Loads the real model, applies ``method``, runs one forward pass in training mode on random tokens
    under ``torch.autograd.graph.saved_tensors_hooks`` and adds up the distinct storages saved for the
    backward pass that are not parameters. The estimate's counterpart is activations + autocast weight
    copies + the saved fp32 log-softmax (4 of the 12-14 bytes per logit).
    """
    import torch

    from peftlab import hardware
    from peftlab.methods import get_method
    from peftlab.models import load_model

    labels = [str(i) for i in range(num_labels)]
    trained = get_method(method).apply(load_model(model, kind, label_names=labels), kind)
    trained.train()
    vocab = trained.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab - 1, (batch_size, seq_length))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    batch["labels"] = torch.zeros(batch_size, dtype=torch.long) if kind == "seq-cls" else (
        torch.zeros_like(ids) if kind == "token-cls" else ids.clone())
    parameters = {p.untyped_storage().data_ptr() for p in trained.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), hardware.autocast(precision):
        trained(**batch)
    predicted = estimate(model, method, kind, batch_size=batch_size, seq_length=seq_length, device="cpu",
                         precision=precision, num_labels=num_labels).components
    per_logit = 12 + (2 if precision == "bf16" else 0)
    expected = (predicted["activations"] + predicted["autocast_weight_copies"]
                + predicted["logits_and_loss"] * 4 / per_logit)
    return {"saved_mb": sum(saved.values()) / MiB, "estimated_mb": expected / MiB}


def validate(runs: list[dict[str, Any]], *, fixed_mmap_threshold: bool = False) -> list[dict[str, Any]]:
    """Measure each run and put the estimate beside it: the rows of docs/recommend.md's validation table."""
    from peftlab.tasks import get_task

    rows = []
    for run in runs:
        measured = measure(**run, fixed_mmap_threshold=fixed_mmap_threshold)
        kind = get_task(run.get("task", "imdb")).kind
        predicted = estimate(run.get("model", "minilm"), run["method"], kind, batch_size=run.get("batch_size", 8),
                             seq_length=measured["max_tokens_in_batch"], device="cpu",
                             precision=measured["precision"])
        error = (predicted.peak_mb - measured["model_mb"]) / measured["model_mb"]
        total = predicted.peak_mb + measured["baseline_mb"]
        rows.append({**measured, "estimated_mb": round(predicted.peak_mb, 1),
                     "error": round(error, 3), "estimated_total_mb": round(total, 1),
                     "total_error": round((total - measured["peak_memory_mb"]) / measured["peak_memory_mb"], 3),
                     "components_mb": predicted.to_dict()["components_mb"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m peftlab.memory validate RUN... [options]``: measure runs and print them beside the estimate."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        _child(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m peftlab.memory")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("validate", help="train each run in a fresh process; print measured and estimated MB")
    sub.add_argument("runs", nargs="+", metavar="METHOD[:MODEL[:TASK]]", help="e.g. lora, full:smollm2:alpaca "
                     "(model defaults to minilm, task to imdb)")
    sub.add_argument("--precision", default="fp32", help="fp32 or bf16 (auto: what peftlab picks here)")
    sub.add_argument("--batch-size", type=int, default=8)
    sub.add_argument("--max-length", type=int, default=128)
    sub.add_argument("--max-train-samples", type=int, default=64)
    sub.add_argument("--data-dir", default=None)
    sub.add_argument("--fixed-mmap-threshold", action="store_true",
                     help="MALLOC_MMAP_THRESHOLD_=65536: freed memory leaves the resident set at once")
    sub = commands.add_parser("saved", help="autograd's saved tensors in one forward pass vs the activation terms")
    sub.add_argument("methods", help="comma-separated methods")
    sub.add_argument("--model", default="minilm")
    sub.add_argument("--kind", default="seq-cls")
    sub.add_argument("--precision", default="fp32")
    sub.add_argument("--batch-size", type=int, default=8)
    sub.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args(argv)
    if args.command == "saved":
        import torch

        torch.set_num_threads(1)
        for method in args.methods.split(","):
            result = saved_activation_bytes(args.model, method, args.kind, batch_size=args.batch_size,
                                            seq_length=args.max_length, precision=args.precision)
            error = (result["estimated_mb"] - result["saved_mb"]) / result["saved_mb"]
            print(json.dumps({"method": method, **{k: round(v, 1) for k, v in result.items()},
                              "error": round(error, 3)}), flush=True)
        return 0
    runs = []
    for item in args.runs:
        method, model, task = (item.split(":") + ["minilm", "imdb"][len(item.split(":")) - 1:])[:3]
        runs.append(dict(method=method, model=model, task=task, precision=args.precision, batch_size=args.batch_size,
                         max_length=args.max_length, max_train_samples=args.max_train_samples,
                         data_dir=args.data_dir))
    validate(runs, fixed_mmap_threshold=args.fixed_mmap_threshold)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
