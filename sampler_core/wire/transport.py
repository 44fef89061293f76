"""The gRPC transport behind ``Client``: speaks the Sampler protocol to a remote server.

Hosts starting with ``localhost:`` get a plain channel, others TLS (as the xAI SDK did). The
channel is created lazily on the event loop that uses it, so a ``Client`` built outside any
loop (a script's module level) works under ``asyncio.run`` later. Failed calls raise the
library's exceptions: the exact class the server sent, else one chosen by status code.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Sequence, Union

import grpc
from google.protobuf import empty_pb2

from sampler_core.inputs import PromptPart
from sampler_core.settings import SampleSettings
from sampler_core.tokens import FinishReason, RunSummary, Token
from sampler_core.wire import convert
from sampler_core.wire._generated.prompt_ide import sampler_public_pb2 as pb
from sampler_core.wire._generated.prompt_ide import sampler_public_pb2_grpc as pb_grpc
from sampler_core.wire.accounts import TokenBudget, Transaction

logger = logging.getLogger("sampler_core")

Event = Union[Token, RunSummary]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def sample_request(parts: Sequence[PromptPart], settings: SampleSettings,
                   model_name: str) -> pb.SampleTokensRequest:
    """The SampleTokens request for ready-made parts and settings."""
    return pb.SampleTokensRequest(settings=convert.settings_to_proto(settings),
                                  return_attention=settings.return_attention,
                                  model_name=model_name, inputs=convert.parts_to_proto(parts))


class GrpcTransport:
    """Moves requests to a Sampler server over gRPC."""

    def __init__(self, api_host: str, api_key: str, metadata: Sequence[tuple[str, str]] = (),
                 root_certificates: bytes | None = None) -> None:
        self.api_host = api_host
        # Extra pairs first, then the key: the SDK's order.
        self.metadata: tuple[tuple[str, str], ...] = tuple(metadata) + (("apikey", api_key),)
        self.root_certificates = root_certificates
        self.last_budget: TokenBudget | None = None
        self.last_transaction: Transaction | None = None
        self._channels: dict[asyncio.AbstractEventLoop, tuple[grpc.aio.Channel, Any]] = {}

    def _stub(self) -> pb_grpc.SamplerStub:
        loop = asyncio.get_running_loop()
        if loop not in self._channels:
            if self.api_host.startswith("localhost:"):
                channel = grpc.aio.insecure_channel(self.api_host, options=CHANNEL_OPTIONS)
            else:
                credentials = grpc.ssl_channel_credentials(self.root_certificates)
                channel = grpc.aio.secure_channel(self.api_host, credentials,
                                                  options=CHANNEL_OPTIONS)
            self._channels[loop] = (channel, pb_grpc.SamplerStub(channel))
        return self._channels[loop][1]

    async def stream(self, parts: Sequence[PromptPart], settings: SampleSettings,
                     model_name: str) -> AsyncIterator[Event]:
        """Tokens as they arrive, then the run's summary (after the budget is read)."""
        request = sample_request(parts, settings, model_name)
        call = self._stub().SampleTokens(request, metadata=self.metadata)
        summary: RunSummary | None = None
        count = 0
        try:
            async for response in call:
                kind = response.WhichOneof("response")
                if kind == "token":
                    count += 1
                    yield convert.token_from_proto(response.token)
                elif kind == "summary":
                    summary = convert.summary_from_proto(response.summary)
                elif kind == "transaction":
                    self.last_transaction = convert.transaction_from_proto(response.transaction)
                elif kind == "budget":
                    self._log_budget(convert.budget_from_proto(response.budget))
        except grpc.RpcError as exc:
            raise convert.error_from_rpc(exc) from None
        finally:
            call.cancel()  # no-op when the stream ended; stops the server's run otherwise
        if summary is None:  # a server without our extension
            finish = FinishReason.MAX_LEN if count >= settings.max_len else FinishReason.STOP_TOKEN
            summary = RunSummary(model_name=model_name, num_prompt_tokens=0,
                                 num_generated_tokens=count, finish_reason=finish,
                                 notes=("the server sent no run summary; finish reason inferred",))
        yield summary

    def _log_budget(self, budget: TokenBudget) -> None:
        self.last_budget = budget
        percent = 100.0 * budget.tokens_spent / budget.token_limit if budget.token_limit else 0.0
        logger.info("tokens used: %d (%.2f%%). Token limit: %d", budget.tokens_spent, percent,
                    budget.token_limit)

    async def _unary(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub(), method)(request, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise convert.error_from_rpc(exc) from None

    async def tokenize(self, text: str, model_name: str) -> list[Token]:
        """The text's tokens (probability 0)."""
        response = await self._unary("Tokenize", pb.TokenizeRequest(text=text,
                                                                    model_name=model_name))
        return [convert.token_from_proto(t) for t in response.tokens]

    async def list_models(self) -> list[str]:
        """Model names the server accepts."""
        response = await self._unary("ListModels", empty_pb2.Empty())
        return list(response.model_names)

    async def get_token_budget(self, transaction_type: str = "") -> TokenBudget:
        """This key's limits and spend."""
        response = await self._unary("GetTokenBudget",
                                     pb.GetTokenBudgetRequest(transaction_type=transaction_type))
        return convert.budget_from_proto(response)

    async def list_transactions(self) -> list[Transaction]:
        """This key's recorded requests, oldest first."""
        response = await self._unary("ListTransactions", empty_pb2.Empty())
        return [convert.transaction_from_proto(t) for t in response.transactions]

    async def close(self) -> None:
        """Close the channel of the running loop (others close with their loops)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        entry = self._channels.pop(loop, None)
        if entry is not None:
            await entry[0].close()
