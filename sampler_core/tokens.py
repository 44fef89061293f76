"""Values that leave the engine: tokens, their alternatives, attention, and a run's summary.

Plain frozen dataclasses; no tensors and no protobufs. ``Token`` has the fields of the xAI
SDK's ``Token`` (token_id, token_str, prob, top_k, attn_weights, token_type) plus our
extensions, which default to ``None`` so a token built from an old server's message is valid.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class TokenType(enum.IntEnum):
    """Who a token came from, as on the wire."""

    UNKNOWN = 0
    USER = 1
    MODEL = 2


@dataclass(frozen=True)
class AttentionDetail:
    """Full attention of one query token: ``weights[layer, head, context_position]``.

    Each (layer, head) row sums to 1 over the context.
    """

    weights: np.ndarray = field(repr=False)

    @property
    def num_layers(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.weights.shape[1])

    def row(self, layer: int | None = None, head: int | None = None) -> np.ndarray:
        """One attention row over the context: a layer/head, or the mean over those left None."""
        w = self.weights
        w = w.mean(axis=0) if layer is None else w[layer]
        w = w.mean(axis=0) if head is None else w[head]
        return w


@dataclass(frozen=True)
class Token:
    """One token of a prompt or a completion.

    ``prob`` is the probability the token was sampled with (after masks, temperature and
    nucleus; 0 for prompt tokens from ``tokenize``). Extensions: ``raw_prob`` and ``logprob``
    are the model's own (softmax of the logits at temperature 1, no masks); ``rank`` is the
    1-based rank of this token in that raw distribution; ``entropy`` is the raw distribution's
    entropy in nats; ``position`` is the index in the context; ``attention`` holds per-layer,
    per-head rows when full attention was asked for.
    """

    token_id: int
    token_str: str
    prob: float
    top_k: tuple["Token", ...] = ()
    attn_weights: tuple[float, ...] = ()
    token_type: TokenType = TokenType.MODEL
    raw_prob: float | None = None
    logprob: float | None = None
    rank: int | None = None
    entropy: float | None = None
    position: int | None = None
    attention: AttentionDetail | None = field(default=None, repr=False, compare=False)

    @property
    def surprisal_bits(self) -> float | None:
        """-log2 of the raw probability, or None when unknown."""
        if self.logprob is None:
            return None
        return -self.logprob / math.log(2)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (full attention omitted)."""
        return {
            "token_id": self.token_id,
            "token_str": self.token_str,
            "prob": self.prob,
            "top_k": [t.to_dict() for t in self.top_k],
            "attn_weights": list(self.attn_weights),
            "token_type": int(self.token_type),
            "raw_prob": self.raw_prob,
            "logprob": self.logprob,
            "rank": self.rank,
            "entropy": self.entropy,
            "position": self.position,
        }


class FinishReason(str, enum.Enum):
    """Why a generation ended."""

    MAX_LEN = "max_len"
    STOP_TOKEN = "stop_token"
    STOP_STRING = "stop_string"
    EOS = "eos"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class RunSummary:
    """The last event of a generation: how it ended and what the engine noticed on the way.

    ``notes`` holds things the user should see, for example a stop token that is not one
    vocabulary token and was therefore ignored. ``prefill`` is how the prompt's forward
    actually computed (``float32``, exact, or an inexact mode asked for by name); empty when
    the engine did not say (an older server). ``prefill_reused``: some of the prompt's forward
    was not run but copied from an earlier prefill, bit for bit what running it gives (why the
    first token came sooner): ``prefill_reused_tokens`` positions of it, the whole prompt when
    an earlier run had the same one, else the first tokens it shares with a kept prompt (0 from
    an older server).
    """

    model_name: str
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: FinishReason
    stop_match: str | None = None
    notes: tuple[str, ...] = ()
    prefill: str = ""
    prefill_reused: bool = False
    prefill_reused_tokens: int = 0
