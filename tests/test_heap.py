"""heap.py: memory a long prefill frees stays mapped for its next layer, on glibc."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from sampler_core.engine import heap

#: Page faults while a 40 MB block is written, after a 60 MB one was allocated and freed
#: (a block of the same size may not fit the freed space: an aligned allocation asks for a
#: little more), in a fresh interpreter (a shared one's heap holds whatever ran before).
PROBE = """
import resource, sys, torch
from sampler_core.engine.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults(floats):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(floats)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults(15 * 2**20)
print(faults(10 * 2**20))
"""


def _probe(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_block_is_reused_without_faulting_its_pages_again() -> None:
    """Blocks past glibc's own adaptive mmap threshold (at most 32 MB) are mapped and
    unmapped each time: 40 MB of fresh 4 KB pages fault ~10,240 times. With the thresholds
    set they come from the heap, and a freed block's pages serve the next one."""
    assert 40 * 2**20 < 60 * 2**20 < heap.MMAP_THRESHOLD
    assert _probe("default") > 10_000
    assert _probe("keep") < 500


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_cpu_engine_sets_the_thresholds(engine) -> None:
    if engine.device.type != "cpu":
        pytest.skip("a GPU engine leaves glibc's defaults")
    assert heap._done is True
