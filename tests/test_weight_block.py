"""weight_block.py: a safetensors file's tensors read into one block on 2 MB pages."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sampler_core.engine.weight_block import (ALIGN, HUGE_PAGE, huge_page_memory, read_header,
                                              read_into_block)


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
