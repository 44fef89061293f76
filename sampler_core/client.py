"""The SDK-shaped client: ``Client(...).sampler.sample(...)`` / ``.tokenize(...)``.

``Client`` speaks gRPC to a Sampler server (xAI SDK signatures, defaults and seed sequence);
``LocalClient`` runs the embedded engine in this process with the same API; ``SyncClient``
wraps either for scripts and notebooks. A ``Transport`` does the moving of requests; the
sampler on top builds settings exactly as the SDK did.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterator, Protocol, Sequence, Union

from sampler_core.inputs import PromptPart, to_parts
from sampler_core.settings import InputToken, SampleSettings
from sampler_core.tokens import RunSummary, Token

logger = logging.getLogger("sampler_core")

Event = Union[Token, RunSummary]
SENTENCEPIECE_MARKER = "\u2581"
DEFAULT_API_HOST = "localhost:50051"


class Transport(Protocol):
    """Moves requests to an engine, here or over the wire."""

    def stream(self, parts: Sequence[PromptPart], settings: SampleSettings,
               model_name: str) -> AsyncIterator[Event]: ...

    async def tokenize(self, text: str, model_name: str) -> list[Token]: ...

    async def list_models(self) -> list[str]: ...

    async def close(self) -> None: ...


def augment(tokens: Sequence[InputToken] | None) -> list[InputToken]:
    """The SDK's ``augment_tokens``: add a '▁'-prefixed variant of every string."""
    out: list[InputToken] = []
    for token in tokens or ():
        out.append(token)
        if isinstance(token, str) and not token.startswith(SENTENCEPIECE_MARKER):
            out.append(SENTENCEPIECE_MARKER + token)
    return out


class AsyncSampler:
    """The ``client.sampler`` object: ``sample`` and ``tokenize`` with the SDK's signatures."""

    def __init__(self, transport: Transport, initial_rng_seed: int | None = None) -> None:
        self._transport = transport
        self._rng_seed = random.randint(0, 100000) if initial_rng_seed is None else initial_rng_seed

    @property
    def next_rng_seed(self) -> int:
        """The seed the next ``sample()`` without an explicit ``rng_seed`` will use."""
        return self._rng_seed

    def _take_seed(self, rng_seed: int | None) -> int:
        if rng_seed is not None:
            return rng_seed
        seed, self._rng_seed = self._rng_seed, self._rng_seed + 1
        return seed

    def build_settings(self, *, max_len: int = 256, temperature: float = 0.7,
                       nucleus_p: float = 0.95, stop_tokens: Sequence[str] | None = None,
                       stop_strings: Sequence[str] | None = None, rng_seed: int | None = None,
                       allowed_tokens: Sequence[InputToken] | None = None,
                       disallowed_tokens: Sequence[InputToken] | None = None,
                       augment_tokens: bool = True, return_attention: bool = False,
                       **extensions: Any) -> SampleSettings:
        """SampleSettings from ``sample()``'s arguments, advancing the seed as the SDK does."""
        grow: Callable[[Any], Any] = augment if augment_tokens else (lambda t: list(t or ()))
        return SampleSettings(
            max_len=max_len, temperature=temperature, nucleus_p=nucleus_p,
            stop_tokens=tuple(grow(stop_tokens)), stop_strings=tuple(stop_strings or ()),
            rng_seed=self._take_seed(rng_seed), allowed_tokens=tuple(grow(allowed_tokens)),
            disallowed_tokens=tuple(grow(disallowed_tokens)), return_attention=return_attention,
            **extensions)

    async def sample(self, prompt: Union[str, Sequence[int], Sequence[Token]] = "",
                     inputs: Sequence[Union[str, Sequence[int], bytes]] = (),
                     model_name: str = "", max_len: int = 256, temperature: float = 0.7,
                     nucleus_p: float = 0.95, stop_tokens: list[str] | None = None,
                     stop_strings: list[str] | None = None, rng_seed: int | None = None,
                     allowed_tokens: Sequence[InputToken] | None = None,
                     disallowed_tokens: Sequence[InputToken] | None = None,
                     augment_tokens: bool = True, return_attention: bool = False,
                     **extensions: Any) -> AsyncIterator[Token]:
        """Sample a completion, yielding one ``Token`` at a time (the SDK's signature).

        Extensions, by keyword: ``top_k`` (default 5), ``full_attention``, ``score_prompt``
        (prompt tokens come first, as USER tokens), ``stop_at_eos`` (default True),
        ``prefill`` (``float32``, ``fixed16`` or ``fast``; empty for the engine's default).
        """
        async for event in self.sample_events(
                prompt, inputs, model_name, max_len=max_len, temperature=temperature,
                nucleus_p=nucleus_p, stop_tokens=stop_tokens, stop_strings=stop_strings,
                rng_seed=rng_seed, allowed_tokens=allowed_tokens,
                disallowed_tokens=disallowed_tokens, augment_tokens=augment_tokens,
                return_attention=return_attention, **extensions):
            if isinstance(event, Token):
                yield event
            else:
                for note in event.notes:
                    logger.warning("%s", note)

    async def sample_events(self, prompt: Any = "", inputs: Sequence[Any] = (),
                            model_name: str = "", **kwargs: Any) -> AsyncIterator[Event]:
        """Like ``sample`` but also yields the closing ``RunSummary`` (finish reason, notes)."""
        parts = to_parts(prompt, inputs)
        settings = self.build_settings(**kwargs)
        async for event in self._transport.stream(parts, settings, model_name):
            yield event

    async def stream_settings(self, parts: Sequence[PromptPart], settings: SampleSettings,
                              model_name: str = "") -> AsyncIterator[Event]:
        """Run ready-made parts and settings (no seed bookkeeping): what the workbench uses."""
        async for event in self._transport.stream(parts, settings, model_name):
            yield event

    async def tokenize(self, prompt: str, model_name: str = "") -> list[Token]:
        """Tokenise a prompt; the tokens carry probability 0."""
        return await self._transport.tokenize(prompt, model_name)

    async def list_models(self) -> list[str]:
        """Model names this sampler's server accepts."""
        return await self._transport.list_models()


