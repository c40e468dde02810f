"""What the machine offers: device, bf16 support, memory measurement."""

from __future__ import annotations

import os
import resource
import sys

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def device_type() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def bf16_supported() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    # CPUs with AVX512-BF16 or AMX run bf16 matmuls natively (about 3x fp32 on the machines here);
    # elsewhere bf16 autocast on CPU is emulated and slower than fp32.
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 where the hardware runs it natively, else fp32."""
    from peftlab.errors import PeftlabError

    if precision not in PRECISIONS:
        raise PeftlabError(f"Unknown precision '{precision}'. Use one of: {', '.join(PRECISIONS)}.")
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    if precision == "bf16" and not bf16_supported() and device_type() == "cuda":
        raise PeftlabError("--precision bf16 was requested but this GPU does not support bf16; use fp16 or fp32.")
    if precision == "fp16" and device_type() != "cuda":
        raise PeftlabError("--precision fp16 needs a CUDA GPU; on CPU use bf16 (if supported) or fp32.")
    return precision


def autocast(precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type(), dtype=dtype)


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA max allocated on GPU, peak resident set size on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
