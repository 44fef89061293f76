"""How much of a CPU tensor's memory is mapped into this process now (Linux's pagemap)."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import torch

PAGEMAP = Path("/proc/self/pagemap")


def resident_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the pages under ``tensor`` that are present in this process's page tables
    (bit 63 of each page's pagemap entry, readable without privileges)."""
    page = mmap.PAGESIZE
    begin = tensor.data_ptr() // page
    end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page)
    with PAGEMAP.open("rb") as pagemap:
        pagemap.seek(begin * 8)
        entries = pagemap.read((end - begin) * 8)
    return page * sum(1 for (entry,) in struct.iter_unpack("<Q", entries) if entry >> 63)
