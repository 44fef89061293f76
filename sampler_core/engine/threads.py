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

``kernel_on_torch_threads()`` is the other way round, for a forward that mixes torch's
parallel ops with the C kernel's jobs: the kernel's jobs run on torch's OpenMP threads.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from functools import cache
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


@cache
def _one_openmp_runtime() -> bool:
    """Whether this process has mapped exactly one OpenMP runtime (torch's libgomp, which the
    kernel built with OpenMP then shares) and no other (Intel's, LLVM's)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    runtimes = {line.split()[-1] for line in maps.splitlines()
                if any(name in line for name in ("libgomp", "libiomp", "libomp"))}
    return len(runtimes) == 1 and "libgomp" in next(iter(runtimes))


@contextmanager
def kernel_on_torch_threads(kernel: Any) -> Iterator[None]:
    """Run the C kernel's jobs on torch's OpenMP threads for the body (``pool_use_openmp``),
    where the kernel was built with OpenMP and shares torch's runtime; else as they run.

    Why: after each of its parallel ops torch's OpenMP threads spin for a while, waiting for
    the next, on the cores the kernel's own workers need; in a float32 prefill, which
    alternates oneDNN's products with the kernel's attention, that made the attention ~25%
    slower than alone. On torch's threads the spinning threads take the kernel's work."""
    if not (_USES_OPENMP and getattr(kernel, "pool_use_openmp", None) is not None
            and _one_openmp_runtime() and kernel.pool_use_openmp(1)):
        yield
        return
    try:
        yield
    finally:
        kernel.pool_use_openmp(0)
