"""Decode steps of runs that decode at the same time, taken together.

A decode step of the default model reads ~97 MB of weights for one new token. The kernel's
batched step (``decode_batch`` in packed_kernel.c) reads them once for up to four runs' new
tokens, each run with its own cache and position, and sums every output in the same order
whatever the batch holds: a run's tokens and figures are bit for bit those it gets alone, so a
seeded run does not depend on what else is running.

How steps meet. A decoding run holds a seat (``decoding()``); its thread hands in each step
(``step``) and waits. The first to find no step under way leads: it waits briefly for the
other seated runs that came back from their last step a moment ago (between two steps a run
draws its token and describes it, ~1-1.5 ms of Python), then runs every step handed in so far
(up to the batch limit) as one, under the engine's step lock (so prompts' prefills take turns
with batches), and hands each its result. After one batch the runs come back at about the
same time, so they stay in step. A run that has been away longer than ``AWAY_S`` (its
consumer is slow to take its tokens) is not waited for. A batch that fails runs again a step
at a time, so one run's fault fails that run alone.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Generic, Iterator, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

#: How long a leader waits for each other decoding run's step (a run's Python between steps
#: is ~1-1.5 ms on this project's 2-core CPU; waiting longer only delays the batch).
WAIT_PER_RUN_S = 0.0015
#: A run away from the batcher longer than this since its last step is not waited for: four
#: runs' Python takes turns under the GIL (~6 ms), a slow consumer takes longer.
AWAY_S = 0.008


class Seat:
    """A decoding run's place at the batcher: whether it has a step in, and when it last got
    a step's result back."""

    def __init__(self) -> None:
        self.stepping = False
        self.back_at = time.monotonic()


class _Request(Generic[Item, Result]):
    """One step handed in (by a seated run or not), and once its batch ran its result or
    its error."""

    def __init__(self, item: Item, seat: Seat | None) -> None:
        self.item, self.seat = item, seat
        self.done = False
        self.result: Result | None = None
        self.error: BaseException | None = None


class StepBatcher(Generic[Item, Result]):
    """Runs ``run_batch(items) -> results`` (one result per item, in order) on up to
    ``max_batch`` steps at a time, each batch inside ``lock``."""

    def __init__(self, run_batch: Callable[[list[Item]], Sequence[Result]], max_batch: int,
                 lock: ContextManager[Any], wait_per_run_s: float = WAIT_PER_RUN_S,
                 away_s: float = AWAY_S) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if wait_per_run_s < 0:
            raise ValueError(f"wait_per_run_s must be >= 0, got {wait_per_run_s}")
        if away_s < 0:
            raise ValueError(f"away_s must be >= 0, got {away_s}")
        self._run_batch, self.max_batch, self._lock = run_batch, max_batch, lock
        self.wait_per_run_s, self.away_s = wait_per_run_s, away_s
        self._cond = threading.Condition()
        self._pending: list[_Request[Item, Result]] = []
        self._leading = False
        self._seats: set[Seat] = set()  # runs between their prefill and their end
        #: How many batches ran, and how many steps they held (for tests and benchmarks).
        self.batches = self.steps = 0

    @property
    def seated(self) -> int:
        """How many runs are decoding now (between their prefill and their end)."""
        with self._cond:
            return len(self._seats)

    @contextmanager
    def decoding(self) -> Iterator[Seat]:
        """A seat for the calling run for the body's duration: pass it to ``step``."""
        seat = Seat()
        with self._cond:
            self._seats.add(seat)
        try:
            yield seat
        finally:
            with self._cond:
                self._seats.discard(seat)
                self._cond.notify_all()  # a leader may be waiting for this run

    def step(self, item: Item, seat: Seat | None = None) -> Result:
        """``item``'s result, computed in a batch with whatever other steps meet it (a run
        that holds a seat passes it, so others wait for it while it is near)."""
        request: _Request[Item, Result] = _Request(item, seat)
        with self._cond:
            self._pending.append(request)
            if seat is not None:
                seat.stepping = True
            self._cond.notify_all()  # a leader may be gathering
            while not request.done:
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                batch = self._gather()
                self._cond.release()  # the batch runs without holding up arrivals
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    back_at = time.monotonic()
                    for waiting in batch:  # interrupted (the leader's own exception): say so
                        if waiting.result is None and waiting.error is None:
                            waiting.error = RuntimeError("the decode step was interrupted")
                        waiting.done = True
                        if waiting.seat is not None:  # back now: the next leader waits for it
                            waiting.seat.stepping, waiting.seat.back_at = False, back_at
                    self._leading = False
                    self._cond.notify_all()
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    def _gather(self) -> list[_Request[Item, Result]]:
        """Wait (lock held, released while waiting), up to ``wait_per_run_s`` each, for the
        steps of seated runs that are near (back from their last step less than ``away_s``
        ago); take the oldest ``max_batch`` pending steps."""
        def expected() -> int:
            now = time.monotonic()
            near = sum(1 for seat in self._seats
                       if not seat.stepping and now - seat.back_at < self.away_s)
            return min(len(self._pending) + near, self.max_batch)

        deadline = time.monotonic() + self.wait_per_run_s * (expected() - len(self._pending))
        while len(self._pending) < expected():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        batch = self._pending[:self.max_batch]
        del self._pending[:self.max_batch]
        return batch

    def _run(self, batch: list[_Request[Item, Result]]) -> None:
        """Give each step of the batch its result or its error. A batch that fails runs
        again a step at a time (``run_batch`` checks its steps before it changes anything), so
        one step's fault fails that step's run alone."""
        if self._attempt(batch) is not None and len(batch) > 1:
            for request in batch:
                self._attempt([request])

    def _attempt(self, batch: list[_Request[Item, Result]]) -> BaseException | None:
        """Run ``batch`` once: set each step's result and return None, or return the error
        (a lone step keeps it as its own)."""
        try:
            with self._lock:
                results = self._run_batch([r.item for r in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for "
                                   f"{len(batch)} steps")
        except Exception as exc:  # handed to the waiting run, which raises it
            if len(batch) == 1:
                batch[0].error = exc
            return exc
        for request, result in zip(batch, results):
            request.result = result
        self.batches += 1
        self.steps += len(batch)
        return None
