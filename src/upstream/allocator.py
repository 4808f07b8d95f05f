"""Keep freed memory in the process instead of returning it to the OS (glibc's malloc).

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold
(128 KiB to start with) with a fresh ``mmap`` and unmaps it again when it is freed, and trims
the top of the heap whenever more than its trim threshold is free there. A training step
allocates and frees its activations and gradients anew every step, so each step touches
freshly mapped pages and takes a page fault for every 4 KiB of them: 6,000-16,000 faults a step
for ``upstream-tiny-rn`` at batch 64 on 32 px, about a fifth of the step's time (measured: 42 ms
→ 33.5 ms a step with the settings below, ``benchmarks/allocator.py``; upstream's whole
pre-training step, loader included, ~1.1× faster).

:func:`keep_freed_memory` raises both thresholds, so that freed blocks stay in the heap for
the next step. The price is that the process keeps its peak memory (a training process
reaches it every step anyway). This is what PyTorch's CPU performance guide gets by
preloading jemalloc or tcmalloc, with nothing to install. It is process-wide, lasts for the
process (DataLoader workers forked later inherit it), and does nothing where the C library
is not glibc (musl, macOS): there the allocator behaves as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's ceiling for the mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``): blocks
#: larger than this are still mapped and unmapped each time.
MMAP_THRESHOLD = 32 << 20
#: Free memory at the heap's top kept rather than given back.
TRIM_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (once per process); whether they are in effect."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        log.debug("not glibc: malloc keeps its defaults")
        return False
    gnu_get_libc_version.restype = ctypes.c_char_p
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not ok:
        log.warning("glibc %s refused the malloc thresholds; training page-faults more",
                    gnu_get_libc_version().decode())
    return ok
