"""``peftlab.serving.allocator``: glibc's mmap threshold stays fixed in the server, so large freed blocks go back to
the system instead of raising the threshold (the step-wise growth of the endurance test, docs/deploy.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, sys
from peftlab.serving.allocator import steady_allocator

said = steady_allocator() if sys.argv[1] == "steady" else "untouched"
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 8 << 20
first = libc.malloc(size)   # above glibc's starting threshold (128 KB) and the server's (4 MB): mapped
libc.free(first)            # with the dynamic threshold, this raises it to 8 MB
before = libc.mallinfo2().hblks
second = libc.malloc(size)  # mapped again only if the threshold stayed where it was
mapped = libc.mallinfo2().hblks - before
libc.free(second)
print(json.dumps({"said": said, "mapped": mapped}))
"""


def probe(mode: str, **env) -> dict:
    import json

    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                            env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_the_threshold_stays_fixed_in_the_server_and_moves_without_it():
    assert probe("untouched")["mapped"] == 0  # glibc's default: the 8 MB block now comes from the heap
    steady = probe("steady")
    assert steady["mapped"] == 1, steady
    assert steady["said"] == "glibc: mmap threshold fixed at 4 MB, 2 arenas"
    off = probe("steady", PEFTLAB_SERVE_MALLOC="default")
    assert off["mapped"] == 0 and off["said"] == "glibc defaults ($PEFTLAB_SERVE_MALLOC)"
    users = probe("steady", MALLOC_ARENA_MAX="4")
    assert users["said"] == "glibc: mmap threshold fixed at 4 MB" and users["mapped"] == 1
