"""The C allocator's policy while training: keep freed memory for the next step.

By default glibc hands large freed blocks back to the system: blocks from 128 KB up get their own
mapping (the threshold then adapts to what was freed, up to 32 MB), and a free top of the heap
larger than twice that threshold is trimmed. A training step frees its activations at the end of
the backward pass and allocates them again in the next forward pass, so on the default model
every step page-faulted them back in: 700 to 3,600 page faults and 1 to 7 ms of system time per
chat-tuning step. With blocks up to 32 MB taken from the heap and freed memory kept (trimmed only
above 1 GB), those faults are gone and bf16 steps are 5-15% faster (bench/README.md). Float32
steps did not fault (their buffers come in fewer sizes, which glibc's adaptive threshold covers)
and ran 4-8% slower with the policy, so only low-precision training sets it. The price: the
process keeps the memory of its largest step until it exits, which training reaches anyway.

Only glibc (Linux) has these settings; elsewhere :func:`keep_freed_memory` does nothing.
"""

from __future__ import annotations

import ctypes
import sys

#: ``mallopt`` parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap, so they are reused after a free (glibc's largest threshold).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of the heap is returned to the system only beyond this.
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set the policy for this process (once; later calls only report). True when it is in force."""
    global _applied
    if _applied is None:
        _applied = _set_policy()
    return _applied


def _set_policy() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
