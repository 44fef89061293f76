"""Small pure logits processors: ``logits -> logits``, each checking its own arguments.

They work on one 1-D float32 tensor of vocabulary logits. A processor never changes its input
in place; masked-out entries become ``-inf`` so a later softmax gives them probability 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from sampler_core.errors import InvalidSettings

LogitsProcessor = Callable[[torch.Tensor], torch.Tensor]


def argmax(values: torch.Tensor) -> int:
    """The index of the first largest entry of a 1-D CPU tensor, as ``torch.argmax`` gives it.

    numpy's vectorised scan takes ~6 us for the 49k vocabulary here, torch's ~80 us; the step
    loop needs one or two a token.
    """
    return int(np.argmax(values.numpy()))


def top_ids(values: np.ndarray, k: int) -> np.ndarray:
    """The ids of the ``k`` largest entries of a 1-D float array, largest first, ties in id
    order: what ``torch.topk`` gives, in ~45 us for the 49k vocabulary here against its ~120.

    The largest entry of each of ``k`` disjoint slices makes ``k`` distinct entries, so the
    ``k``-th largest overall is at least the least of them: only entries at or above that floor
    can be in the top ``k``, typically a few hundred, and only those are sorted. When the floor
    lets too many through (a flat distribution, many equal values) or too few (NaN), torch's
    selection decides.
    """
    if not 0 < k <= values.size:
        raise ValueError(f"top_ids needs 0 < k <= {values.size}, got {k}")
    per = values.size // k
    floor = values[:per * k].reshape(k, per).max(axis=1).min()
    candidates = np.flatnonzero(values >= floor)
    if not k <= candidates.size <= 64 * k:
        return torch.topk(torch.from_numpy(values), k).indices.numpy()
    return candidates[np.lexsort((candidates, -values[candidates]))[:k]]


@dataclass(frozen=True)
class AllowOnly:
    """Keep only the given token ids."""

    token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise InvalidSettings("allowed_tokens resolved to no vocabulary token; nothing could "
                                  "be sampled", field="allowed_tokens", value=())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        keep = torch.full_like(logits, -math.inf)
        idx = torch.tensor(self.token_ids, dtype=torch.long)
        keep[idx] = logits[idx]
        return keep


@dataclass(frozen=True)
class Ban:
    """Remove the given token ids."""

    token_ids: tuple[int, ...]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits.clone()
        out[torch.tensor(self.token_ids, dtype=torch.long)] = -math.inf
        return out


@dataclass(frozen=True)
class Temperature:
    """Divide logits by a temperature > 0 (greedy, temperature 0, is handled by ``Greedy``)."""

    temperature: float

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise InvalidSettings(f"temperature must be > 0 here, got {self.temperature!r}",
                                  field="temperature", value=self.temperature)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        # x / 1 is x exactly: at temperature 1 skip a vocabulary pass (and a copy) per token.
        return logits if self.temperature == 1.0 else logits / self.temperature


@dataclass(frozen=True)
class Greedy:
    """Keep only the (first) highest logit: temperature 0."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return _only(logits, argmax(logits))


