"""Prefills kept for reuse: a run whose prompt was prefilled before (the same token ids, the
same prefill mode) starts from a copy of what that prefill left, bit for bit what running it
again would give, so its first token comes at once.

Why: a prompt workbench re-runs one prompt again and again (Compare seeds runs it once per
seed; the playground runs it again after each change of settings), and for a long prompt the
prefill is most of the wait: ~4 s for 2,000 tokens on a 2-core CPU, against ~7 ms a token
after it.

A prompt that starts like a kept one (the same first tokens, the same way of prefilling)
reuses the positions they share and prefills only its own tail, where the engine can run that
tail bit for bit as a prefill of the whole prompt would
(``FastLlama.tails_match_whole_prefills``: where each step of a long prefill gives a
position the same result whatever rows it runs with): a seeded run never depends on what ran
before it. Editing the end of a long few-shot prompt then costs a prefill of the edit, not of
the prompt.

An entry keeps the prompt's positions of the keys and values (float32: 46 KB a token for
SmolLM2-135M, ~92 MB for 2,000 tokens), the last position's logits and, when the run asked
for them, its attention weights. A prompt that reused a kept head keeps only its own tail's
positions and shares the head's (``KeptPositions``) with the entry it came from, so ten
edits of the end of a 2,000-token prompt hold ~92 MB and ten tails, not ten copies. Entries
leave least recently used first, within a byte budget that counts each shared run of
positions once: ``$PROMPT_IDE_PROMPT_CACHE_MB`` (default 256; 0 keeps nothing). Prompts under
``MIN_TOKENS`` are not kept: they prefill in about a tenth of a second, less than keeping them
in memory is worth.

Runs of one new prompt that start together (Compare seeds before the playground ran it) do not
all prefill it: the first claims the prefill (``prefilling``), the others wait for it and then
start from what it kept.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Hashable, Iterator, Sequence

import torch

#: Prompts shorter than this are prefilled every time.
MIN_TOKENS = 64
#: The environment variable that sets the budget, in MB (10^6 bytes).
BUDGET_ENV = "PROMPT_IDE_PROMPT_CACHE_MB"
DEFAULT_BUDGET_MB = 256


def budget_from_env() -> int:
    """The budget in bytes from ``$PROMPT_IDE_PROMPT_CACHE_MB`` (unset or empty: the default);
    anything but a whole number of MB >= 0 is refused, naming the variable and the value."""
    text = os.environ.get(BUDGET_ENV, "").strip()
    if not text:
        return DEFAULT_BUDGET_MB * 10**6
    try:
        megabytes = int(text)
    except ValueError:
        megabytes = -1
    if megabytes < 0:
        raise ValueError(f"{BUDGET_ENV} must be a whole number of MB >= 0 (0 turns prompt "
                         f"reuse off), got {text!r}")
    return megabytes * 10**6


@dataclass(frozen=True, eq=False)
class KeptPositions:
    """The keys and values of prompt positions ``start`` onward, read-only once kept; entries
    whose prompts share a head hold the same one (compared by identity)."""

    start: int
    keys: torch.Tensor  # [layer, kv_head, positions, head_dim]
    values: torch.Tensor  # the same shape

    @property
    def end(self) -> int:
        """One past the last position held."""
        return self.start + self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return 2 * self.keys.numel() * self.keys.element_size()


@dataclass(frozen=True)
class KeptPrefill:
    """What one prompt's prefill left: read-only once kept (restores copy out of it). Its
    positions come from ``spans`` in order, each up to where the next starts (the last up to
    ``length``): a head shared with the entry it reused, then its own."""

    spans: tuple[KeptPositions, ...]
    length: int  # the prompt's positions
    logits: torch.Tensor  # the last position's, [1, vocab]
    rows: torch.Tensor | None  # the last position's attention, [layer, head, length], if asked

    def __post_init__(self) -> None:
        starts = [span.start for span in self.spans] + [self.length]
        if not self.spans or starts[0] != 0 or any(
                not a < b <= span.end for a, b, span in zip(starts, starts[1:], self.spans)):
            raise ValueError(f"spans must cover positions 0 .. {self.length - 1} in order, "
                             f"got starts {starts[:-1]} and ends "
                             f"{[span.end for span in self.spans]}")

    def head(self, length: int) -> tuple[KeptPositions, ...]:
        """The spans that hold positions 0 .. length - 1 (the last may hold more)."""
        return tuple(span for span in self.spans if span.start < length)

    def restore(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Copy positions 0 .. length - 1 into a cache's ``keys`` and ``values`` ([layer,
        kv_head, capacity, head_dim])."""
        ends = [span.start for span in self.spans[1:]] + [self.length]
        for span, end in zip(self.spans, ends):
            end = min(end, length)
            if end <= span.start:
                break
            keys[:, :, span.start:end].copy_(span.keys[:, :, :end - span.start])
            values[:, :, span.start:end].copy_(span.values[:, :, :end - span.start])

    @property
    def own_nbytes(self) -> int:
        """Bytes held besides the spans: the logits and the attention."""
        tensors = [self.logits] + ([self.rows] if self.rows is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def nbytes(self) -> int:
        """Bytes held, shared spans included."""
        return self.own_nbytes + sum(span.nbytes for span in self.spans)


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many first tokens ``a`` and ``b`` have in common."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    """Kept prefills by key, least recently used first out within ``max_bytes``. Safe to share
    between threads. The engine's keys are ``(prompt token ids, how it prefilled)``, which
    ``longest_shared`` relies on."""

    def __init__(self, max_bytes: int, min_tokens: int = MIN_TOKENS) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self.hits = self.misses = self.shared_hits = 0
        self._entries: OrderedDict[Hashable, KeptPrefill] = OrderedDict()
        self._bytes = 0  # each span once, however many entries share it
        self._span_users: dict[int, int] = {}  # entries holding each span, by id(span)
        self._lock = threading.Lock()
        self._claimed: dict[Hashable, threading.Event] = {}  # prefills under way, by key

    @property
    def nbytes(self) -> int:
        """Bytes the kept entries hold, each shared span counted once."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def admits(self, prompt_length: int) -> bool:
        """Whether a prompt this long is looked up and kept at all."""
        return self.max_bytes > 0 and prompt_length >= self.min_tokens

    def resize(self, max_bytes: int) -> None:
        """Change the budget (0 empties the cache and keeps nothing), dropping the least
        recently used entries that no longer fit."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        with self._lock:
            self.max_bytes = max_bytes
            self._evict()

    def lookup(self, key: Hashable, attention: bool) -> KeptPrefill | None:
        """The entry for ``key`` (now the most recently used), or None; an entry without
        attention weights does not serve a run that asks for them."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or (attention and entry.rows is None):
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def longest_shared(self, ids: Sequence[int], how: Hashable, limit: int
                       ) -> tuple[KeptPrefill, int] | None:
        """The entry kept under ``(kept ids, how)`` whose ids share the most first tokens with
        ``ids``, and how many (at most ``limit``, at least ``min_tokens``: fewer are not worth a
        copy), now the most recently used; None when no entry shares that many."""
        best: tuple[Hashable, KeptPrefill, int] | None = None
        with self._lock:
            for key, entry in self._entries.items():
                if not (isinstance(key, tuple) and len(key) == 2 and key[1] == how):
                    continue
                shared = min(shared_length(key[0], ids), limit)
                if shared >= self.min_tokens and (best is None or shared > best[2]):
                    best = (key, entry, shared)
            if best is None:
                return None
            self._entries.move_to_end(best[0])
            self.shared_hits += 1
            return best[1], best[2]

    @contextmanager
    def prefilling(self, key: Hashable) -> Iterator[bool]:
        """Claim ``key``'s prefill for the body: True for the one caller that should run it
        (and keep it); a caller that finds it claimed waits until the claimant's body ends,
        then gets False (look the key up again)."""
        with self._lock:
            claim = self._claimed.get(key)
            mine = claim is None
            if mine:
                claim = self._claimed[key] = threading.Event()
        if not mine:
            claim.wait()
            yield False
            return
        try:
            yield True
        finally:
            with self._lock:
                del self._claimed[key]
            claim.set()

    def keep(self, key: Hashable, entry: KeptPrefill) -> None:
        """Keep ``entry`` under ``key`` (replacing one there), unless it alone overflows the
        budget; older entries leave until it fits (spans it shares with them stay)."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._release(old)
            if entry.nbytes > self.max_bytes:
                return
            self._entries[key] = entry
            self._hold(entry)
            self._evict()  # never the new entry: alone it fits

    def _hold(self, entry: KeptPrefill) -> None:
        """Count ``entry``'s bytes: its own, and each span no kept entry held yet (lock held)."""
        self._bytes += entry.own_nbytes
        for span in entry.spans:
            users = self._span_users.get(id(span), 0)
            if users == 0:
                self._bytes += span.nbytes
            self._span_users[id(span)] = users + 1

    def _release(self, entry: KeptPrefill) -> None:
        """Uncount ``entry``'s bytes: its own, and each span no other kept entry holds."""
        self._bytes -= entry.own_nbytes
        for span in entry.spans:
            users = self._span_users.pop(id(span)) - 1
            if users:
                self._span_users[id(span)] = users
            else:
                self._bytes -= span.nbytes

    def _evict(self) -> None:
        """Drop least recently used entries until the rest fit the budget (lock held)."""
        while self._entries and self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._release(dropped)
