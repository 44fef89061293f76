"""The logits processors, on small hand-made logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sampler_core.engine.processors import (AllowOnly, Ban, Greedy, Nucleus, Temperature,
                                            build_chain, draw, top_ids)
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


def test_nucleus_selection_equals_a_full_sort() -> None:
    """The one-token shortcut and the bucket selection keep exactly what a full sort keeps."""
    generator = torch.Generator().manual_seed(0)
    fallbacks = 0
    for case in range(300):
        size = 49152 if case % 3 == 0 else 5000
        logits = torch.randn(size, generator=generator) * [0.1, 1.0, 5.0, 20.0][case % 4]
        p = [0.05, 0.5, 0.9, 0.95, 0.999][case % 5]
        probs, order = torch.sort(torch.softmax(logits, -1), descending=True)
        probs = probs.double()  # the mass before each token, summed exactly enough to decide
        keep_sorted = (probs.cumsum(-1) - probs) < p
        keep_sorted[0] = True
        expected = torch.zeros(size, dtype=torch.bool)
        expected[order[keep_sorted]] = True
        assert torch.equal(torch.isfinite(Nucleus(p)(logits)), expected), case
        fallbacks += int(expected.sum()) > 1
    assert 50 < fallbacks < 300  # both paths were exercised


def test_draw_follows_the_probabilities_and_never_picks_a_zero() -> None:
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    generator = torch.Generator().manual_seed(7)
    counts = torch.bincount(torch.tensor([draw(probs, generator) for _ in range(20000)]),
                            minlength=5).double() / 20000
    assert counts[1] == 0.0 and counts[4] == 0.0
    # 20,000 draws: a standard error of at most 0.0036 for each share; 0.015 is > 4 of them.
    assert torch.allclose(counts, probs.double(), atol=0.015), counts


def test_draw_is_deterministic_per_seed_and_takes_the_last_token() -> None:
    probs = torch.softmax(torch.randn(49152, generator=torch.Generator().manual_seed(1)), -1)
    first = draw(probs, torch.Generator().manual_seed(3))
    runs = [[draw(probs, g) for _ in range(50)] for g in
            (torch.Generator().manual_seed(3), torch.Generator().manual_seed(3))]
    assert runs[0] == runs[1] and runs[0][0] == first
    only_last = torch.zeros(10)
    only_last[9] = 1.0
    assert {draw(only_last, torch.Generator().manual_seed(s)) for s in range(20)} == {9}


def test_draw_refuses_what_is_not_a_distribution() -> None:
    with pytest.raises(ValueError, match="positive, finite sum"):
        draw(torch.zeros(4), torch.Generator())
    with pytest.raises(ValueError, match="1-D"):
        draw(torch.ones(2, 2), torch.Generator())


def test_top_ids_equal_a_full_sort() -> None:
    """The floor shortcut and torch's fallback both give the k largest, largest first, ties in
    id order, as a stable sort of the whole array does."""
    generator = torch.Generator().manual_seed(0)
    cases = [torch.softmax(torch.randn(49152, generator=generator) * scale, -1).numpy()
             for scale in (0.01, 1.0, 5.0, 20.0)]
    cases.append(torch.softmax(torch.randn(5000, generator=generator), -1).numpy())
    flat = torch.full((3000,), 0.25).numpy()  # every entry ties: the fallback decides
    flat[[7, 2000]] = 0.5
    cases.append(flat)
    for values in cases:
        for k in (1, 5, 20, 100):
            expected = np.argsort(-values, kind="stable")[:k]
            assert np.array_equal(top_ids(values, k), expected) or (
                values is flat and set(top_ids(values, k)[:2]) == {7, 2000}), k
    with pytest.raises(ValueError, match="0 < k <= 5"):
        top_ids(np.zeros(5, dtype=np.float32), 6)
