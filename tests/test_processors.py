"""The logits processors, on small hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from sampler_core.engine.processors import (AllowOnly, Ban, Greedy, Nucleus, Temperature,
                                            build_chain)
from sampler_core.errors import InvalidSettings

LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0])


def test_allow_only_keeps_the_given_ids() -> None:
    out = AllowOnly((1, 3))(LOGITS)
    assert out[1] == 1.0 and out[3] == -1.0 and torch.isinf(out[[0, 2, 4]]).all()
    assert LOGITS[0] == 2.0  # input untouched


def test_ban_removes_the_given_ids() -> None:
    out = Ban((4,))(LOGITS)
    assert torch.isinf(out[4]) and out[0] == 2.0


def test_temperature_scales() -> None:
    assert torch.equal(Temperature(2.0)(LOGITS), LOGITS / 2)
    with pytest.raises(InvalidSettings, match=r"temperature must be > 0 here, got 0.0"):
        Temperature(0.0)


def test_greedy_keeps_the_argmax() -> None:
    probs = torch.softmax(Greedy()(LOGITS), -1)
    assert probs[4] == 1.0 and probs.sum() == 1.0


def test_nucleus_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.softmax(LOGITS, -1)  # order: 4, 0, 1, 2, 3
    p_top2 = float(probs[4] + probs[0])
    kept = torch.isfinite(Nucleus(p_top2 - 1e-3)(LOGITS))
    assert kept.tolist() == [True, False, False, False, True]
    kept = torch.isfinite(Nucleus(p_top2 + 1e-3)(LOGITS))
    assert kept.tolist() == [True, True, False, False, True]
    assert torch.isfinite(Nucleus(1e-9)(LOGITS)).sum() == 1
    assert torch.equal(Nucleus(1.0)(LOGITS), LOGITS)
    with pytest.raises(InvalidSettings, match=r"nucleus_p must be in \(0, 1\], got 1.5"):
        Nucleus(1.5)


def test_chain_gives_a_distribution() -> None:
    chain = build_chain(allowed=(), banned=(4,), temperature=0.7, nucleus_p=0.9)
    probs = torch.softmax(chain(LOGITS), -1)
    assert math.isclose(float(probs.sum()), 1.0, abs_tol=1e-6) and probs[4] == 0.0


def test_allow_only_needs_ids() -> None:
    with pytest.raises(InvalidSettings, match="allowed_tokens resolved to no vocabulary token"):
        AllowOnly(())


def test_nucleus_shortcut_equals_a_full_sort() -> None:
    """The top-256 shortcut keeps exactly the set a full sort keeps, with and without fallback."""
    generator = torch.Generator().manual_seed(0)
    fallbacks = 0
    for case in range(120):
        logits = torch.randn(5000, generator=generator) * [0.1, 1.0, 5.0, 20.0][case % 4]
        p = [0.05, 0.5, 0.9, 0.95, 0.999][case % 5]
        probs, order = torch.sort(torch.softmax(logits, -1), descending=True)
        keep_sorted = (probs.cumsum(-1) - probs) < p
        keep_sorted[0] = True
        expected = torch.zeros(5000, dtype=torch.bool)
        expected[order[keep_sorted]] = True
        assert torch.equal(torch.isfinite(Nucleus(p)(logits)), expected), case
        fallbacks += int(expected.sum()) > Nucleus.HEAD
    assert fallbacks > 0  # the full-sort path was exercised too
