"""Where this process stands in a distributed run: rank, world size, and dying with its launcher."""

from __future__ import annotations

import os
import sys

# Set by peftlab's launcher for a multi-node run: the file a rank touches once it runs (the rendezvous is
# over), so that the launcher can tell a failed rendezvous from a failed rank.
STARTED_MARKER_ENV = "PEFTLAB_RANKS_STARTED"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))


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


def die_with_parent(sig: int) -> bool:
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
    if die_with_parent(signal.SIGKILL) and os.getppid() != parent:
        os._exit(1)  # the launcher died before the death signal was armed
    marker = os.environ.get(STARTED_MARKER_ENV)
    if marker:
        try:
            with open(marker, "a"):
                pass
        except OSError:  # pragma: no cover - the launcher's temporary folder is gone
            pass
    if not is_main_process():
        quiet_rank()


def quiet_rank() -> None:
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

    die_with_parent(signal.SIGTERM)  # torchrun forwards SIGTERM to its ranks, then exits


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
