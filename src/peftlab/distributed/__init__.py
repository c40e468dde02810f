"""Training on several processes and machines: DDP, DeepSpeed ZeRO-2/3, FSDP, and their launch.

peftlab trains through the Hugging Face ``Trainer``, which already runs data-parallel when it is
started by a launcher (``torchrun``, ``accelerate launch --multi_gpu``, ``deepspeed``): every rank
holds a replica, the ``Trainer`` shards the batches, gradients are averaged (NCCL on GPU, gloo on
CPU). This package adds what peftlab needs around it:

* ``launch``: ``peftlab train --nproc N`` and multi-node (``--nnodes``, ``--node-rank``,
  ``--master-addr``/``--master-port`` or ``--rdzv-endpoint``) re-run the command under ``torchrun``,
  with the rendezvous checked first (:func:`relaunch`, :class:`LaunchOptions`);
* ``zero``: the ZeRO-2/3 configs (:func:`deepspeed_config`) and loading under ``zero.Init``;
* ``fsdp``: FSDP2 through the Trainer (:func:`fsdp_arguments`), also on CPU;
* ``plan``: the hooks training calls: :func:`check_plan`, :func:`model_init_context`,
  :func:`training_arguments`, :func:`forward_is_collective`;
* ``saving``: :func:`save_trained` gathers what ZeRO or FSDP sharded before rank 0 writes;
  :func:`epoch_evaluation` runs on every rank where forward passes are collective;
* ``env``: rank, world size, ranks that die with their launcher.

See docs/scaling.md for commands and measured memory.
"""

from peftlab.distributed.env import (STARTED_MARKER_ENV, barrier, child_dies_with_us, die_with_parent, init_worker,
                                     is_main_process, launched_distributed, local_rank, local_world_size,
                                     quiet_rank, rank, strip_launcher_args, world_size)
from peftlab.distributed.fsdp import (FSDP_MODES, block_classes, enable_on_cpu, fsdp_arguments, fsdp_mode,
                                      gather_full_parameters, reshard, uses_fsdp)
from peftlab.distributed.launch import (DEFAULT_MASTER_PORT, DEFAULT_RDZV_PORT, DEFAULT_RDZV_TIMEOUT, LAUNCH_FLAGS,
                                        LAUNCH_HELP, LaunchOptions, check_host_side, is_local_address, relaunch,
                                        rendezvous_failure, split_endpoint, strip_launch_flags, strip_nproc,
                                        torchrun_command, wait_for_rendezvous)
from peftlab.distributed.plan import (accelerate_shards_around_4bit, check_options, check_plan, forward_is_collective,
                                      model_init_context, training_arguments)
from peftlab.distributed.saving import (epoch_evaluation, save_trained, trainer_zero_stage, uses_deepspeed)
from peftlab.distributed.zero import (INSTALL_HINT, OFFLOAD_DEVICES, ZERO_PRESETS, deepspeed_config,
                                      ensure_process_group_env, offload_device, preset, require_deepspeed, resolve_auto,
                                      skip_cpu_jit_ops, zero3_init, zero_stage)

__all__ = [
    "DEFAULT_MASTER_PORT", "DEFAULT_RDZV_PORT", "DEFAULT_RDZV_TIMEOUT", "FSDP_MODES", "INSTALL_HINT", "LAUNCH_FLAGS",
    "LAUNCH_HELP", "OFFLOAD_DEVICES", "STARTED_MARKER_ENV", "ZERO_PRESETS", "LaunchOptions",
    "accelerate_shards_around_4bit", "barrier", "block_classes", "check_host_side", "check_options", "check_plan",
    "child_dies_with_us", "deepspeed_config", "die_with_parent", "enable_on_cpu", "ensure_process_group_env",
    "epoch_evaluation", "forward_is_collective", "fsdp_arguments", "fsdp_mode", "gather_full_parameters",
    "init_worker", "is_local_address", "is_main_process", "launched_distributed", "local_rank", "local_world_size",
    "model_init_context", "offload_device", "preset", "quiet_rank", "rank", "relaunch", "rendezvous_failure", "reshard",
    "require_deepspeed", "resolve_auto", "save_trained", "skip_cpu_jit_ops", "split_endpoint", "strip_launch_flags",
    "strip_launcher_args", "strip_nproc", "torchrun_command", "trainer_zero_stage", "training_arguments",
    "uses_deepspeed", "uses_fsdp", "wait_for_rendezvous", "world_size", "zero3_init", "zero_stage",
]