def _only(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """``logits`` with every entry but ``token_id``'s at -inf (built in numpy: on the cold
    caches after a decode step torch's fill and index cost ~60-110 us, numpy's ~50)."""
    raw = logits.numpy()
    out = np.full(raw.shape, -math.inf, dtype=raw.dtype)
    out[token_id] = raw[token_id]
    return torch.from_numpy(out)


@dataclass(frozen=True)
class Nucleus:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``p``."""

    p: float

    def __post_init__(self) -> None:
        if not 0.0 < self.p <= 1.0:
            raise InvalidSettings(f"nucleus_p must be in (0, 1], got {self.p!r}",
                                  field="nucleus_p", value=self.p)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.p >= 1.0:
            return logits
        probs = torch.softmax(logits, dim=-1)
        # Sorting the whole vocabulary is slow (~3.5 ms for 49k here): often the most likely
        # token alone reaches p (then fill the vocabulary and copy one logit), else select the
        # nucleus by buckets. (Read through one numpy view: right after a decode step the
        # caches are cold, and each torch call, an index included, then costs ~20-40 us.)
        values = probs.numpy()
        best = int(np.argmax(values))
        if values[best] >= self.p:
            return _only(logits, best)
        # numpy's select: torch.where on the cold caches after a step took ~250 us, this ~90.
        raw = logits.numpy()
        return torch.from_numpy(np.where(_nucleus_mask(values, self.p), raw,
                                         raw.dtype.type(-math.inf)))


def _nucleus_mask(values: np.ndarray, p: float) -> np.ndarray:
    """Which tokens the nucleus of mass ``p`` holds, as sorting the probabilities ``values``
    (a 1-D float32 array) would give, without the sort.

    Non-negative floats order like their bit patterns, so the top 14 bits (sign, exponent and
    5 mantissa bits) put every probability in one of 8,192 ordered buckets, each 1/32 of a
    power of two wide. The mass of each bucket (one bincount) says which buckets lie wholly
    inside the nucleus and which one it ends in; only that bucket's entries are sorted.
    In numpy on a view of the tensor: its passes over the vocabulary (compare, nonzero) take
    5-12 us where torch's take 25-80, and a mask spares gathering thousands of kept ids
    (~220 us a call against 280-970 for the same selection in torch ops, by nucleus size).
    """
    buckets = 1 << 13
    keys = values.view(np.int32) >> 18
    mass_from_top = np.cumsum(np.bincount(keys, weights=values, minlength=buckets)[::-1])
    # The first bucket, from the top, whose mass brings the total to p.
    reached = min(int(np.searchsorted(mass_from_top, p)), buckets - 1)
    boundary = buckets - 1 - reached
    before = float(mass_from_top[reached - 1]) if reached > 0 else 0.0
    inside = np.flatnonzero(keys == boundary)
    order = np.argsort(-values[inside], kind="stable")
    ranked = values[inside][order].astype(np.float64)
    # In the boundary bucket, keep a token while the mass before it is below p (so its first
    # token always stays: ``before`` is below p by the choice of the bucket).
    mask = keys > boundary
    mask[inside[order[(before + np.cumsum(ranked) - ranked) < p]]] = True
    return mask


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token id drawn from ``probs`` (non-negative, summing to ~1) with one uniform number
    from ``generator``, by inverting the cumulative distribution.

    The same law as ``torch.multinomial(probs, 1)``, which spends ~1 ms on a 49k vocabulary
    (a sixth of a decode step here) against ~60 us for a cumulative sum and a binary search.
    The sum runs in float64, so a token's share of [0, total) is its probability to ~1e-16;
    tokens of probability 0 own an empty interval and are never drawn.
    """
    if probs.dim() != 1 or probs.numel() == 0:
        raise ValueError(f"draw needs a 1-D, non-empty probability vector, got shape "
                         f"{tuple(probs.shape)}")
    # The sum in torch, widening as it goes (numpy's float32-to-float64 cumsum is slower, and
    # a widened copy first costs a pass more), the rest on numpy views (fewer calls: on the
    # cold caches after a decode step each costs tens of microseconds).
    cumulative = probs.cumsum(0, dtype=torch.float64).numpy()
    total = float(cumulative[-1])
    if not total > 0.0 or not math.isfinite(total):
        raise ValueError(f"draw needs probabilities with a positive, finite sum, got {total}")
    target = float(torch.rand((), generator=generator, dtype=torch.float64)) * total
    # target < total, but guard the rounding at the very top: step back to a token with mass.
    index = min(int(np.searchsorted(cumulative, target, side="right")), cumulative.size - 1)
    values = probs.contiguous().numpy()
    while values[index] <= 0.0:
        index -= 1
    return index


def chain(processors: Sequence[LogitsProcessor]) -> LogitsProcessor:
    """Compose processors left to right."""

    def run(logits: torch.Tensor) -> torch.Tensor:
        for processor in processors:
            logits = processor(logits)
        return logits

    return run


def build_chain(*, allowed: Sequence[int], banned: Sequence[int], temperature: float,
                nucleus_p: float) -> LogitsProcessor:
    """The sampling chain for one run: masks, then temperature (or greedy), then nucleus."""
    steps: list[LogitsProcessor] = []
    if allowed:
        steps.append(AllowOnly(tuple(allowed)))
    if banned:
        steps.append(Ban(tuple(banned)))
    if temperature == 0.0:
        steps.append(Greedy())
    else:
        steps.append(Temperature(temperature))
        steps.append(Nucleus(nucleus_p))
    return chain(steps)
