"""The first-principles estimate of what training a method on a model keeps in memory.

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

Several ranks (``nproc``, ``deepspeed``, ``fsdp``, ``offload``): the estimate is one rank's, from
``peftlab.memory.sharding`` (what DDP, ZeRO-2/3 and FSDP keep per rank, and what offload moves to host memory).
Under DeepSpeed the update phase is the gradient as autograd produces it (4Ψ_t, before DeepSpeed reduces it
into its partition) plus about three fp32 temporaries of the rank's partition while the optimizer steps
(measured), and a DeepSpeed rank on CPU runs in about 1 GiB before its tensors
(``process_runtime_bytes``; 0.6 GiB without DeepSpeed).

The model's numbers come from ``peftlab.memory.model``; what each method trains from
``peftlab.memory.footprint``. ``peftlab.memory.measure`` checks the estimate against real runs, and
tests/test_memory_scale.py the per-rank estimate against measured ZeRO-3, ZeRO-2 and DDP ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.kinds import TaskKind
from peftlab.memory.footprint import Footprint, footprints
from peftlab.memory.model import ModelSpec, model_spec
from peftlab.memory.sharding import Sharding, per_rank

MiB = 2**20
GiB = 2**30

# What CUDA itself takes on the device besides the tensors (context, cuBLAS/cuDNN workspaces), and
# which torch.cuda.max_memory_allocated() does not count: ~300-500 MB on recent GPUs.
CUDA_RUNTIME_BYTES = 512 * MiB
# A CPU training process's resident set before the model: Python, torch, transformers, peft, the Trainer,
# tokenizer, data and kernel code pages (measured here: 576 MB for minilm + IMDB, see docs/recommend.md).
CPU_RUNTIME_BYTES = 600 * MiB
# The same for a DeepSpeed rank on CPU: DeepSpeed's imports and its engine's buffers on top (measured on
# SmolLM2 ZeRO-3 ranks: 0.7-0.9 GiB at the start of training besides the parameters, ~1 GiB at the peak).
DEEPSPEED_CPU_RUNTIME_BYTES = 1024 * MiB
# fp32 temporaries of the rank's partition while DeepSpeed's optimizer step runs (torch AdamW's foreach
# intermediates and the copy back into the parameters): measured, SmolLM2 full fine-tuning, 1 and 2 ranks
DEEPSPEED_STEP_TEMPORARIES = 3

DEVICES = ("cuda", "cpu")
PRECISIONS = ("bf16", "fp32")
WEIGHT_DTYPES = ("fp32", "bf16")

# task kinds whose loss runs over a vocabulary-sized output layer
GENERATIVE_KINDS = tuple(kind for kind in TaskKind if kind.is_generative)


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
    nproc: int = 1
    sharding: str = "one process"  # Sharding.describe()
    offloaded_bytes: int = 0  # moved to host memory by offload (not in peak_bytes on a GPU)

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


def process_runtime_bytes(device: str, deepspeed: str | None = None) -> int:
    """What one training process takes besides its tensors: the CUDA runtime on a GPU, the Python/torch runtime
    (more with DeepSpeed) on CPU."""
    if device == "cuda":
        return CUDA_RUNTIME_BYTES
    return DEEPSPEED_CPU_RUNTIME_BYTES if deepspeed else CPU_RUNTIME_BYTES


def estimate(model: str, method: str, kind: str, *, batch_size: int = 8, seq_length: int = 512,
             device: str = "cuda", precision: str = "bf16", weights: str = "fp32",
             gradient_checkpointing: bool | None = None, num_labels: int = 2, nproc: int = 1,
             deepspeed: str | None = None, fsdp: str | None = None, offload: bool = False) -> MemoryEstimate:
    """Training memory of ``method`` on ``model`` for task kind ``kind`` (see the module docstring).

    ``gradient_checkpointing=None`` uses the method's own default (on for QLoRA, off otherwise).
    ``nproc``, ``deepspeed`` (zero2, zero3), ``fsdp`` (full_shard, shard_grad_op, hybrid_shard) and ``offload``:
    the estimate is per rank (``batch_size`` is per rank too).
    """
    from peftlab.methods import get_method_class

    _check_choice(device, DEVICES, "device")
    _check_choice(precision, PRECISIONS, "precision")
    _check_choice(weights, WEIGHT_DTYPES, "weight dtype")
    if kind not in list(TaskKind):
        raise PeftlabError(f"Unknown task kind '{kind}'. Use one of: {', '.join(TaskKind)}.")
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
    sharding = Sharding.from_options(nproc, deepspeed, fsdp, offload)
    if sharding.engine == "zero3" and footprint.quantized:
        raise PeftlabError(f"Method '{method}' keeps a 4-bit base, which ZeRO-3 cannot partition: estimate it with "
                           "--deepspeed zero2, --fsdp or plain --nproc.")
    components = _components(spec, footprint, b, s, device, precision, weights, checkpointing, optimizer)
    root, block = _unit_params(spec, footprint)
    components, offloaded = per_rank(components, sharding, total=footprint.total, trainable=footprint.trainable,
                                     quantized=footprint.quantized, root_params=root, block_params=block,
                                     precision=precision, weights=weights, device=device)
    peak = _peak(components, sharding, footprint.trainable, device, reduce_bucket=spec.hidden * spec.hidden)
    return MemoryEstimate(
        model=model, method=method, kind=kind, device=device, precision=precision, weights_dtype=weights,
        batch_size=b, seq_length=s, gradient_checkpointing=checkpointing, optimizer=optimizer,
        trainable_params=footprint.trainable, total_params=footprint.total,
        components={k: int(v) for k, v in components.items()}, peak_bytes=int(peak),
        runtime_bytes=CUDA_RUNTIME_BYTES if device == "cuda" else 0, nproc=sharding.nproc,
        sharding=sharding.describe(), offloaded_bytes=int(offloaded),
    )


def _peak(components: dict[str, float], sharding: Sharding, trainable: int, device: str, reduce_bucket: int) -> float:
    """What the rank keeps between steps, plus the larger of the forward/backward tensors and the update.

    Under DeepSpeed the update starts with the gradients autograd produces before they are reduced into the
    rank's partition: on a GPU one reduce bucket at a time (``reduce_bucket_size``, hidden² elements in
    peftlab's preset); on CPU the process keeps the memory of all of them (4Ψ_t, measured: the allocator
    holds what the backward pass freed)."""
    transient = (components["activations"] + components["autocast_weight_copies"] + components["logits_and_loss"]
                 + components.get("gathered_weights", 0.0))
    kept = components["weights"] + components["optimizer_states"] + components.get("ddp_buckets", 0.0)
    if sharding.engine in ("zero2", "zero3"):
        if sharding.engine == "zero3":
            kept += components["gradients"]  # ZeRO-3 keeps its fp32 gradient partition between steps
        unreduced = 4 * trainable if device == "cpu" else 4 * min(trainable, reduce_bucket)
        # then the optimizer's temporaries on the partition (none on the device when offloaded)
        update = unreduced + DEEPSPEED_STEP_TEMPORARIES * components["optimizer_step_temporary"]
    else:
        update = components["gradients"] + components["optimizer_step_temporary"]
    return kept + max(transient, update)


def _unit_params(spec: ModelSpec, fp: Footprint) -> tuple[int, int]:
    """(parameters outside the transformer blocks, parameters of one block): FSDP's units."""
    layers = max(spec.total_layers, 1)
    embeddings = spec.vocab * spec.hidden
    if fp.head_linear_params > embeddings // 2:  # an untied LM head of vocabulary size
        embeddings += fp.head_linear_params
    block = max(0, (fp.total - embeddings) // layers)
    return fp.total - block * layers, block


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
    if TaskKind(fp.kind).is_generative:
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
