"""Tensors of a safetensors file read into one block of memory on 2 MB pages.

A decode step streams every packed weight, ~97 MB for the default model. On 4 KB pages that is
~24,000 pages a step, each a TLB miss and a fresh start for the hardware prefetcher; on 2 MB
pages (Linux transparent huge pages, asked for with ``madvise``) about 50. Measured with decode
steps alternating between two copies of the weights in one process: the C step 1-1.5% faster.
The file is read straight into the block (no tensor per weight first), so the process's peak
memory stays where it was.

``release_pages`` gives back the pages of weights that stay mapped from their file but are no
longer read (the float32 weights the packed blocks stand in for).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

HUGE_PAGE = 2 << 20
#: Each tensor starts on a cache line.
ALIGN = 64
#: madvise's advice to reclaim pages now (Linux 5.4+): their contents stay, and a later read
#: faults them in again (from the file, or from swap for anonymous memory).
MADV_PAGEOUT = 21
_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16,
           "F32": torch.float32, "I32": torch.int32, "I64": torch.int64}


def huge_page_memory(nbytes: int) -> torch.Tensor:
    """``nbytes`` of zeroed uint8 memory starting on a 2 MB boundary, its whole 2 MB pages
    on huge pages where the kernel allows it. The block is mapped with 2 MB to spare (for
    the alignment); pages never touched never become resident."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # not a POSIX system: ordinary memory
        return torch.zeros(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
    start = -whole.data_ptr() % HUGE_PAGE
    whole_pages = nbytes // HUGE_PAGE * HUGE_PAGE  # a partly used huge page would count whole
    if whole_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region.madvise(mmap.MADV_HUGEPAGE, start, whole_pages)
        except OSError:
            pass  # no transparent huge pages here: 4 KB pages, as any allocation
    return whole[start:start + nbytes]


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (each tensor's dtype, shape and data offsets, and
    ``__metadata__``) and where its data starts."""
    with open(path, "rb") as file:
        header_bytes = int.from_bytes(file.read(8), "little")
        return json.loads(file.read(header_bytes)), 8 + header_bytes


def read_into_block(path: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors file, laid out in the given order in one
    ``huge_page_memory`` block. Raises KeyError for a name the file lacks and ValueError for
    a file cut short or of an unknown dtype."""
    header, data_start = read_header(path)
    with open(path, "rb") as file:
        layout, size = [], 0
        for name in names:
            entry = header[name]
            if entry["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, not one "
                                 f"of {', '.join(_DTYPES)}")
            begin, end = entry["data_offsets"]
            layout.append((name, entry, size, begin, end - begin))
            size += -(-(end - begin) // ALIGN) * ALIGN
        block = huge_page_memory(size)
        tensors = {}
        for name, entry, at, begin, length in layout:
            into = block[at:at + length]
            file.seek(data_start + begin)
            if file.readinto(into.numpy()) != length:
                raise ValueError(f"{path} ends inside tensor {name}")
            tensors[name] = into.view(_DTYPES[entry["dtype"]]).view(entry["shape"])
    return tensors


def release_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Ask the kernel to reclaim the resident pages wholly inside each CPU tensor's bytes
    (``MADV_PAGEOUT``), for weights this process keeps but will not read: nothing is lost, a
    later read faults a page in again. Why: a tensor mapped from a file (transformers maps
    safetensors) counts in the process's memory for every page once read, and on Linux 6.x a
    read maps the whole page-cache folio around it (up to 2 MB). Returns the bytes advised; 0
    where the C library or the kernel lacks it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    advised = 0
    for tensor in tensors:
        if tensor.device.type != "cpu":
            continue
        begin = tensor.data_ptr()
        start = -(-begin // page) * page  # whole pages only: a neighbour's page stays
        end = (begin + tensor.numel() * tensor.element_size()) // page * page
        if end > start:
            if madvise(start, end - start, MADV_PAGEOUT) != 0:
                return advised  # EINVAL: a kernel without it
            advised += end - start
    return advised
