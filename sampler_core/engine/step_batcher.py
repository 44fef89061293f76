"""Decode steps of runs that decode at the same time, taken together.

A decode step of the default model reads ~97 MB of weights for one new token. The kernel's
batched step (``decode_batch`` in packed_kernel.c) reads them once for up to four runs' new
tokens, each run with its own cache and position, and sums every output in the same order
whatever the batch holds: a run's tokens and figures are bit for bit those it gets alone, so a
seeded run does not depend on what else is running.

How steps meet. Each run's thread hands in its step and waits. The first to find no step
under way leads: it waits briefly for the other runs that are decoding (between two steps a
run draws its token and describes it, ~1 ms of Python), then runs every step handed in so far
(up to the batch limit) as one, under the engine's step lock (so prompts' prefills take turns
with batches), and hands each its result. After one batch the runs come back at about the
same time, so they stay in step. A run that does not come back in time (its consumer is slow)
is not waited for again until a batch fills once more. A batch that fails runs again a step
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


class _Request(Generic[Item, Result]):
    """One step handed in, and (once its batch ran) its result or the batch's error."""

    def __init__(self, item: Item) -> None:
        self.item = item
        self.done = False
        self.result: Result | None = None
        self.error: BaseException | None = None


class StepBatcher(Generic[Item, Result]):
    """Runs ``run_batch(items) -> results`` (one result per item, in order) on up to
    ``max_batch`` steps at a time, each batch inside ``lock``."""

    def __init__(self, run_batch: Callable[[list[Item]], Sequence[Result]], max_batch: int,
                 lock: ContextManager[Any], wait_per_run_s: float = WAIT_PER_RUN_S) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if wait_per_run_s < 0:
            raise ValueError(f"wait_per_run_s must be >= 0, got {wait_per_run_s}")
        self._run_batch, self.max_batch, self._lock = run_batch, max_batch, lock
        self.wait_per_run_s = wait_per_run_s
        self._cond = threading.Condition()
        self._pending: list[_Request[Item, Result]] = []
        self._leading = False
        self._decoding = 0  # runs between their prefill and their end
        self._patient = True  # whether a leader waits for the others (see the module doc)
        #: How many batches ran, and how many steps they held (for tests and benchmarks).
        self.batches = self.steps = 0

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """Count the calling run among those a leader waits for, for the body's duration."""
        with self._cond:
            self._decoding += 1
        try:
            yield
        finally:
            with self._cond:
                self._decoding -= 1
                self._cond.notify_all()  # a leader may be waiting for this run

    def step(self, item: Item) -> Result:
        """``item``'s result, computed in a batch with whatever other steps meet it."""
        request: _Request[Item, Result] = _Request(item)
        with self._cond:
            self._pending.append(request)
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
                    for waiting in batch:  # interrupted (the leader's own exception): say so
                        if waiting.result is None and waiting.error is None:
                            waiting.error = RuntimeError("the decode step was interrupted")
                        waiting.done = True
                    self._leading = False
                    self._cond.notify_all()
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    def _gather(self) -> list[_Request[Item, Result]]:
        """Wait (lock held, released while waiting) for the other decoding runs' steps, up to
        WAIT_PER_RUN_S each; take the oldest ``max_batch`` pending steps."""
        expected = min(max(self._decoding, 1), self.max_batch)
        if self._patient and len(self._pending) < expected:
            deadline = time.monotonic() + self.wait_per_run_s * (expected - len(self._pending))
            while len(self._pending) < min(max(self._decoding, 1), self.max_batch):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        # Patient again once a batch fills; not after waiting in vain (a slow run's consumer).
        self._patient = len(self._pending) >= min(max(self._decoding, 1), self.max_batch)
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
