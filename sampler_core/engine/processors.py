"""Small pure logits processors: ``logits -> logits``, each checking its own arguments.

They work on one 1-D float32 tensor of vocabulary logits. A processor never changes its input
in place; masked-out entries become ``-inf`` so a later softmax gives them probability 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from sampler_core.errors import InvalidSettings

LogitsProcessor = Callable[[torch.Tensor], torch.Tensor]


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
        return logits / self.temperature


@dataclass(frozen=True)
class Greedy:
    """Keep only the (first) highest logit: temperature 0."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, -math.inf)
        best = int(torch.argmax(logits))
        out[best] = logits[best]
        return out


@dataclass(frozen=True)
class Nucleus:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``p``."""

    p: float
    HEAD = 256  # candidates examined before falling back to a full sort

    def __post_init__(self) -> None:
        if not 0.0 < self.p <= 1.0:
            raise InvalidSettings(f"nucleus_p must be in (0, 1], got {self.p!r}",
                                  field="nucleus_p", value=self.p)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.p >= 1.0:
            return logits
        probs = torch.softmax(logits, dim=-1)
        # Sorting the whole vocabulary every step is the slow part; the nucleus nearly always
        # lies within the top few hundred, so look there first and sort everything only if not.
        head = min(self.HEAD, probs.shape[-1])
        top, order = torch.topk(probs, head)
        cumulative = top.cumsum(dim=-1)
        if float(cumulative[-1]) < self.p and head < probs.shape[-1]:
            top, order = torch.sort(probs, descending=True)
            cumulative = top.cumsum(dim=-1)
        # Keep a token while the mass before it is below p; the first always stays.
        keep_sorted = (cumulative - top) < self.p
        keep_sorted[0] = True
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[keep_sorted]] = True
        return logits.masked_fill(~keep, -math.inf)


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
