"""Keep the memory a long prefill frees for its next layer, instead of faulting it in again.

A 2,000-token prefill allocates about 110 MB of temporaries a layer (norms, products, the
MLP's 24.6 MB gate/up rows), frees them, and allocates the same again for the next layer.
glibc's malloc gives the top of its heap back to the system whenever the free space there
passes its trim threshold (by default twice the largest block it has served by ``mmap``, so
about 50 MB here), and blocks past its ``mmap`` threshold are mapped and unmapped each time;
either way the next layer's temporaries fault their pages in again, each one zeroed by the
kernel. Measured here: 8,000 to 120,000 page faults a 2,000-token prefill (30 to 470 MB),
about 2 microseconds each (``PROMPT_IDE_PREFILL=fixed16`` with the trim threshold set alone,
which turns glibc's adaptive ``mmap`` threshold off: 930,000 faults and twice the time).

``keep_freed_memory()`` fixes both thresholds: blocks up to ``MMAP_THRESHOLD`` come from the
heap, and up to ``TRIM_THRESHOLD`` of free heap stays mapped for reuse. The cost is that
much memory kept after a long prompt (not a higher peak: the prefill reached it). Called
once, after the model has loaded (so the load's transient buffers are laid out as glibc's
defaults lay them). A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

#: Blocks up to this size come from the heap (glibc's adaptive threshold stops at 32 MB;
#: one run's key or value cache for 2,000 positions is 48 MB).
MMAP_THRESHOLD = 64 << 20
#: Free heap up to this size stays mapped.
TRIM_THRESHOLD = 256 << 20
# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_done: bool | None = None
_lock = threading.Lock()


def keep_freed_memory() -> bool:
    """Set glibc's ``mmap`` and trim thresholds (once a process); whether they are set."""
    global _done
    with _lock:
        if _done is None:
            _done = False
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):
                return False  # not glibc: its allocator, its defaults
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                         and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        return _done
