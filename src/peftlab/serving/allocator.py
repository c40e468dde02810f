"""glibc's allocator, set for a server that runs for days.

Under sustained load ``peftlab serve`` grew step-wise, 8 to 40 MB at a time, and did not level off: +11% resident
memory in 5 and in 10 minutes after warm-up at twice its capacity (benchmarks/serve_load.py --soak,
docs/deploy.md). Not a leak: changing only glibc's settings made it flat. The likely cause is glibc's dynamic
mmap threshold: a freed block larger than the threshold (128 KB at start) raises it, up to 32 MB, so the next
activations of a larger batch are carved out of the heap instead of being mapped and unmapped, and the heap
keeps the high-water mark of every batch shape it has seen, fragmented between the threads' arenas. A fixed threshold (which also switches the dynamic one off)
sends every large tensor back to the system when it is freed, and two arenas bound what the HTTP threads can
hold; with the same load, resident memory then moved within 2% of its level after warm-up for 10 minutes.

Set with ``mallopt`` from the running process because glibc reads its ``MALLOC_*`` environment variables only
at start-up; no Python library exposes ``mallopt`` (hence ctypes). A user's own ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_ARENA_MAX`` win, ``PEFTLAB_SERVE_MALLOC=default`` leaves glibc as it is, and anything but glibc on
Linux is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc malloc.h
M_ARENA_MAX = -8
# Fixed at 4 MB: blocks above it (the activations of large micro-batches) are mapped and returned when freed;
# smaller ones are reused from the heap. At glibc's starting 128 KB, fixed, memory was as flat but saturated
# throughput fell 22% (every mid-sized tensor mapped, page-faulted and unmapped); at 4 MB it fell 5 to 15% in
# two runs (docs/deploy.md, "Endurance test"), and the closed-loop capacity not at all.
MMAP_THRESHOLD = 4 * 1024 * 1024
ARENAS = 2
SWITCH = "PEFTLAB_SERVE_MALLOC"


def steady_allocator() -> str:
    """Fix glibc's mmap threshold and cap its arenas for this process; returns what was done, in words."""
    if os.environ.get(SWITCH, "").strip().lower() in ("default", "off", "0"):
        return f"glibc defaults (${SWITCH})"
    if not sys.platform.startswith("linux"):
        return "not glibc: allocator unchanged"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return "not glibc: allocator unchanged"
    done = []
    if not os.environ.get("MALLOC_MMAP_THRESHOLD_") and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1:
        done.append(f"mmap threshold fixed at {MMAP_THRESHOLD // 2**20} MB")
    if not os.environ.get("MALLOC_ARENA_MAX") and mallopt(M_ARENA_MAX, ARENAS) == 1:
        done.append(f"{ARENAS} arenas")
    return "glibc: " + (", ".join(done) if done else "your MALLOC_* settings")


__all__ = ["steady_allocator", "M_MMAP_THRESHOLD", "M_ARENA_MAX", "MMAP_THRESHOLD", "ARENAS", "SWITCH"]
