"""glibc heap control for the services: give freed memory back to the OS, few malloc arenas.

Why: a learner step frees ~1 GB of activations and gradients, a weight sync frees a whole
received version (0.54 GB for the demo's model) and a teacher batch its logits; glibc keeps
most of that in its heap (freed chunks below the top of the heap, and one heap per thread
that ever allocated: gRPC, torch and uvicorn threads), so each process's RSS only grows.
`limit_arenas` (mallopt M_ARENA_MAX, what `MALLOC_ARENA_MAX` sets) at start-up caps the
per-thread heaps; `trim` (malloc_trim(0)) after each such phase returns the free pages.
A trim that returns ~1.4 GB took 0.4 s on the 2-core dev box (0.1 ms with nothing to
return); the phases it follows take seconds to minutes. Measured on the demo in
docs/BENCHMARKS.md ("Memory of the CPU demo").

On a libc without these calls (musl, macOS) both are no-ops that return False.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

__all__ = ["limit_arenas", "rss_mib", "trim"]

_M_ARENA_MAX = -8  # mallopt parameter number, <malloc.h>


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not (hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt")):
        return None
    lib.malloc_trim.argtypes = [ctypes.c_size_t]
    lib.malloc_trim.restype = ctypes.c_int
    lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.mallopt.restype = ctypes.c_int
    return lib


def limit_arenas(n: int = 2) -> bool:
    """Cap glibc's malloc arenas at `n` (call before threads start); True when applied."""
    lib = _libc()
    return bool(lib is not None and lib.mallopt(_M_ARENA_MAX, int(n)) == 1)


def trim() -> bool:
    """Return free heap pages to the OS (malloc_trim(0)); True when memory was released."""
    lib = _libc()
    return bool(lib is not None and lib.malloc_trim(0) == 1)


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status (VmRSS, VmHWM);
    (0, 0) where /proc is not there."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0, 0.0
    got = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            got[key] = int(value.split()[0]) / 1024
    return got.get("VmRSS", 0.0), got.get("VmHWM", 0.0)
