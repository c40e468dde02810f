"""Data-parallel training: DDP through ``torchrun``, DeepSpeed ZeRO-2/3, and saving what they train.

peftlab trains through the Hugging Face ``Trainer``, which already runs data-parallel when it is
started by a launcher (``torchrun``, ``accelerate launch --multi_gpu``, ``deepspeed``): every rank
holds a replica, the ``Trainer`` shards the batches, gradients are averaged (NCCL on GPU, gloo on
CPU). This module adds what peftlab needs around it:

* :func:`relaunch` - ``peftlab train --nproc N`` re-runs the same command under ``torchrun``;
* :func:`deepspeed_config` - the ZeRO-2 / ZeRO-3 config (optionally with CPU offload) from a short
  name, with ``"auto"`` values the ``Trainer`` fills in from its own arguments;
* :func:`save_trained` - writes the trained method on rank 0 *after gathering* what ZeRO
  partitioned (under ZeRO-3 every rank holds only a slice of each parameter; saving rank 0's
  view writes empty tensors), using the fp32 master weights when training ran in 16-bit;
* :func:`epoch_evaluation` - the per-epoch dev evaluation; under ZeRO-3 every rank must run the
  forward passes (each forward gathers the partitioned weights collectively), so there all ranks
  evaluate and only rank 0 reports.

See docs/scaling.md for commands and measured memory.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
import subprocess
import sys
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError

ZERO_PRESETS = ("zero2", "zero3")
OFFLOAD_DEVICES = ("cpu", "none")
INSTALL_HINT = "pip install 'peftlab[distributed]'"


# ---- environment -------------------------------------------------------------------------------

def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def launched_distributed() -> bool:
    """True inside a process that a launcher started (torchrun, accelerate launch, deepspeed)."""
    return "LOCAL_RANK" in os.environ and world_size() > 1


def strip_launcher_args(argv: list[str]) -> list[str]:
    """``argv`` without the ``--local_rank=N`` that the ``deepspeed`` launcher (and the legacy
    ``torch.distributed.launch``) put in front of the script's own arguments.

    The rank is kept in the LOCAL_RANK environment variable, which is where the ``Trainer`` reads it.
    """
    out: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        name, sep, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not sep:
                value = argv[index + 1] if index + 1 < len(argv) else ""
                index += 1
            if value.strip().lstrip("-").isdigit():
                os.environ.setdefault("LOCAL_RANK", value.strip())
            index += 1
            continue
        out.append(arg)
        index += 1
    return out


def _die_with_parent(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        return False


def init_worker() -> None:
    """First thing a rank started by a launcher does: die when the launcher dies.

    ``torchrun`` starts each rank in a session of its own, so killing the launcher's process group
    (``kill -9 -PGID``, a batch system cancelling the job, a crashed terminal) would leave the ranks
    running as orphans that keep training and writing into the run folder. A rank that loses its
    launcher is useless (nobody restarts or monitors it), so it is killed with it; the run then
    continues with ``--resume`` from its last (atomic) checkpoint. No-op outside a launcher.
    """
    if not launched_distributed():
        return
    import signal

    parent = os.getppid()
    if _die_with_parent(signal.SIGKILL) and os.getppid() != parent:
        os._exit(1)  # the launcher died before the death signal was armed
    if not is_main_process():
        _quiet_rank()


def _quiet_rank() -> None:
    """Ranks other than 0 print no progress bars (weight loading, dataset maps): rank 0 reports."""
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def child_dies_with_us() -> None:  # runs in the forked child before exec (subprocess preexec_fn)
    import signal

    _die_with_parent(signal.SIGTERM)  # torchrun forwards SIGTERM to its ranks, then exits


# ---- peftlab train --nproc N ---------------------------------------------------------------------

def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the relaunched ranks must not relaunch)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The ``torchrun`` command line that runs ``peftlab <argv>`` on ``nproc`` local ranks.

    ``--standalone`` picks a free rendezvous port on localhost, so several runs on one machine do
    not collide (multi-node runs call torchrun themselves, see docs/scaling.md).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "peftlab.cli", *strip_nproc(argv)]


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``peftlab <argv>`` (minus ``--nproc``) under ``torchrun`` with ``nproc`` ranks; its exit code.

    On CPU each rank gets ``cpu_count // nproc`` intra-op threads (OMP_NUM_THREADS), so the ranks
    do not oversubscribe the cores; an explicit OMP_NUM_THREADS wins. The ranks stay in this
    process group, so Ctrl-C (or a kill of the group) reaches all of them.
    """
    import torch

    from peftlab.hardware import cpu_count

    if not isinstance(nproc, int) or nproc < 1:
        raise PeftlabError(f"--nproc must be a positive number of processes; got {nproc!r}.")
    on_gpu = torch.cuda.is_available()
    if on_gpu and nproc > torch.cuda.device_count():
        raise PeftlabError(f"--nproc {nproc} asks for more processes than this machine has GPUs "
                           f"({torch.cuda.device_count()}); each rank needs its own GPU.")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = torchrun_command(nproc, argv)
    if is_main_process():
        backend = "nccl" if on_gpu else "gloo"
        print(f"peftlab: launching {nproc} data-parallel processes ({backend}, OMP_NUM_THREADS="
              f"{env['OMP_NUM_THREADS']}) with torchrun", file=sys.stderr, flush=True)
    process = subprocess.Popen(command, env=env,
                               preexec_fn=child_dies_with_us if sys.platform.startswith("linux") else None)
    try:
        return process.wait()
    except KeyboardInterrupt:
        # the ranks got the same SIGINT (same process group); let torchrun shut them down
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            return 130


