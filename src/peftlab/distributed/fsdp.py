"""FSDP through the ``Trainer`` (accelerate's FSDP2 integration): arguments, checks, and CPU support.

``--fsdp full_shard|shard_grad_op|hybrid_shard [--fsdp-offload]`` becomes ``TrainingArguments(fsdp=True,
fsdp_config=...)`` with FSDP2 (``torch.distributed.fsdp.fully_shard``, the version transformers 5 defaults
to): every transformer block is its own FSDP unit (transformer-based auto-wrap on the model's
``_no_split_modules``, else on its repeated block class), parameters are sharded per parameter, so a
block that mixes frozen base weights and trainable PEFT weights shards as is (FSDP1 needed
``use_orig_params=True`` for that; FSDP2 has no flat parameters). Mixed precision follows ``--precision``.

* ``full_shard``: parameters, gradients and optimizer state sharded; parameters re-sharded after each
  block's forward (ZeRO-3-like).
* ``shard_grad_op``: parameters stay gathered between forward and backward (``reshard_after_forward=False``:
  more memory, one all-gather less per step; ZeRO-2-like).
* ``hybrid_shard``: shard within a node, replicate across nodes (FSDP2 on a 2-D device mesh, HSDP); on one
  node it is ``full_shard``.
* ``--fsdp-offload``: parameters, gradients and optimizer state live in host memory (FSDP2 ``CPUOffloadPolicy``).

QLoRA: accelerate keeps bitsandbytes' packed 4-bit weights (uint8 storage) out of ``fully_shard`` (they
cannot become DTensors), so the 4-bit base stays whole on every rank and only the LoRA weights, head
and norms are sharded; with offload FSDP would move only those, so QLoRA with ``--fsdp-offload`` is refused.

On CPU (gloo) accelerate treats the ranks as plain DDP and drops the FSDP plugin without a word
(``AcceleratorState`` enables FSDP only for accelerator device types); torch's FSDP2 itself runs on CPU.
:func:`enable_on_cpu` lets accelerate take its FSDP path there too, which is how the FSDP code path is
tested on CPU-only machines.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

from peftlab.errors import PeftlabError

FSDP_MODES = ("full_shard", "shard_grad_op", "hybrid_shard")


def fsdp_mode(value: str | None) -> str | None:
    """``--fsdp`` checked: one of :data:`FSDP_MODES`, or None (no FSDP)."""
    if value is None or value is False:
        return None
    text = str(value).strip().lower().replace("-", "_")
    if text in ("", "none", "no", "false"):
        return None
    if text not in FSDP_MODES:
        import difflib

        close = difflib.get_close_matches(text, FSDP_MODES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise PeftlabError(f"Unknown --fsdp '{value}'. Valid values: {', '.join(FSDP_MODES)}.{hint}")
    return text


def block_classes(model) -> list[str]:
    """Class names of the model's transformer blocks: what FSDP wraps one unit each.

    Of the model's own ``_no_split_modules`` (what transformers keeps on one device), those that repeat
    (BERT also lists its embeddings, which accelerate shards on their own: wrapping them twice fails);
    without any, the class that fills the model's longest ``ModuleList`` (the layer stack).
    """
    from torch import nn

    base = model
    while hasattr(base, "get_base_model") and base is not base.get_base_model():
        base = base.get_base_model()
    counts = Counter(type(module).__name__ for module in base.modules())
    declared = [name for name in getattr(base, "_no_split_modules", None) or [] if counts.get(name, 0) > 1]
    if declared:
        return sorted(set(declared))
    stack: list[nn.Module] = []
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(stack):
            if len({type(child) for child in module}) == 1:
                stack = list(module)
    return [type(stack[0]).__name__] if len(stack) > 1 else []


def fsdp_arguments(mode: str, offload: bool = False, *, model=None, nodes: int = 1,
                   ranks_per_node: int = 1) -> dict[str, Any]:
    """``TrainingArguments`` keys for ``--fsdp MODE [--fsdp-offload]`` (FSDP2 through accelerate)."""
    mode = fsdp_mode(mode)
    if mode is None:
        return {}
    config: dict[str, Any] = {
        "version": 2,
        "reshard_after_forward": mode != "shard_grad_op",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_offload": bool(offload),
        "state_dict_type": "FULL_STATE_DICT",  # Trainer checkpoints: whole tensors, gathered on rank 0
    }
    if model is not None:
        classes = block_classes(model)
        if classes:
            config["transformer_layer_cls_to_wrap"] = classes
    arguments: dict[str, Any] = {"fsdp": True, "fsdp_config": config}
    if mode == "hybrid_shard" and nodes > 1:
        from accelerate.parallelism_config import ParallelismConfig

        arguments["parallelism_config"] = ParallelismConfig(dp_replicate_size=nodes, dp_shard_size=ranks_per_node)
    return arguments


def enable_on_cpu() -> None:
    """Let accelerate run FSDP on CPU ranks (gloo), as it does on GPUs. Idempotent.

    Two adaptations, both to accelerate 1.x code paths that only consider accelerator devices:
    ``AcceleratorState`` switches a multi-process run to FSDP only for GPU-like device types, so an
    FSDP plugin given on CPU is kept and the state marked FSDP here; and the full state dict FSDP2
    gathers for a checkpoint is "offloaded to CPU" with ``.cpu()``, which on CPU returns the very
    buffers FSDP frees after the gather, so it is copied here. No library offers this; on GPUs neither
    is touched.
    """
    from accelerate import Accelerator
    from accelerate import state as accelerate_state
    from accelerate.utils import DistributedType

    cls = accelerate_state.AcceleratorState
    if getattr(cls.__init__, "peftlab_cpu_fsdp", False):
        return
    original_init = cls.__init__

    @functools.wraps(original_init)
    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    init.peftlab_cpu_fsdp = True
    cls.__init__ = init

    original_state_dict = Accelerator.get_state_dict

    @functools.wraps(original_state_dict)
    def get_state_dict(self, model, unwrap=True):
        state = original_state_dict(self, model, unwrap=unwrap)
        if self.is_fsdp2 and self.device.type == "cpu":
            state = {name: value.clone() for name, value in state.items()}
        return state

    Accelerator.get_state_dict = get_state_dict


def uses_fsdp(trainer) -> bool:
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def reshard(model) -> None:
    """Put every FSDP unit of ``model`` back to its shards (the root stays gathered after a forward pass,
    and its parameters are then plain tensors whose storage FSDP frees later)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gather_full_parameters(parameters, on_main: bool) -> list:
    """The whole value of each FSDP-sharded parameter (a collective: call on every rank, same order,
    after :func:`reshard`).

    Rank 0 (``on_main``) gets CPU copies; the others None. A parameter FSDP does not manage (the 4-bit
    weights accelerate leaves out of sharding) comes back as it is.
    """
    from torch.distributed.tensor import DTensor

    values = []
    for parameter in parameters:
        if isinstance(parameter, DTensor):
            full = parameter.full_tensor()
            values.append(full.detach().to("cpu", copy=True) if on_main else None)
            del full
        else:
            values.append(parameter.detach() if on_main else None)
    return values
