"""DeepSpeed ZeRO: the ZeRO-2/3 configs, and loading the base under ``zero.Init`` so ZeRO-3 shards it from the start.

* :func:`deepspeed_config` - the config for ``--deepspeed zero2|zero3|file.json [--offload cpu]``, with
  ``"auto"`` values the ``Trainer`` fills in from its own arguments;
* :func:`model_init_context` - under ZeRO-3, registers transformers' ``HfDeepSpeedConfig`` (with the
  ``"auto"`` values resolved the way the ``Trainer`` resolves them) before ``from_pretrained``, so that
  transformers builds the model inside ``deepspeed.zero.Init``: each rank allocates and loads only its
  1/N slice of every weight, and a model larger than one device can start.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from peftlab.errors import PeftlabError

ZERO_PRESETS = ("zero2", "zero3")
OFFLOAD_DEVICES = ("cpu", "none")
INSTALL_HINT = "pip install 'peftlab[distributed]'"

# the Trainer's max_grad_norm default, which fills "gradient_clipping": "auto" (peftlab does not change it)
TRAINER_MAX_GRAD_NORM = 1.0

_alive: list[Any] = []  # transformers keeps only a weak reference to the HfDeepSpeedConfig


def require_deepspeed():
    """The ``deepspeed`` module, or a PeftlabError that says how to install it."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        raise PeftlabError(
            f"--deepspeed needs the DeepSpeed package, which is not installed ({error}). "
            f"Install it with `{INSTALL_HINT}`."
        ) from None
    return deepspeed


def skip_cpu_jit_ops() -> None:
    """On CPU, keep DeepSpeed on plain gloo collectives instead of its shared-memory comm op.

    DeepSpeed's CPU backend otherwise JIT-compiles ``deepspeed_shm_comm`` (about a minute, and a
    C++ compiler) the first time a process group starts. It only speeds up CPU all-reduce, which
    matters for CPU inference serving, not for the training runs peftlab does on CPU. DeepSpeed
    probes op compatibility once and keeps the answer in ``deepspeed.ops.__compatible_ops__``;
    marking the op unavailable there makes its communication backend fall back to gloo.
    ``PEFTLAB_DS_SHM_COMM=1`` keeps DeepSpeed's default.
    """
    if os.environ.get("PEFTLAB_DS_SHM_COMM") == "1":
        return
    import torch

    if torch.cuda.is_available():
        return
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other DeepSpeed versions
        pass


def offload_device(offload: str | None) -> str | None:
    """``--offload`` checked: "cpu", or None for no offload ("none" or not given)."""
    if offload is None:
        return None
    value = str(offload).strip().lower()
    if value not in OFFLOAD_DEVICES:
        raise PeftlabError(f"Unknown --offload '{offload}'. Valid values: {', '.join(OFFLOAD_DEVICES)} "
                           "(with --deepspeed zero2: optimizer state; zero3: optimizer state and parameters).")
    return None if value == "none" else value


def _pin_memory() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())  # pinned host memory needs CUDA
    except ImportError:  # pragma: no cover
        return False


def preset(stage: int, offload: str | None = None) -> dict[str, Any]:
    """A Trainer-compatible ZeRO config: batch sizes, clipping and precision are ``"auto"``.

    There is no ``optimizer`` / ``scheduler`` section, so the ``Trainer`` builds the same AdamW and
    linear schedule as a single-process run (losses match it step for step). With offload, that
    torch AdamW runs on the CPU copy of the optimizer state: ``zero_force_ds_cpu_optimizer: false``
    lets DeepSpeed accept it instead of its own CPU Adam (which must be compiled on first use).
    """
    if stage not in (2, 3):
        raise PeftlabError(f"ZeRO stage must be 2 or 3; got {stage}.")
    offload = offload_device(offload)
    on_gpu = _pin_memory()
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": on_gpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=int(5e8), reduce_scatter=True)
    else:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_max_live_parameters=int(1e9),
            stage3_max_reuse_distance=int(1e9),
            sub_group_size=int(1e9),
            # lets Trainer.save_model() write full 16-bit weights too; peftlab's own save gathers the
            # fp32 master weights itself (save_trained)
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if offload:
        zero["offload_optimizer"] = {"device": offload, "pin_memory": on_gpu}
        if stage == 3:
            zero["offload_param"] = {"device": offload, "pin_memory": on_gpu}
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                 "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PeftlabError(f"DeepSpeed config '{path}', line {error.lineno}: invalid JSON ({error.msg}).") from None
    except OSError as error:
        raise PeftlabError(f"Cannot read DeepSpeed config '{path}': {error.strerror}.") from None
    if not isinstance(payload, dict):
        raise PeftlabError(f"DeepSpeed config '{path}' must be a JSON object.")
    zero = payload.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise PeftlabError(f"DeepSpeed config '{path}': 'zero_optimization' must be an object.")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise PeftlabError(f"DeepSpeed config '{path}': zero_optimization.stage must be 0, 1, 2 or 3; got {stage!r}.")
    return payload


