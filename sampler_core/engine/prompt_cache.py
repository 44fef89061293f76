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
for them, its attention weights. Entries leave least recently used first, within a byte
budget: ``$PROMPT_IDE_PROMPT_CACHE_MB`` (default 256; 0 keeps nothing). Prompts under
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


@dataclass(frozen=True)
class KeptPrefill:
    """What one prompt's prefill left: read-only once kept (restores copy out of it)."""

    keys: torch.Tensor  # [layer, kv_head, prompt length, head_dim]
    values: torch.Tensor  # the same shape
    logits: torch.Tensor  # the last position's, [1, vocab]
    rows: torch.Tensor | None  # the last position's attention, [layer, head, length], if asked

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        tensors = [self.keys, self.values, self.logits] + ([self.rows] if self.rows is not None
                                                           else [])
        return sum(t.numel() * t.element_size() for t in tensors)


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
        self._bytes = 0
        self._lock = threading.Lock()
        self._claimed: dict[Hashable, threading.Event] = {}  # prefills under way, by key

    @property
    def nbytes(self) -> int:
        """Bytes the kept entries hold."""
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
            self._evict(0)

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
        budget; older entries leave until it fits."""
        size = entry.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if size > self.max_bytes:
                return
            self._evict(size)
            self._entries[key] = entry
            self._bytes += size

    def _evict(self, room: int) -> None:
        """Drop least recently used entries until ``room`` more bytes fit (lock held)."""
        while self._entries and self._bytes + room > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.nbytes
