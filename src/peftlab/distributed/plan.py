"""What a run's sharding flags mean for training, checked before any rank starts.

The hooks ``peftlab.training`` calls:

* :func:`check_plan` - ``--fsdp`` with ``--deepspeed``, ``--fsdp`` on one process, QLoRA with a sharding
  mode the installed versions cannot run, ...: one sentence, in the launcher, before any rank starts
  (and again in each rank, for runs started by another launcher);
* :func:`model_init_context` - the context to load the base model (and apply the method) in: under
  ZeRO-3, transformers builds the model inside ``deepspeed.zero.Init`` so each rank holds 1/N of it;
* :func:`training_arguments` - the ``TrainingArguments`` keys for DeepSpeed or FSDP;
* :func:`forward_is_collective` - whether every rank must run each forward pass (evaluation included).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from peftlab.distributed import env, fsdp, zero
from peftlab.errors import PeftlabError


def _fsdp_settings(config) -> tuple[str | None, bool]:
    # TrainConfig.fsdp / fsdp_offload (proposed fields; absent on an older TrainConfig)
    return fsdp.fsdp_mode(getattr(config, "fsdp", None)), bool(getattr(config, "fsdp_offload", False))


def _quantized_base(method_name: str | None) -> bool:
    if not method_name:
        return False
    from peftlab.methods import get_method_class

    try:
        return bool(getattr(get_method_class(method_name), "quantized_base", False))
    except PeftlabError:
        return False  # an unknown method is reported by the method registry, in its own words


def accelerate_shards_around_4bit() -> bool:
    """Whether the installed accelerate keeps bitsandbytes' packed 4-bit weights out of FSDP2's sharding.

    accelerate gained this in 2026 (huggingface/accelerate#3987); before it, ``fully_shard`` on a
    4-bit model fails ("only Tensors of floating point dtype can require gradients") or silently
    corrupts the quantisation state. Read from the function itself rather than a version number.
    """
    import inspect

    try:
        from accelerate.utils import fsdp_utils

        source = inspect.getsource(fsdp_utils.fsdp2_prepare_model)
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    return "Params4bit" in source and "ignored_params" in source


def check_options(deepspeed: str | None, offload: str | None, *, fsdp_mode: str | None = None,
                  fsdp_offload: bool = False) -> None:
    """Flag combinations that would otherwise be ignored silently, or that cannot run together."""
    mode = fsdp.fsdp_mode(fsdp_mode)
    if mode and deepspeed:
        raise PeftlabError(f"--fsdp {mode} and --deepspeed {deepspeed} are two ways to shard the same model: "
                           "choose one.")
    if fsdp_offload and not mode:
        raise PeftlabError("--fsdp-offload works with FSDP only: add --fsdp full_shard (or shard_grad_op, "
                           "hybrid_shard).")
    if offload is not None and zero.offload_device(offload) is not None and not deepspeed:
        if mode:
            raise PeftlabError("--offload cpu is DeepSpeed's; with --fsdp use --fsdp-offload.")
        raise PeftlabError("--offload cpu works with DeepSpeed ZeRO only: add --deepspeed zero2 or --deepspeed zero3.")


def check_plan(config, processes: int | None = None) -> None:
    """Everything about ``config``'s sharding that can be refused before a rank starts (one sentence each).

    ``processes``: how many ranks will train (the launcher's nproc x nnodes); default: this process's
    world size.
    """
    mode, offload = _fsdp_settings(config)
    check_options(config.deepspeed, config.offload, fsdp_mode=mode, fsdp_offload=offload)
    processes = env.world_size() if processes is None else int(processes)
    if mode and processes < 2:
        raise PeftlabError(f"--fsdp {mode} shards the model across processes, and this run has one: add --nproc N "
                           "(N >= 2, one per GPU), or for one device use --deepspeed zero3 --offload cpu.")
    if mode and offload:
        import torch

        if not torch.cuda.is_available():
            raise PeftlabError("--fsdp-offload moves parameters, gradients and optimizer state to host memory, where a "
                               "CPU run keeps them already (and FSDP's offload pins memory, which needs CUDA): drop it.")
    if not _quantized_base(config.method):
        return
    stage = zero.zero_stage(zero.deepspeed_config(config.deepspeed, config.offload)) if config.deepspeed else 0
    if stage == 3:
        raise PeftlabError(
            f"Method '{config.method}' keeps its base in bitsandbytes' packed 4-bit format, which ZeRO-3 cannot "
            "partition (and transformers does not build quantised models under zero.Init): use --deepspeed zero2, "
            "--fsdp full_shard, or plain --nproc.")
    if mode and offload:
        raise PeftlabError(f"Method '{config.method}' with --fsdp-offload would offload only the LoRA weights "
                           "(FSDP leaves the 4-bit base unsharded, on the device): drop --fsdp-offload.")
    if mode and not accelerate_shards_around_4bit():
        import accelerate

        raise PeftlabError(f"Method '{config.method}' cannot run under --fsdp with accelerate {accelerate.__version__}: "
                           "it shards bitsandbytes' 4-bit weights and breaks them. Upgrade accelerate, or use "
                           "--deepspeed zero2 or plain --nproc.")


def forward_is_collective(config) -> bool:
    """Whether every forward pass gathers sharded weights from all ranks (ZeRO-3, FSDP)."""
    mode, _ = _fsdp_settings(config)
    if mode:
        return True
    return bool(config.deepspeed) and zero.zero_stage(zero.deepspeed_config(config.deepspeed, config.offload)) == 3


def training_arguments(config, precision: str | None = None, *, model=None) -> dict[str, Any]:
    """The ``TrainingArguments`` keys ``config``'s sharding needs: ``deepspeed`` or ``fsdp``/``fsdp_config``.

    ``model``: the model to train (FSDP wraps its transformer blocks). Checks the plan first. For
    DeepSpeed without a launcher it describes a one-process group; for FSDP on CPU it lets accelerate
    run FSDP on the gloo ranks (:func:`peftlab.distributed.fsdp.enable_on_cpu`).
    """
    check_plan(config)
    mode, offload = _fsdp_settings(config)
    if config.deepspeed:
        arguments = {"deepspeed": zero.deepspeed_config(config.deepspeed, config.offload)}
        zero.ensure_process_group_env()  # DeepSpeed without a launcher: a one-process group
        return arguments
    if mode:
        import torch

        if not torch.cuda.is_available():
            fsdp.enable_on_cpu()
        per_node = env.local_world_size()
        return fsdp.fsdp_arguments(mode, offload, model=model, nodes=max(1, env.world_size() // max(1, per_node)),
                                   ranks_per_node=per_node)
    return {}


def model_init_context(config):
    """The context to load the base model in (and to apply the method in, for methods that read its weights).

    Under ZeRO-3 (and a base that is not quantised) transformers builds the model inside
    ``deepspeed.zero.Init``: every rank allocates and loads only its 1/N slice of each weight. Elsewhere
    nothing changes. The model's name is resolved first (a bundled model is converted outside it).

    Under a launcher on GPUs it first makes the rank's own GPU (LOCAL_RANK) the current device: a method that
    loads straight onto "the current device" (QLoRA's ``device_map``) would otherwise put every rank's copy on
    GPU 0, because the ``Trainer`` selects each rank's GPU only later.
    """
    if env.launched_distributed():
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank())
    if not config.deepspeed or _quantized_base(config.method):
        return nullcontext()
    ds_config = zero.deepspeed_config(config.deepspeed, config.offload)
    if zero.zero_stage(ds_config) != 3:
        return nullcontext()
    from peftlab import hardware
    from peftlab.models import resolve_model

    path = resolve_model(config.model)
    resolved = zero.resolve_auto(ds_config, batch_size=config.batch_size, grad_accum=config.grad_accum,
                                 world_size=env.world_size(), precision=hardware.resolve_precision(config.precision),
                                 hidden_size=_hidden_size(path))
    return zero.zero3_init(resolved)


def _hidden_size(path: str) -> int | None:
    config_file = Path(path) / "config.json"
    try:
        data = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return None
    if not data and not config_file.exists():
        try:
            from transformers import AutoConfig

            data = AutoConfig.from_pretrained(path).to_dict()
        except (OSError, ValueError):
            return None
    text = data.get("text_config") or {}
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        value = data.get(key, text.get(key))
        if isinstance(value, int):
            return value
    return None
