"""weight_block.py: a safetensors file's tensors read into one block on 2 MB pages."""

from __future__ import annotations

import json
import mmap

import pytest
import torch
from pages import PAGEMAP, resident_bytes
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sampler_core.engine.weight_block import (ALIGN, HUGE_PAGE, huge_page_memory, read_header,
                                              read_into_block, release_pages)


@pytest.fixture()
def saved(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {"b.quants": torch.randint(0, 256, (37, 11), dtype=torch.uint8, generator=generator),
               "a.scales": torch.randn(37, 3, generator=generator).half(),
               "c.table": torch.randn(5, generator=generator)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"shapes": json.dumps({"b": [0, 37, 22]})})
    return path


def test_tensors_come_back_equal_in_the_given_order_on_aligned_starts(saved) -> None:
    order = ["b.quants", "c.table", "a.scales"]
    tensors = read_into_block(saved, order)
    reference = load_file(str(saved))
    assert list(tensors) == order
    for name in order:
        assert tensors[name].dtype == reference[name].dtype
        assert torch.equal(tensors[name], reference[name])
    starts = [tensors[name].data_ptr() for name in order]
    assert starts[0] % HUGE_PAGE == 0  # the block starts on a 2 MB boundary
    assert all(start % ALIGN == 0 for start in starts)
    assert starts == sorted(starts)  # laid out in the order asked for
    header, data_start = read_header(saved)
    assert json.loads(header["__metadata__"]["shapes"]) == {"b": [0, 37, 22]}
    assert data_start == 8 + int.from_bytes(saved.read_bytes()[:8], "little")


def test_a_missing_name_or_a_cut_file_is_refused(saved, tmp_path) -> None:
    with pytest.raises(KeyError, match="nope"):
        read_into_block(saved, ["b.quants", "nope"])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(saved.read_bytes()[:-8])
    with pytest.raises(ValueError, match="ends inside tensor"):
        read_into_block(cut, ["b.quants", "a.scales", "c.table"])


def test_huge_page_memory_is_zeroed_writable_and_aligned() -> None:
    block = huge_page_memory(3 * HUGE_PAGE + 100)
    assert block.numel() == 3 * HUGE_PAGE + 100 and block.data_ptr() % HUGE_PAGE == 0
    assert int(block.sum()) == 0
    block[-1] = 7
    assert int(block[-1]) == 7


@pytest.mark.skipif(not PAGEMAP.exists(), reason="Linux only (reads /proc/self/pagemap)")
def test_release_pages_gives_back_a_mapped_tensors_pages_and_keeps_its_values(tmp_path) -> None:
    values = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))  # 4 MB
    save_file({"w": values}, str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as file:
        mapped = file.get_tensor("w")  # mapped from the file, as transformers loads weights
    assert torch.equal(mapped, values)  # reads every page
    size = mapped.numel() * mapped.element_size()
    assert resident_bytes(mapped) >= size * 0.9
    assert release_pages([mapped, torch.empty(0)]) >= size - 2 * mmap.PAGESIZE
    assert resident_bytes(mapped) <= size * 0.1
    assert torch.equal(mapped, values)  # faulted in again, unchanged
