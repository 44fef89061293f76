"""Drive the async sampler clients from Streamlit's synchronous script thread.

One private event loop runs in a daemon thread; the script pulls events one at a time. When
the script stops early (Stop button, a rerun, a page switch) the generator is closed, which
closes the client stream, and the engine stops before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future
from typing import Any, Awaitable, Callable, Iterator, Sequence, TypeVar, Union

from sampler_core.inputs import PromptPart
from sampler_core.settings import SampleSettings
from sampler_core.tokens import RunSummary, Token

Event = Union[Token, RunSummary]
T = TypeVar("T")


class Runner:
    """An event loop in a thread, with blocking helpers for the script thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="workbench-loop",
                                        daemon=True)
        self._thread.start()

    def call(self, make: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        """Run a coroutine on the loop and wait for its result."""
        async def wrapped() -> T:
            return await make()

        future: Future[T] = asyncio.run_coroutine_threadsafe(wrapped(), self.loop)
        return future.result(timeout)

    def build(self, factory: Callable[[], T]) -> T:
        """Call ``factory`` on the loop thread (gRPC channels bind to the loop they start on)."""
        async def make() -> T:
            return factory()

        return self.call(make)

    def stream(self, client: Any, parts: Sequence[PromptPart], settings: SampleSettings,
               model_name: str, cancel: threading.Event | None = None) -> Iterator[Event]:
        """Yield the run's events as they arrive; closing the iterator cancels the run."""
        agen = client.sampler.stream_settings(parts, settings, model_name)
        done = object()

        async def step() -> Any:
            return await anext(agen, done)

        try:
            while not (cancel is not None and cancel.is_set()):
                event = asyncio.run_coroutine_threadsafe(step(), self.loop).result()
                if event is done:
                    return
                yield event
        finally:
            # Closing the async generator closes the transport's stream: the local engine
            # sees its cancel flag, a gRPC call is cancelled.
            asyncio.run_coroutine_threadsafe(agen.aclose(), self.loop).result(timeout=30)

    def stream_many(self, client: Any, runs: Sequence[tuple[Sequence[PromptPart], SampleSettings]],
                    model_name: str) -> Iterator[tuple[int, Event | Exception]]:
        """Yield ``(index, event)`` from several runs at once, as their events arrive (earlier
        runs first among those ready); a run's error comes as ``(index, exception)`` and ends
        that run. Closing the iterator cancels the runs still going."""
        agens = [client.sampler.stream_settings(parts, settings, model_name)
                 for parts, settings in runs]
        done = object()
        pulls: dict[int, asyncio.Future[Any]] = {}

        async def pull(index: int) -> Any:
            return await anext(agens[index], done)

        async def start() -> None:
            for index in range(len(agens)):
                pulls[index] = asyncio.ensure_future(pull(index))

        async def next_ready() -> tuple[int, Any] | None:
            if not pulls:
                return None
            await asyncio.wait(pulls.values(), return_when=asyncio.FIRST_COMPLETED)
            index = min(i for i, f in pulls.items() if f.done())
            future = pulls.pop(index)
            if future.exception() is not None:
                return index, future.exception()
            event = future.result()
            if event is not done:
                pulls[index] = asyncio.ensure_future(pull(index))
            return index, event

        async def stop() -> None:
            for future in pulls.values():
                future.cancel()
            await asyncio.gather(*pulls.values(), return_exceptions=True)
            for agen in agens:  # closes each stream: the engine stops before its next step
                with contextlib.suppress(Exception):
                    await agen.aclose()

        asyncio.run_coroutine_threadsafe(start(), self.loop).result()
        try:
            while (ready := asyncio.run_coroutine_threadsafe(next_ready(), self.loop).result()):
                if ready[1] is not done:
                    yield ready
        finally:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=30)

    def tokenize(self, client: Any, text: str, model_name: str) -> list[Token]:
        """Tokenise through the client (works the same locally and remotely)."""
        return self.call(lambda: client.sampler.tokenize(text, model_name))

    def list_models(self, client: Any, timeout: float = 10) -> list[str]:
        """Model names the client's server offers."""
        return self.call(lambda: client.sampler.list_models(), timeout)