# ---- DeepSpeed configuration ---------------------------------------------------------------------

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


def _skip_cpu_jit_ops() -> None:
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


def _offload_device(offload: str | None) -> str | None:
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
    offload = _offload_device(offload)
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
    offload_device = _offload_device(offload)
    if isinstance(spec, dict):
        config = json.loads(json.dumps(spec))
    else:
        text = str(spec).strip()
        name = text.lower()
        if name in ZERO_PRESETS:
            config = preset(int(name[-1]), offload_device)
            require_deepspeed()
            _skip_cpu_jit_ops()
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
        if offload_device is None:
            zero.pop("offload_optimizer", None)
            zero.pop("offload_param", None)
        else:
            if stage not in (2, 3):
                raise PeftlabError(f"--offload {offload_device} needs ZeRO stage 2 or 3; the config has stage {stage}.")
            zero["offload_optimizer"] = {"device": offload_device, "pin_memory": _pin_memory()}
            if stage == 3:
                zero["offload_param"] = {"device": offload_device, "pin_memory": _pin_memory()}
            if "optimizer" not in config:
                config.setdefault("zero_force_ds_cpu_optimizer", False)
    require_deepspeed()
    _skip_cpu_jit_ops()
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


def check_options(deepspeed: str | None, offload: str | None) -> None:
    """Flag combinations that would otherwise be ignored silently."""
    if offload is not None and _offload_device(offload) is not None and not deepspeed:
        raise PeftlabError("--offload cpu works with DeepSpeed ZeRO only: add --deepspeed zero2 or --deepspeed zero3.")


# ---- saving --------------------------------------------------------------------------------------

def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _uses_deepspeed(trainer) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


def trainer_zero_stage(trainer) -> int:
    if not _uses_deepspeed(trainer):
        return 0
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_trained(trainer, method, directory: str | os.PathLike) -> Path:
    """Save ``method``'s trained tensors from ``trainer.model`` into ``directory`` (atomically).

    Call it on EVERY rank: under DeepSpeed it first collects the full fp32 value of each trainable
    parameter (ZeRO-3 partitions parameters across ranks, ZeRO-1/2 keeps the fp32 master weights
    partitioned; both need a collective). Rank 0 then swaps those values into its model, calls
    ``method.save`` into a staging folder, swaps back, and renames the folder into place. Without
    DeepSpeed (single process, DDP) rank 0 saves the model as it is.
    """
    import torch

    directory = Path(directory)
    main = trainer.is_world_process_zero()
    model = _unwrap(trainer.model)
    staging = directory.with_name("." + directory.name + ".tmp")
    stage = trainer_zero_stage(trainer)

    def write():
        shutil.rmtree(staging, ignore_errors=True)
        method.save(model, staging)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)

    if not _uses_deepspeed(trainer):
        if main:
            write()
        return directory

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_partitioned = [p for p in model.parameters() if not p.requires_grad and hasattr(p, "ds_id")]
    masters: list[torch.Tensor | None] = []
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
    _barrier()
    return directory


# ---- evaluation under ZeRO-3 ---------------------------------------------------------------------

def epoch_evaluation(stage: int, **kwargs):
    """peftlab's per-epoch evaluation callback for a run at ZeRO ``stage`` (0: DDP or one process).

    Under ZeRO-3 each forward pass gathers the partitioned weights from all ranks, so a rank-0-only
    evaluation would wait forever for the others. There every rank runs the same evaluation (the
    same dev batches in the same order); rank 0 logs and reports, the others discard their scores.
    ``every_rank`` tells ``train`` whether the final evaluation must run on all ranks too.
    """
    from peftlab.callbacks import EpochEvaluation

    if stage != 3:
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
