"""The C allocator of a process that hosts a model: large freed buffers are kept for reuse, not returned to the OS.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and unmaps it when
freed, so each video's float pixels (a 32-frame clip at 336 px is 43 MB), every intermediate of the processor and
the vision tower's activations page-fault anew on every request: on a 2-core VM that was a third of the vision
path's time (80 -> 53 ms per video for the embedded default, timed by hand; bench/RESULTS.md, sixth run). With
mmap off and trimming raised, freed memory stays in the heap and the next request reuses it; the process keeps its
peak size, as a GPU caching allocator does. Settings are per process and take effect for allocations made afterwards.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30  # free memory kept at the heap's top before it is given back


def retain_freed_memory() -> bool:
    """Keep large freed buffers in this process (glibc only); whether the allocator took the settings."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without mallopt): nothing to set
        return False
    done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not done:
        log.warning("the C allocator refused mallopt: large buffers are unmapped when freed")
    return done