class LocalTransport:
    """Runs the in-process engine; each step runs in a worker thread, off the event loop."""

    def __init__(self, default_model: str = "") -> None:
        self.default_model = default_model
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sampler")

    def _engine(self, model_name: str) -> Any:
        from sampler_core.engine import get_engine

        return get_engine(model_name or self.default_model)

    async def stream(self, parts: Sequence[PromptPart], settings: SampleSettings,
                     model_name: str) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        engine = await loop.run_in_executor(self._pool, self._engine, model_name)
        generation = await loop.run_in_executor(self._pool, engine.start, parts, settings,
                                                stop.is_set)
        events = iter(generation)
        done = object()
        try:
            while (event := await loop.run_in_executor(self._pool, next, events, done)) is not done:
                yield event
        finally:
            stop.set()  # the engine checks this before every step

    async def tokenize(self, text: str, model_name: str) -> list[Token]:
        loop = asyncio.get_running_loop()
        engine = await loop.run_in_executor(self._pool, self._engine, model_name)
        return await loop.run_in_executor(self._pool, engine.tokenize, text)

    async def list_models(self) -> list[str]:
        from sampler_core.engine import model_names

        return model_names()

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Client:
    """A remote Sampler client with the xAI SDK's constructor.

    ``api_key`` defaults to $XAI_API_KEY; ``api_host`` to $SAMPLER_API_HOST, else
    ``localhost:50051``. Hosts starting with ``localhost:`` use a plain channel, others TLS.
    """

    def __init__(self, api_key: str | None = None, *, initial_rng_seed: int | None = None,
                 api_host: str | None = None,
                 metadata: Sequence[tuple[str, str]] | None = None,
                 root_certificates: bytes | None = None) -> None:
        from sampler_core.wire.transport import GrpcTransport

        self.api_host = api_host or os.environ.get("SAMPLER_API_HOST", DEFAULT_API_HOST)
        key = api_key if api_key is not None else os.environ.get("XAI_API_KEY", "")
        self._transport = GrpcTransport(self.api_host, key, metadata=metadata or (),
                                        root_certificates=root_certificates)
        self.sampler = AsyncSampler(self._transport, initial_rng_seed)

    async def get_token_budget(self, transaction_type: str = "") -> Any:
        """This API key's token budget (a ``sampler_core.wire.accounts.TokenBudget``)."""
        return await self._transport.get_token_budget(transaction_type)

    async def list_transactions(self) -> list[Any]:
        """This API key's recorded requests (``sampler_core.wire.accounts.Transaction``s)."""
        return await self._transport.list_transactions()

    async def close(self) -> None:
        """Close the channel."""
        await self._transport.close()


class LocalClient:
    """The same API as ``Client``, over the embedded engine in this process."""

    def __init__(self, model: str = "", *, initial_rng_seed: int | None = None) -> None:
        self._transport = LocalTransport(model)
        self.sampler = AsyncSampler(self._transport, initial_rng_seed)

    async def close(self) -> None:
        """Release the worker threads."""
        await self._transport.close()


class SyncClient:
    """A blocking wrapper for scripts and notebooks: ``SyncClient().sample("Hi", max_len=5)``.

    Wraps a ``LocalClient`` by default, or any client passed in; runs its coroutines on a
    private event loop thread, so it also works inside Jupyter's running loop.
    """

    def __init__(self, client: Client | LocalClient | None = None, **local_kwargs: Any) -> None:
        self._client = client or LocalClient(**local_kwargs)
        self.sampler = self._client.sampler
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stream(self, prompt: Any = "", **kwargs: Any) -> Iterator[Token]:
        """Yield tokens as they are sampled (arguments as ``AsyncSampler.sample``)."""
        agen = self.sampler.sample(prompt, **kwargs)
        done = object()

        async def step() -> Any:
            return await anext(agen, done)

        try:
            while (token := self._call(step())) is not done:
                yield token
        finally:
            self._call(agen.aclose())

    def sample(self, prompt: Any = "", **kwargs: Any) -> list[Token]:
        """All tokens of one completion."""
        return list(self.stream(prompt, **kwargs))

    def complete(self, prompt: Any = "", **kwargs: Any) -> str:
        """The completion's text."""
        return "".join(t.token_str for t in self.sample(prompt, **kwargs) if t.token_type == 2)

    def tokenize(self, prompt: str, model_name: str = "") -> list[Token]:
        """Tokenise a prompt."""
        return self._call(self.sampler.tokenize(prompt, model_name))

    def close(self) -> None:
        """Close the client and stop the loop thread."""
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
