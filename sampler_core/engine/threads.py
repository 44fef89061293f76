"""Per-token vocabulary math on the calling thread alone.

After each forward pass the step loop does ~15 passes over the vocabulary's 49,152 floats
(processors, softmax, top-k, entropy, rank): ~200 KB each, microseconds of work. torch splits
each such pass over its OpenMP threads and waits at a barrier for all of them; on a shared,
oversubscribed machine a thread that is not running stalls that barrier for a scheduler time
slice, which measured here made the loop several times slower than the forward itself.

``one_thread()`` sets the OpenMP thread count of the *calling* thread only (an OpenMP
per-thread setting; torch's global setting, MKL's and other threads are untouched), so the
model's forward keeps all threads and the small passes run serially, with identical results
(torch's reductions are the same for any thread count).
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

_omp: Any = None
_USES_OPENMP = "OpenMP" in torch.__config__.parallel_info()


def _libgomp() -> Any:
    """The OpenMP runtime torch runs on (its bundled libgomp), or False when there is none."""
    global _omp
    if _omp is None:
        _omp = False
        for candidate in (Path(torch.__file__).parent / "lib" / "libgomp.so.1", "libgomp.so.1"):
            try:
                lib = ctypes.CDLL(str(candidate))
                lib.omp_get_max_threads.restype = ctypes.c_int
                lib.omp_set_num_threads.argtypes = [ctypes.c_int]
                _omp = lib
                break
            except (OSError, AttributeError):
                continue
    return _omp


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the body with torch's intra-op parallelism off for the calling thread only."""
    lib = _libgomp()
    if not _USES_OPENMP or not lib:
        yield
        return
    before = lib.omp_get_max_threads()
    lib.omp_set_num_threads(1)
    try:
        yield
    finally:
        lib.omp_set_num_threads(before)