def deepspeed_config(spec: str | os.PathLike | dict, offload: str | None = None) -> dict[str, Any]:
    """The DeepSpeed config for ``--deepspeed SPEC [--offload cpu]`` (a dict for ``TrainingArguments``).

    ``spec`` is ``zero2``, ``zero3``, a path to a DeepSpeed JSON config, or a dict. With ``offload``
    ``cpu``: ZeRO-2 keeps the optimizer state (fp32 master weights, Adam moments) in CPU memory,
    ZeRO-3 the parameters as well. Given with a config file, ``offload`` overrides its offload
    sections. Raises PeftlabError for an unknown spec or when DeepSpeed is not installed.
    """
    device = offload_device(offload)
    if isinstance(spec, dict):
        config = json.loads(json.dumps(spec))
    else:
        text = str(spec).strip()
        name = text.lower()
        if name in ZERO_PRESETS:
            config = preset(int(name[-1]), device)
            require_deepspeed()
            skip_cpu_jit_ops()
            return config
        path = Path(text).expanduser()
        if path.suffix.lower() != ".json" and not path.is_file():
            from peftlab.errors import did_you_mean

            raise PeftlabError(f"Unknown --deepspeed '{spec}'. Valid values: zero2, zero3, or a path to a DeepSpeed "
                               f"config .json file. {did_you_mean(name, list(ZERO_PRESETS))}")
        if not path.is_file():
            raise PeftlabError(f"DeepSpeed config file '{path}' does not exist. Use zero2, zero3 or an existing .json.")
        config = _read_config_file(path)
    if offload is not None:
        zero = config.setdefault("zero_optimization", {})
        stage = zero.get("stage", 0)
        if device is None:
            zero.pop("offload_optimizer", None)
            zero.pop("offload_param", None)
        else:
            if stage not in (2, 3):
                raise PeftlabError(f"--offload {device} needs ZeRO stage 2 or 3; the config has stage {stage}.")
            zero["offload_optimizer"] = {"device": device, "pin_memory": _pin_memory()}
            if stage == 3:
                zero["offload_param"] = {"device": device, "pin_memory": _pin_memory()}
            if "optimizer" not in config:
                config.setdefault("zero_force_ds_cpu_optimizer", False)
    require_deepspeed()
    skip_cpu_jit_ops()
    return config


def ensure_process_group_env() -> None:
    """Let DeepSpeed run without a launcher: describe a one-process group in the environment.

    ``peftlab train --deepspeed zero3 --offload cpu`` on one GPU (no torchrun) is a common way to
    fit a bigger model; DeepSpeed would otherwise look for MPI to find its peers. Under a launcher
    (RANK / WORLD_SIZE already set) nothing changes.
    """
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))


def zero_stage(config: dict | str | os.PathLike | None) -> int:
    """The ZeRO stage of a DeepSpeed config (dict or file); 0 for None (plain DDP)."""
    if config is None:
        return 0
    if not isinstance(config, dict):
        config = deepspeed_config(config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    return int(stage) if str(stage).isdigit() else 0


# ---- ZeRO-3: build the model partitioned ---------------------------------------------------------

def resolve_auto(config: dict[str, Any], *, batch_size: int, grad_accum: int, world_size: int, precision: str,
                 hidden_size: int | None) -> dict[str, Any]:
    """A copy of ``config`` with every ``"auto"`` replaced by the value the ``Trainer`` will give it.

    ``deepspeed.zero.Init`` parses the whole config and refuses ``"auto"``; the values are the ones
    transformers' ``HfTrainerDeepSpeedConfig`` fills in (``trainer_config_process`` and
    ``trainer_config_finalize``), so the partitioning at load agrees with the engine's later on.
    """
    resolved = json.loads(json.dumps(config))
    filled = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum * world_size,
        "gradient_clipping": TRAINER_MAX_GRAD_NORM,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
    }
    if hidden_size:
        filled.update({
            "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
        })

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key in list(node):
            dotted = f"{prefix}{key}"
            if isinstance(node[key], dict):
                walk(node[key], dotted + ".")
            elif node[key] == "auto":
                if dotted in filled:
                    node[key] = filled[dotted]
                else:
                    del node[key]  # DeepSpeed's default, as the Trainer leaves it

    walk(resolved, "")
    return resolved


@contextmanager
def zero3_init(config: dict[str, Any]) -> Iterator[None]:
    """While active, ``from_pretrained`` builds models inside ``deepspeed.zero.Init`` (``config``: no "auto").

    transformers decides this from a module-level weak reference to an ``HfDeepSpeedConfig``; it is
    kept alive here and dropped on exit, so that a later model in the same process (a one-process
    reference run, the evaluation of another adapter) loads whole again.
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import deepspeed

    ensure_process_group_env()
    if not deepspeed.comm.is_initialized():
        import torch

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    handle = HfDeepSpeedConfig(config)
    _alive.append(handle)
    try:
        yield
    finally:
        _alive.remove(handle)
        unset_hf_deepspeed_config()
