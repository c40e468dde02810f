"""Saving what a sharded run trained, and evaluating when every forward pass is collective.

* :func:`save_trained` - writes the trained method on rank 0 *after gathering* what ZeRO or FSDP
  partitioned (a rank holds only a slice of each sharded parameter; saving rank 0's view writes
  empty or partial tensors), using the fp32 master weights when DeepSpeed trained in 16-bit;
* :func:`epoch_evaluation` - the per-epoch dev evaluation; under ZeRO-3 and FSDP every rank must run
  the forward passes (each gathers the sharded weights collectively), so there all ranks evaluate
  and only rank 0 reports.
"""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from pathlib import Path

from peftlab.distributed.env import barrier
from peftlab.distributed.fsdp import gather_full_parameters, reshard, uses_fsdp


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def uses_deepspeed(trainer) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


def trainer_zero_stage(trainer) -> int:
    if not uses_deepspeed(trainer):
        return 0
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0)


def save_trained(trainer, method, directory: str | os.PathLike) -> Path:
    """Save ``method``'s trained tensors from ``trainer.model`` into ``directory`` (atomically).

    Call it on EVERY rank: under DeepSpeed it first collects the full fp32 value of each trainable
    parameter (ZeRO-3 partitions parameters across ranks, ZeRO-1/2 keeps the fp32 master weights
    partitioned; both need a collective); under FSDP it all-gathers each sharded parameter the method
    saves (the trainable ones, or all of them for a method that trains every weight). Rank 0 then
    swaps those values into its model, calls ``method.save`` into a staging folder, swaps back, and
    renames the folder into place. Without sharding (single process, DDP) rank 0 saves the model as it is.
    """
    directory = Path(directory)
    main = trainer.is_world_process_zero()
    model = _unwrap(trainer.model)
    staging = directory.with_name("." + directory.name + ".tmp")

    def write():
        shutil.rmtree(staging, ignore_errors=True)
        method.save(model, staging)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)

    if uses_fsdp(trainer):
        _save_fsdp(model, method, main, write)
    elif uses_deepspeed(trainer):
        _save_zero(model, method, main, write, trainer_zero_stage(trainer))
    elif main:
        write()
    return directory


def _save_fsdp(model, method, main: bool, write) -> None:
    from torch import nn

    reshard(model)
    saved = [p for p in model.parameters() if p.requires_grad or method.trains_all_weights]
    values = gather_full_parameters(saved, main)  # collective: same order on every rank
    if main:
        replacement = {id(old): nn.Parameter(value, requires_grad=old.requires_grad)
                       for old, value in zip(saved, values) if value is not None and value is not old}
        originals = {}
        try:
            for module in model.modules():
                for name, parameter in list(module._parameters.items()):
                    if parameter is not None and id(parameter) in replacement:
                        originals[(module, name)] = parameter
                        module._parameters[name] = replacement[id(parameter)]
            write()
        finally:
            for (module, name), parameter in originals.items():
                module._parameters[name] = parameter
    barrier()


def _save_zero(model, method, main: bool, write, stage: int) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_partitioned = [p for p in model.parameters() if not p.requires_grad and hasattr(p, "ds_id")]
    masters = []
    for parameter in trainable:  # collective: same order on every rank
        full = safe_get_full_fp32_param(parameter)
        masters.append(None if full is None or not main else full.detach().to("cpu", copy=True))
    # Under ZeRO-3 gather what method.save reads: the trainable tensors (their fp32 masters are
    # swapped in below), and the frozen ones too for methods that write the whole model.
    gather = list(trainable)
    if stage == 3 and method.trains_all_weights:
        gather += frozen_partitioned
    context = deepspeed.zero.GatheredParameters(gather, modifier_rank=None) if stage == 3 else nullcontext()
    with context:
        if main:
            saved = []
            try:
                for parameter, master in zip(trainable, masters):
                    if master is None:
                        continue
                    if master.shape != parameter.shape and hasattr(parameter, "ds_shape"):
                        master = master.view(parameter.ds_shape)
                    saved.append((parameter, parameter.data))
                    parameter.data = master
                write()
            finally:
                for parameter, data in saved:
                    parameter.data = data
    barrier()


# ---- evaluation when forward passes are collective -------------------------------------------------

def epoch_evaluation(stage: int = 0, *, every_rank: bool | None = None, **kwargs):
    """peftlab's per-epoch evaluation callback.

    ``every_rank``: whether each forward pass is a collective (ZeRO-3, FSDP: it gathers the sharded
    weights from all ranks), so that a rank-0-only evaluation would wait forever for the others; there
    every rank runs the same evaluation (the same dev batches in the same order), rank 0 logs and
    reports, the others discard their scores. Without it, ``stage`` decides (3: every rank).
    ``callback.every_rank`` tells ``train`` whether the final evaluation must run on all ranks too.
    """
    from peftlab.callbacks import EpochEvaluation

    if every_rank is None:
        every_rank = stage == 3
    if not every_rank:
        callback = EpochEvaluation(**kwargs)
        callback.every_rank = False
        return callback
    return _every_rank_class()(**kwargs)


def _every_rank_class():
    from peftlab.callbacks import EpochEvaluation

    class EveryRankEpochEvaluation(EpochEvaluation):
        every_rank = True

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero:
                return super().on_epoch_end(args, state, control, model=model, **kwargs)
            if not self.enabled or model is None:
                return None
            self.last_metrics = self.score(model)
            self.last_epoch_step = state.global_step
            return None

    return EveryRankEpochEvaluation
