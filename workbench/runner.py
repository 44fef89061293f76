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
        """Yield ``(index, event)`` from several runs at once, in the order the events arrive;
        a run's error comes as ``(index, exception)`` and ends that run. Each run is read
        ahead of the caller (a task per run on the loop), so drawing one run's tokens never
        holds the others back, and their steps can meet in the engine. Closing the iterator
        cancels the runs still going."""
        agens = [client.sampler.stream_settings(parts, settings, model_name)
                 for parts, settings in runs]
        ended = object()
        arrived: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()  # used on the loop only
        pumps: list[asyncio.Future[None]] = []

        async def pump(index: int) -> None:
            try:
                async for event in agens[index]:
                    arrived.put_nowait((index, event))
            except Exception as exc:  # noqa: BLE001 - the run's own error, handed over
                arrived.put_nowait((index, exc))
            finally:
                arrived.put_nowait((index, ended))

        async def start() -> None:
            pumps.extend(asyncio.ensure_future(pump(index)) for index in range(len(agens)))

        async def next_arrived() -> list[tuple[int, Any]]:
            """Every event arrived by now, waiting for the first."""
            items = [await arrived.get()]
            while not arrived.empty():
                items.append(arrived.get_nowait())
            return items

        async def stop() -> None:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for agen in agens:  # closes each stream: the engine stops before its next step
                with contextlib.suppress(Exception):
                    await agen.aclose()

        asyncio.run_coroutine_threadsafe(start(), self.loop).result()
        left = len(agens)
        try:
            while left:
                for index, event in asyncio.run_coroutine_threadsafe(next_arrived(),
                                                                     self.loop).result():
                    if event is ended:
                        left -= 1
                    else:
                        yield index, event
        finally:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=30)

    def tokenize(self, client: Any, text: str, model_name: str) -> list[Token]:
        """Tokenise through the client (works the same locally and remotely)."""
        return self.call(lambda: client.sampler.tokenize(text, model_name))

    def list_models(self, client: Any, timeout: float = 10) -> list[str]:
        """Model names the client's server offers."""
        return self.call(lambda: client.sampler.list_models(), timeout)
