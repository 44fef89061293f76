"""The Sampler gRPC server: ``sampler-core serve``.

Each sampling stream runs its engine iteration on a worker thread; the engine's FIFO step lock
interleaves concurrent runs one decode step at a time, so a short request is not stuck behind
a long one and each run's output is what it would be alone. A small credit window between the
worker and the stream keeps the worker at most a couple of tokens ahead of the client, and a
cancelled or vanished client sets the run's ``cancelled`` flag, which the engine checks before
every step.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import grpc
from google.protobuf import empty_pb2

from sampler_core.errors import EngineFailure, InvalidInput, Overloaded, SamplerError, UnknownModel
from sampler_core.inputs import PromptPart, TextPart
from sampler_core.settings import SampleSettings
from sampler_core.tokens import RunSummary, Token, TokenType
from sampler_core.wire import convert
from sampler_core.wire._generated.prompt_ide import sampler_public_pb2 as pb
from sampler_core.wire._generated.prompt_ide import sampler_public_pb2_grpc as pb_grpc
from sampler_core.paths import data_dir as default_data_dir
from sampler_core.wire.accounts import Accounts, read_key_file

logger = logging.getLogger("sampler_core.server")

#: Requests larger than this are refused with INVALID_ARGUMENT by the handler ...
MAX_REQUEST_BYTES = 16 * 1024 * 1024
#: ... and larger than this by gRPC itself (RESOURCE_EXHAUSTED), before any handler runs.
TRANSPORT_RECEIVE_LIMIT = 32 * 1024 * 1024
SEND_LIMIT = 256 * 1024 * 1024
#: How many events a run may compute ahead of what its client has taken.
CREDIT_WINDOW = 2
_DONE = object()


@dataclass
class ServerConfig:
    """Everything ``serve`` needs (the command line's options)."""

    host: str = "127.0.0.1"
    port: int = 50051
    model: str = ""
    api_keys: Path | None = None
    token_limit: int | None = None
    request_limit: int | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_concurrent: int = 8
    max_queue: int = 64
    grace: float = 10.0


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class SamplerService(pb_grpc.SamplerServicer):
    """The six RPCs over the in-process engine."""

    def __init__(self, config: ServerConfig, accounts: Accounts) -> None:
        self.config = config
        self.accounts = accounts
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sampler-rpc")
        self._runs = ThreadPoolExecutor(max_workers=config.max_concurrent,
                                        thread_name_prefix="sampler-run")
        self._slots = asyncio.Semaphore(config.max_concurrent)
        self._waiting = 0
        self._default_canonical: str | None = None
        #: For each cancelled run, how many tokens it generated after the cancel was seen.
        self.cancel_overruns: list[int] = []

    # ----- helpers -----------------------------------------------------------------------------

    def engine(self, name: str) -> Any:
        """The engine for a request's model name; only names ListModels shows are served."""
        from sampler_core.engine import get_engine, model_names
        from sampler_core.engine.models import resolve

        wanted = name or self.config.model
        canonical, _ = resolve(wanted)  # UnknownModel for names that are nothing at all
        if self._default_canonical is None:
            self._default_canonical = resolve(self.config.model)[0]
        if canonical not in model_names() and canonical != self._default_canonical:
            # A local path would load here: remote clients may not pick files on our disk.
            raise UnknownModel(f"model_name {name!r} is not served here; served: "
                               f"{', '.join(map(repr, self.model_names()))}")
        return get_engine(wanted)

    def model_names(self) -> list[str]:
        """What ListModels shows: registered models, the vision alias once it exists."""
        from sampler_core.engine import model_names
        from sampler_core.engine.models import resolve

        names = list(model_names())
        try:
            canonical = resolve(self.config.model)[0]
            if canonical not in names:
                names.insert(0, canonical)
        except SamplerError:
            pass
        return names

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        if not isinstance(exc, SamplerError):
            logger.exception("internal error", exc_info=exc)
            exc = EngineFailure(f"internal server error ({type(exc).__name__}: {exc})")
        code, details, trailing = convert.error_status(exc)
        await context.abort(code, details, trailing_metadata=trailing)

    @staticmethod
    def _check_size(request: Any) -> None:
        size = request.ByteSize()
        if size > MAX_REQUEST_BYTES:
            raise InvalidInput(f"request is {size} bytes; at most {MAX_REQUEST_BYTES} bytes "
                               "(16 MiB) are allowed", field="request", value=size)

    def _account(self, context: grpc.aio.ServicerContext) -> str:
        return self.accounts.authenticate(context.invocation_metadata() or ())

    # ----- sampling ----------------------------------------------------------------------------

    async def SampleTokens(self, request: pb.SampleTokensRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SampleTokensResponse]:
        async for message in self._sample_rpc(
                request, context, lambda: convert.parts_from_proto(request.inputs, request.prompt)):
            yield message

    async def TokenizeAndSampleTokens(
            self, request: pb.TokenizeAndSampleTokensRequest,
            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SampleTokensResponse]:
        async for message in self._sample_rpc(
                request, context,
                lambda: convert.parts_from_proto([pb.PromptInput(text=request.text)])):
            yield message

    async def _sample_rpc(self, request: Any, context: grpc.aio.ServicerContext,
                          parts: Callable[[], Sequence[PromptPart]]
                          ) -> AsyncIterator[pb.SampleTokensResponse]:
        """Both sampling RPCs: check the key first (a bad key runs nothing), then sample."""
        try:
            account = self._account(context)
            self._check_size(request)
            settings = convert.settings_from_proto(
                request.settings if request.HasField("settings") else None,
                request.return_attention)
            async for message in self._sample(account, parts(), settings, request.model_name,
                                              context):
                yield message
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a clean status
            error = exc
        await self._fail(context, error)

    async def _acquire_slot(self) -> None:
        if self._slots.locked() and self._waiting >= self.config.max_queue:
            raise Overloaded(
                f"server busy: {self.config.max_concurrent} requests running (--max-concurrent "
                f"{self.config.max_concurrent}) and {self._waiting} queued (limit "
                f"{self.config.max_queue}); retry later")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1

    async def _sample(self, account: str, parts: Sequence[PromptPart], settings: SampleSettings,
                      model_name: str, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[pb.SampleTokensResponse]:
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        engine = await self._call(self.engine, model_name)
        generation = await self._call(engine.start, parts, settings, stop.is_set)  # validates
        reserved = self.accounts.reserve(account, len(generation.prompt_ids), settings.max_len)
        try:
            await self._acquire_slot()
        except BaseException:
            self.accounts.release(account, reserved)
            _close(generation)
            raise
        queue: asyncio.Queue[Any] = asyncio.Queue()
        credits = threading.Semaphore(CREDIT_WINDOW)
        generated = [0]

        def post(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shut down): nobody is listening
                stop.set()

        def run() -> Any:
            """The worker: iterate the engine, at most CREDIT_WINDOW events ahead."""
            finished = False
            try:
                events = iter(generation)
                while not stop.is_set():
                    if not credits.acquire(timeout=0.05):
                        continue
                    event = next(events, _DONE)
                    if event is _DONE:
                        finished = True
                        break
                    if isinstance(event, Token) and event.token_type == TokenType.MODEL:
                        generated[0] += 1
                    post((event, _event_message(event)))
            except BaseException as exc:  # noqa: BLE001 - handed to the stream
                post(exc)
            finally:
                _close(generation)
                tx = self.accounts.record(
                    account, reserved, transaction_type="sample", model_name=engine.name,
                    num_prompt_tokens=len(generation.prompt_ids),
                    num_generated_tokens=generated[0], confirmed=finished)
                post(_DONE)
                try:
                    loop.call_soon_threadsafe(self._slots.release)
                except RuntimeError:
                    pass
            return tx

        worker_done = [False]
        at_cancel: list[int] = []

        def cancel(*_: Any) -> None:
            """The client went away or the stream failed: stop before the next step."""
            if not worker_done[0] and not at_cancel:
                at_cancel.append(generated[0])
            stop.set()

        def note_overrun(_: Any) -> None:
            # Tokens the engine produced after the cancel was seen (the figure).
            if at_cancel:
                self.cancel_overruns.append(generated[0] - at_cancel[0])

        context.add_done_callback(lambda ctx: cancel() if ctx.cancelled() else None)
        worker = loop.run_in_executor(self._runs, run)
        worker.add_done_callback(note_overrun)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                credits.release()
                if isinstance(item, BaseException):
                    raise item
                yield item[1]
            tx = await worker
            worker_done[0] = True
            if tx.confirmed:
                yield pb.SampleTokensResponse(transaction=convert.transaction_to_proto(tx))
                budget = self.accounts.budget(account)
                yield pb.SampleTokensResponse(budget=convert.budget_to_proto(budget))
        finally:
            cancel()  # a cancelled or failed stream stops its run before the next step

    # ----- unary RPCs --------------------------------------------------------------------------

    async def Tokenize(self, request: pb.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            self._account(context)
            self._check_size(request)
            part = convert._text_part(request.text, 0)
            engine = await self._call(self.engine, request.model_name)
            tokens = await self._call(engine.tokenize, part.text)
            return pb.TokenizeResponse(tokens=[convert.token_to_proto(t) for t in tokens])
        except Exception as exc:  # noqa: BLE001
            error = exc
        await self._fail(context, error)

    async def GetTokenBudget(self, request: pb.GetTokenBudgetRequest,
                             context: grpc.aio.ServicerContext) -> pb.TokenBudget:
        try:
            account = self._account(context)
            budget = await self._call(self.accounts.budget, account, request.transaction_type)
            return convert.budget_to_proto(budget)
        except Exception as exc:  # noqa: BLE001
            error = exc
        await self._fail(context, error)

    async def ListTransactions(self, request: empty_pb2.Empty,
                               context: grpc.aio.ServicerContext) -> pb.ListTransactionsResponse:
        try:
            account = self._account(context)
            txs = await self._call(self.accounts.transactions, account)
            return pb.ListTransactionsResponse(
                transactions=[convert.transaction_to_proto(t) for t in txs])
        except Exception as exc:  # noqa: BLE001
            error = exc
        await self._fail(context, error)

    async def ListModels(self, request: empty_pb2.Empty,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        try:
            self._account(context)
            return pb.ListModelsResponse(model_names=self.model_names())
        except Exception as exc:  # noqa: BLE001
            error = exc
        await self._fail(context, error)

    def shutdown(self) -> None:
        """Release the worker threads (runs still going see their stop flag)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._runs.shutdown(wait=False, cancel_futures=True)


def _close(generation: Any) -> None:
    close = getattr(generation, "close", None)
    if close is not None:
        try:
            close()
        except ValueError:  # still executing on another thread; its stop flag ends it
            pass


def _event_message(event: Any) -> pb.SampleTokensResponse:
    if isinstance(event, RunSummary):
        return pb.SampleTokensResponse(summary=convert.summary_to_proto(event))
    return pb.SampleTokensResponse(token=convert.token_to_proto(event))


# ----- running a server ------------------------------------------------------------------------


class RunningServer:
    """A started server: its bound port, and ``stop(grace)``."""

    def __init__(self, server: grpc.aio.Server, service: SamplerService, port: int) -> None:
        self.server = server
        self.service = service
        self.port = port

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls, let in-flight ones finish for ``grace`` seconds, cancel the rest."""
        await self.server.stop(grace)
        self.service.shutdown()
        self.service.accounts.close()


def check_config(config: ServerConfig) -> None:
    """Refuse unsafe or incomplete configurations with a clear message (ValueError)."""
    if config.api_keys is None and not is_loopback(config.host):
        raise ValueError(
            f"refusing to serve on {config.host} without --api-keys: anyone who can reach it "
            "could use it. Pass --api-keys FILE, or bind to 127.0.0.1 (the default).")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if config.max_concurrent < 1:
        raise ValueError(f"--max-concurrent must be >= 1, got {config.max_concurrent}")
    if config.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {config.max_queue}")
    for name in ("token_limit", "request_limit"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


async def start_server(config: ServerConfig, *, load_model: bool = True) -> RunningServer:
    """Build, bind and start a server (the model is loaded first unless told otherwise)."""
    check_config(config)
    keys = read_key_file(config.api_keys) if config.api_keys is not None else None
    accounts = Accounts(config.data_dir, keys, token_limit=config.token_limit,
                        request_limit=config.request_limit)
    service = SamplerService(config, accounts)
    if load_model:
        await asyncio.get_running_loop().run_in_executor(None, service.engine, "")
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", TRANSPORT_RECEIVE_LIMIT),
        ("grpc.max_send_message_length", SEND_LIMIT),
        ("grpc.so_reuseport", 0),
    ])
    pb_grpc.add_SamplerServicer_to_server(service, server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert is not None and config.tls_key is not None:
        credentials = grpc.ssl_server_credentials(
            [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ValueError(f"cannot bind {address}")
    await server.start()
    return RunningServer(server, service, port)


async def serve(config: ServerConfig, ready: Callable[[RunningServer], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    running = await start_server(config)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    auth = (f"API keys from {config.api_keys}" if config.api_keys else
            "no --api-keys: loopback only, every caller shares one anonymous account")
    print(f"sampler-core: model {running.service.engine('').name}; {auth}; "
          f"{'TLS' if config.tls_cert else 'plain'} transport; data in {config.data_dir}",
          flush=True)
    print(f"listening on {config.host}:{running.port}", flush=True)
    if ready is not None:
        ready(running)
    await done.wait()
    print(f"shutting down (grace period {config.grace:g} s)", flush=True)
    await running.stop(config.grace)
    print("stopped", flush=True)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's options."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (non-loopback needs --api-keys)")
    parser.add_argument("--port", type=int, default=50051, help="port (0 picks a free one)")
    parser.add_argument("--model", default="", help="default model name, alias or local path")
    parser.add_argument("--api-keys", type=Path, default=None,
                        help="file of 'KEY [NAME]' lines; without it: loopback only, anonymous")
    parser.add_argument("--token-limit", type=int, default=None,
                        help="tokens (prompt + generated) each key may spend")
    parser.add_argument("--request-limit", type=int, default=None,
                        help="sampling requests each key may make")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"where budgets and transactions persist (default {default_data_dir()})")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    parser.add_argument("--max-concurrent", type=int, default=8,
                        help="streams generating at once; more wait in a queue")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="streams that may wait; past that RESOURCE_EXHAUSTED")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds in-flight streams get to finish on SIGTERM")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The parsed options as a ServerConfig."""
    return ServerConfig(
        host=args.host, port=args.port, model=args.model, api_keys=args.api_keys,
        token_limit=args.token_limit, request_limit=args.request_limit,
        data_dir=args.data_dir or default_data_dir(), tls_cert=args.tls_cert,
        tls_key=args.tls_key, max_concurrent=args.max_concurrent, max_queue=args.max_queue,
        grace=args.grace)


def serve_from_args(args: argparse.Namespace) -> int:
    """``sampler-core serve``: returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    try:
        asyncio.run(serve(config))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
