"""What every engine offers, and the fair step lock engines share.

An engine turns prompt parts and settings into a stream of events: the prompt's tokens when
scoring was asked for, one ``Token`` per generated token, then one ``RunSummary``. All
validation happens in ``start`` before any model work, so a bad request fails fast and whole.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Iterator, Protocol, Sequence, Union

from sampler_core.inputs import PromptPart
from sampler_core.settings import SampleSettings
from sampler_core.tokens import RunSummary, Token

Event = Union[Token, RunSummary]


class Generation(Protocol):
    """A started run: validated, not yet computed. Iterate it for events."""

    prompt_ids: tuple[int, ...]
    notes: tuple[str, ...]

    def __iter__(self) -> Iterator[Event]: ...


class Engine(Protocol):
    """A loaded model that can tokenise and sample."""

    name: str
    context_window: int
    vocab_size: int

    def tokenize(self, text: str) -> list[Token]: ...

    def detokenize(self, token_ids: Sequence[int]) -> str: ...

    def chat_prompt(self, message: str, system: str | None = None) -> str: ...

    def start(self, parts: Sequence[PromptPart], settings: SampleSettings,
              cancelled: Callable[[], bool] | None = None) -> Generation: ...


class FairLock:
    """A FIFO lock: waiters get it in arrival order.

    Runs take the model one decode step at a time through this lock, so a long generation and
    a short one interleave step by step instead of the short one waiting for the long one.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._held = False

    def __enter__(self) -> "FairLock":
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            while self._held or self._queue[0] is not ticket:
                self._cond.wait()
            self._queue.popleft()
            self._held = True
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()
